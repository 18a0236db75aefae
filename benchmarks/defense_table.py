"""The defenses' table of docs/defenses.md: each defense trained and evaluated with the
commands a user runs, with their defaults, one after another.

    python benchmarks/defense_table.py --work /tmp/defense_table

runs, each as a subprocess of the installed `bastion` command (so its wall and CPU seconds
are the command's own):

1. `bastion defend distill --out student.pt2` (T = 100) and its undistilled twin
   `bastion defend distill --temperature 1 --out plain.pt2`;
2. `bastion defend dverge --out ensemble.pt2`;
3. `bastion report student.pt2 --baseline plain.pt2`, `bastion report ensemble.pt2` and
   `bastion report --defense raw_isp:random` (the embedded demo model behind the randomised
   ISP), each with `--n` of this script (the report's default, 500, is more than the 450
   digits test images and, with EOT's 20 draws per step, about an hour of the 2 shared
   cores for the RAW-ISP report alone);

and reads each report.json's defense table (undefended | defended | adaptive per threat
model), its clean accuracy and its undefended/ report's. The models the reports train
(the DVERGE surrogate and baseline ensembles) are cached in the work folder, so they are
trained once, inside the DVERGE report's time, as on a clean machine. A step whose output
already exists in the work folder is skipped (its earlier record is kept), so an
interrupted run resumes; `--steps` runs only some. Writes
benchmarks/results/defense_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import RESULTS, git_commit, machine, write_json

STEPS: dict[str, list[str]] = {
    "distill": ["defend", "distill", "--out", "student.pt2"],
    "distill_t1": ["defend", "distill", "--temperature", "1", "--out", "plain.pt2"],
    "dverge": ["defend", "dverge", "--out", "ensemble.pt2"],
    "report_distill": ["report", "student.pt2", "--baseline", "plain.pt2", "--out", "r-distill"],
    "report_dverge": ["report", "ensemble.pt2", "--out", "r-dverge"],
    "report_raw_isp": ["report", "--defense", "raw_isp:random", "--out", "r-raw-isp"],
}
OUTPUT = {
    "distill": "student.pt2",
    "distill_t1": "plain.pt2",
    "dverge": "ensemble.pt2",
    "report_distill": "r-distill/report.json",
    "report_dverge": "r-dverge/report.json",
    "report_raw_isp": "r-raw-isp/report.json",
}
# defense name in the table -> (its training steps, its report step)
DEFENSES = {
    "distillation": (["distill", "distill_t1"], "report_distill"),
    "dverge": (["dverge"], "report_dverge"),
    "raw_isp_random": ([], "report_raw_isp"),
}


def bastion_command() -> list[str]:
    """The installed `bastion` entry point beside this Python (else `python -m`)."""
    script = Path(sys.executable).parent / "bastion"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bastion.cli"]


def run_step(name: str, args: list[str], work: Path) -> dict[str, Any]:
    """Run one command in `work`; its wall and CPU seconds, the load before and after, the
    commit (HEAD as it ended) and its last output lines."""
    load_before = [round(v, 2) for v in os.getloadavg()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [*bastion_command(), *args, "--quiet"], cwd=work, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: `bastion {' '.join(args)}` exited {proc.returncode}")
    return {
        "command": "bastion " + " ".join(args),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(
            after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1
        ),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "commit": git_commit(),
        "output": proc.stdout.strip().splitlines()[-3:],
    }


def test_accuracy(output: list[str]) -> dict[str, float]:
    """The held-out accuracies a `bastion defend` command prints: `test accuracy A (NAME
    B)` as {"model": A, NAME: B} (the teacher, the baseline ensemble)."""
    found = re.search(r"test accuracy (\d\.\d+)(?: \(([a-z ]+) (\d\.\d+)\))?", " ".join(output))
    if not found:
        return {}
    out = {"model": float(found[1])}
    if found[2]:
        out[found[2]] = float(found[3])
    return out


def defense_entry(work: Path, steps: dict[str, Any], name: str) -> dict[str, Any]:
    """One defense's row of the table from its report.json (and undefended/report.json)."""
    training, report_step = DEFENSES[name]
    folder = work / Path(OUTPUT[report_step]).parent
    report = json.loads((folder / "report.json").read_text())
    before = folder / "undefended" / "report.json"
    undefended = json.loads(before.read_text()) if before.exists() else None
    table = report["defense"]
    return {
        "defense": table["defense"],
        "n": report["robust_accuracy_n"],
        "clean_undefended": undefended["clean_accuracy"] if undefended else None,
        "clean_defended": report["clean_accuracy"],
        "threats": [
            {k: row[k] for k in ("threat", "n", "undefended", "defended", "adaptive")}
            for row in table["rows"]
        ],
        "undefended_by": table["undefended_by"],
        "adaptive_by": table["note"],
        "training": {
            s: {**steps[s], "test_accuracy": test_accuracy(steps[s]["output"])} for s in training
        },
        "report": steps[report_step],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work folder (outside the repo)")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run")
    parser.add_argument("--n", type=int, default=200, help="report samples (distill, DVERGE)")
    parser.add_argument("--n-raw-isp", type=int, default=100, help="report samples (RAW-ISP)")
    parser.add_argument("--out", type=Path, default=RESULTS / "defense_table.json")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BASTION_CACHE"] = str(work / "cache")  # a clean machine's cache
    record_path = work / "steps.json"
    steps: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
    for name in args.steps.split(","):
        if name not in STEPS:
            raise SystemExit(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        if (work / OUTPUT[name]).exists() and name in steps:
            print(f"{name}: done before ({steps[name]['wall_seconds']} s), skipped")
            continue
        cmd = list(STEPS[name])
        if cmd[0] == "report":
            shutil.rmtree(work / Path(OUTPUT[name]).parent, ignore_errors=True)
            cmd += ["--n", str(args.n_raw_isp if name == "report_raw_isp" else args.n)]
        print(f"{name}: bastion {' '.join(cmd)}", flush=True)
        steps[name] = run_step(name, cmd, work)
        print(f"{name}: {steps[name]['wall_seconds']} s wall, {steps[name]['cpu_seconds']} s CPU")
        write_json(record_path, steps)
    if not all(s in steps for s in STEPS):
        print("not every step has run yet; results not written")
        return 0
    doc = {
        "machine": machine(),
        "commit": git_commit(),
        "defaults": "every command's defaults (digits, the quick suite, seed 0, one torch "
        "thread); --n as given",
        "n": {"distillation": args.n, "dverge": args.n, "raw_isp_random": args.n_raw_isp},
        "defenses": {name: defense_entry(work, steps, name) for name in DEFENSES},
    }
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
