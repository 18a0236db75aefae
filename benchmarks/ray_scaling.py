"""Ray scale-out on this machine: the quick suite in one process, on 1 and on 2 Ray workers.

Each run is the demo model (the embedded default, CPU) on the digits test split with torch
at 1 thread per process; the same seed, so the three reports must agree in every number
but the timings (checked here too). Reported: wall time of `run_suite` (Ray start-up
excluded, measured apart), the 2-worker speed-up over 1 worker and over one process, the
share of the run that is not item work (clean pass, sanity checks, gallery, report: serial
on the driver), and Ray's per-task overhead: a no-op item's round trip (one at a time) and
its cost in a stream of 200 (submitted together), against the mean compute time of an item.
Then the machine's own ceiling, without Ray: an attack loop in 2 plain processes at once
against 1 (items per second), which bounds what any 2 workers can reach here.

    python benchmarks/ray_scaling.py [--n 128] [--batch-size 16] [--niceness 0] [--out F] [--resume]

`--niceness` is the Ray workers' nice value (RayExecutor's default 0, as the driver; Ray's
own default is 15, which on a machine shared with other jobs leaves the workers a fraction
of a core).

Results are written after each configuration; `--resume` skips the ones in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _harness import write_json

from bastion.data import load_data
from bastion.suites.executor import Outcome, Progress, WorkEnv
from bastion.suites.report_model import without_timings
from bastion.suites.runner import run_suite
from bastion.zoo import demo_model

RESULTS = Path(__file__).resolve().parent / "results" / "ray_scaling.json"


@dataclass(frozen=True)
class NoOp:
    """An item that computes nothing: what Ray alone costs per task."""

    key: str
    indices: tuple[int, ...] = ()

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        return Outcome({"kind": "noop"})


def run(workers: int | None, n: int, batch: int, niceness: int = 0) -> dict[str, Any]:
    """One quick-suite run: in process (`workers` None) or on a fresh local Ray."""
    from bastion.suites.ray_executor import RayExecutor

    model, data = demo_model(), load_data("digits")
    executor = RayExecutor(workers=workers, niceness=niceness) if workers else None
    load_before = os.getloadavg()
    startup = 0.0
    if executor is not None:
        t = time.perf_counter()
        executor.start()
        startup = time.perf_counter() - t
    try:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            report = run_suite(
                model, data, "quick", n=n, batch_size=batch, out=out, executor=executor
            )
            wall = time.perf_counter() - t
            lines = (Path(out) / "results.jsonl").read_text().splitlines()
            items = [r for r in map(json.loads, lines) if r.get("kind") == "attack"]
        overhead = _overhead(executor) if executor is not None else None
    finally:
        if executor is not None:
            executor.shutdown()
    item_seconds = [r["seconds"] for r in items]
    return {
        "workers": workers,
        "wall_seconds": wall,
        "ray_startup_seconds": startup,
        "items": len(items),
        "item_seconds_sum": sum(item_seconds),
        "item_seconds_mean": statistics.mean(item_seconds),
        # every number of report.json but the timings, hashed: equal hashes, equal reports
        "report_sha256": hashlib.sha256(
            json.dumps(without_timings(json.loads(report.to_json())), sort_keys=True).encode()
        ).hexdigest(),
        "task_overhead": overhead,
        "worker_niceness": niceness if workers else None,
        "load_before": load_before,
        "load": os.getloadavg(),
    }


def _overhead(executor: Any, tasks: int = 200) -> dict[str, float]:
    """Ms per no-op task: one at a time (round trip), 200 submitted together, and 200
    submitted together that each name a sample (so a data shard goes with each)."""
    model, data = demo_model(), load_data("digits")
    session = executor.session(WorkEnv.of(model, data, torch.device("cpu")))
    # every worker started and holding the environment: the steady state, not the start-up
    list(session.map([NoOp(f"warm{i}", (i,)) for i in range(tasks)]))
    t = time.perf_counter()
    for i in range(20):
        list(session.map([NoOp(str(i))]))
    one = (time.perf_counter() - t) / 20
    t = time.perf_counter()
    list(session.map([NoOp(str(i)) for i in range(tasks)]))
    stream = (time.perf_counter() - t) / tasks
    t = time.perf_counter()  # each reading one sample: its data shard is a task argument
    list(session.map([NoOp(str(i), (i,)) for i in range(tasks)]))
    shard = (time.perf_counter() - t) / tasks
    session.close()
    return {"round_trip_ms": one * 1e3, "streamed_ms": stream * 1e3, "with_shard_ms": shard * 1e3}


def _spin(seconds: float, out: Any) -> None:
    """PGD (10 steps) on 16 digits of the demo model, over and over for `seconds`: how many."""
    torch.set_num_threads(1)
    from bastion.attacks import PGD

    model, data = demo_model(), load_data("digits")
    x, y = data.x[:16], data.y[:16]
    attack, done = PGD(eps=0.1, steps=10), 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        attack(model, x, y)
        done += 1
    out.put(done)


def ceiling(seconds: float = 20.0) -> dict[str, Any]:
    """What this machine gives two busy processes over one, without Ray: the same attack
    loop in 1 and then 2 plain processes at once, items per second in all."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates = {}
    for procs in (1, 2):
        out = ctx.Queue()
        started = [ctx.Process(target=_spin, args=(seconds, out)) for _ in range(procs)]
        load = os.getloadavg()
        for proc in started:
            proc.start()
        counts = [out.get() for _ in started]
        for proc in started:
            proc.join()
        rates[procs] = {"items_per_second": sum(counts) / seconds, "load_before": load}
    return {
        "seconds": seconds,
        "one": rates[1],
        "two": rates[2],
        "ratio": rates[2]["items_per_second"] / rates[1]["items_per_second"],
        "load": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--niceness", type=int, default=0, help="the Ray workers' nice value")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    if args.resume and args.out.exists():
        results = json.loads(args.out.read_text())
    results.update(n=args.n, batch_size=args.batch_size, threads=1, suite="quick")
    for name, workers in (("process", None), ("ray_1", 1), ("ray_2", 2)):
        if name in results.get("runs", {}):
            continue
        print(f"{name} …", file=sys.stderr, flush=True)
        results.setdefault("runs", {})[name] = run(workers, args.n, args.batch_size, args.niceness)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, results, indent=1)
    if "ceiling" not in results:  # two plain processes against one: the machine's own limit
        print("ceiling …", file=sys.stderr, flush=True)
        results["ceiling"] = ceiling()
        write_json(args.out, results, indent=1)
    runs = results["runs"]
    same = len({r["report_sha256"] for r in runs.values()}) == 1
    p1, r1, r2 = (runs[k]["wall_seconds"] for k in ("process", "ray_1", "ray_2"))
    serial = p1 - runs["process"]["item_seconds_sum"]
    results["summary"] = {
        "reports_identical": same,
        "speedup_2_vs_1_worker": r1 / r2,
        "speedup_2_workers_vs_process": p1 / r2,
        "not_item_work_seconds": serial,
        "not_item_work_share": serial / p1,
        "task_overhead_ms": runs["ray_2"]["task_overhead"],
        "item_mean_ms": runs["process"]["item_seconds_mean"] * 1e3,
        "plain_processes_2_vs_1": results["ceiling"]["ratio"],
    }
    write_json(args.out, results, indent=1)
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
