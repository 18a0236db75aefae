"""Same seed, same report: every number of report.json equals the one stored in tests/data/.

The stored JSON files were written by the harness before its redesign (issue 16); a
refactor of suites/ must give the same numbers for the same seeds. Timings, timestamps and
the machine record are left out (they change run to run). To rewrite the stored files
after a change that is meant to move the numbers (say so in the commit):

    OMP_NUM_THREADS=1 python tests/test_same_seed_report.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bastion.suites.report_model import without_timings
from bastion.suites.runner import run_suite
from bastion.suites.suite import suite_from_dict

DATA = Path(__file__).resolve().parent / "data"
# keys added since the stored files were written (new information, no changed number)
ADDED = {"schema_version"}

KINDS = {
    "check": [
        {"id": "pgd", "attack": "PGD", "eps": [0.05, 0.2], "params": {"steps": 5}},
        {
            "id": "verified",
            "kind": "verify",
            "eps": [0.002, 0.3],
            "n": 4,
            "params": {"timeout": 30, "interval": True, "interval_steps": 2},
        },
        {
            "id": "fooling",
            "kind": "fooling",
            "params": {"generations": 5, "population": 20, "init_size": 20},
            "criterion": "fooled_fraction <= 0.5",
        },
        {"id": "scaling", "kind": "scaling", "n": 4, "params": {"pairs": 2}},
    ]
}
RUNS = {
    "quick": lambda: ("quick", {"n": 24, "batch_size": 16, "fail_under": "linf:0.1=0.2"}),
    "kinds": lambda: (suite_from_dict(KINDS, "kinds"), {"n": 8, "batch_size": 8}),
}


def _report(name: str) -> dict[str, object]:
    from bastion.data import load_data
    from bastion.zoo import demo_model

    suite, kwargs = RUNS[name]()
    report = run_suite(demo_model(), load_data("digits"), suite, seed=3, gallery=4, **kwargs)  # type: ignore[arg-type]
    return without_timings(json.loads(report.to_json()))


def _diff(got: object, want: object, path: str = "") -> list[str]:
    """Where `got` differs from `want`: paths with both values (floats to 1e-9 relative)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: missing" for k in want if k not in got]
        out += [f"{path}.{k}: unexpected" for k in got if k not in want and k not in ADDED]
        for k in want.keys() & got.keys():
            out += _diff(got[k], want[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(got)} entries, stored {len(want)}"]
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in _diff(g, w, f"{path}[{i}]")
        ]
    both_numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (got, want))
    if both_numbers and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):  # type: ignore[arg-type]
        return []
    return [] if got == want else [f"{path}: {got!r}, stored {want!r}"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_seed_gives_the_stored_report(name: str) -> None:
    torch.set_num_threads(1)
    stored = json.loads((DATA / f"same_seed_{name}.json").read_text())
    problems = _diff(_report(name), stored)
    assert not problems, "\n".join(problems[:40])


def test_the_comparison_sees_a_changed_number() -> None:
    stored = json.loads((DATA / "same_seed_quick.json").read_text())
    changed = json.loads(json.dumps(stored))
    changed["threat_models"][0]["robust_accuracy"] += 1 / 24
    assert _diff(changed, stored) == [
        f".threat_models[0].robust_accuracy: {changed['threat_models'][0]['robust_accuracy']!r}, "
        f"stored {stored['threat_models'][0]['robust_accuracy']!r}"
    ]
    assert without_timings({"seconds": 1.0, "a": {"clean_seconds": 2, "b": 3}}) == {"a": {"b": 3}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for run in sys.argv[1:] or sorted(RUNS):
        (DATA / f"same_seed_{run}.json").write_text(json.dumps(_report(run), indent=1) + "\n")
