"""benchmarks/verify_vnncomp.py: a resumed results file loses no row."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `_harness`
    spec = importlib.util.spec_from_file_location("verify_vnncomp", BENCH / "verify_vnncomp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_pending_keeps_the_resumed_rows_not_reached_yet() -> None:
    bench = _load()
    seeded = {f"p{i}": {"index": i, "name": f"p{i}", "result": "old"} for i in (0, 6, 12)}
    run = [{"index": i, "name": f"p{i}", "result": "new"} for i in range(8)]
    merged = bench.with_pending(run, seeded)
    assert [r["index"] for r in merged] == [0, 1, 2, 3, 4, 5, 6, 7, 12]
    assert [r["result"] for r in merged if r["index"] in (0, 6)] == ["new", "new"]
    assert merged[-1]["result"] == "old"
