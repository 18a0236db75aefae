"""What every benchmark shares: where the data is, the machine record, the correctly
classified subset, median timing after warm-up, and atomic JSON results.

Benchmarks run from the repository (`python benchmarks/NAME.py`), so this module is
imported as `from _harness import ...` (the script's folder is on sys.path).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bastion.fileio import write_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def data_root(arg: str | Path | None = None) -> Path:
    """The shared data folder: `arg`, else $BASTION_DATA, else the repository-relative
    ../shared/data (never an absolute path of one machine)."""
    return Path(arg or os.environ.get("BASTION_DATA") or REPO.parent / "shared" / "data")


def portable(text: str | Path) -> str:
    """`text` (a path or a data spec) as results record it: the data root written as the
    repository-relative `../shared/data`, so no machine's absolute path lands in a JSON."""
    root = str(data_root())
    return str(text).replace(root, "../shared/data") if root else str(text)


def mnist_spec(root: str | Path | None = None) -> str:
    return f"mnist:{data_root(root)}"


def cifar_subset_spec(root: str | Path | None = None, split: str = "test") -> str:
    return f"npz:{data_root(root) / 'cifar10' / 'cifar10_subset.npz'}#{split}"


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when the package's code has uncommitted changes
    (a benchmark measures the working tree, not HEAD)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "attacks", "bastion", "defenses", "verify",
             "suites"],
            cwd=REPO, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return (head + ("+dirty" if dirty else "")) or "unknown"


def machine(device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """What the numbers were taken on: CPU, cores, threads, load, versions, the commit."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": [round(v, 2) for v in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(extra)
    return info


def correctly_classified(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The first n images the model classifies correctly, and its clean accuracy on all."""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    keep = ok.nonzero().flatten()[:n]
    return x[keep], y[keep], float(ok.float().mean())


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The median wall time of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: str | Path, doc: Any, indent: int = 2) -> Path:
    """Write `doc` as indented JSON, atomically (a reader never sees half a file), with the
    data root written portably (see `portable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, portable(json.dumps(doc, indent=indent, default=float)) + "\n")
    return path


def update_json(path: str | Path, key: str, value: Any) -> None:
    """Set `key` of the JSON at `path` under a lock (several benchmark processes at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"bastion-{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {}
        doc[key] = value
        write_json(path, doc, indent=1)
