"""What the harness costs: `run_suite` (quick suite, report written) vs the bare attacks.

The bare run does what the suite's checks do and nothing else: for every check and eps,
the attack on the correctly classified samples in batches of 128 (cascade checks only on
the samples no earlier eps broke), with the same seeds and dataset indices. The harness run
adds the clean pass, the results log, the sanity checks, the gallery and the report
(JSON + HTML). Overhead = harness / bare − 1, also without the sanity checks (which are a
feature, not bookkeeping: they re-run PGD at L∞ 0.5 and a gradient probe).

    python benchmarks/harness_overhead.py [--repeat 3] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from _harness import write_json

from bastion.data import load_data
from bastion.suites.runner import run_suite
from bastion.suites.sanity import run_sanity_checks
from bastion.suites.suite import load_suite
from bastion.zoo import demo_model


def bare(model: torch.nn.Module, data: Any, suite: Any, batch: int, seed: int) -> float:
    """The suite's attacks alone, as the runner schedules them."""
    start = time.perf_counter()
    with torch.no_grad():
        correct = model(data.x).argmax(1) == data.y
    broken: dict[str, torch.Tensor] = {}
    for check in suite.checks:
        n = min(check.n or len(data), len(data))
        gone = broken.setdefault(check.norm, torch.full((len(data),), math.inf))
        eps_list = sorted(check.eps) if check.spec.bounded else [None]
        for eps in eps_list:
            attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=seed)
            for s in range(0, n, batch):
                idx = torch.arange(s, min(s + batch, n))
                todo = idx[correct[idx]]
                if check.cascade and eps is not None:
                    todo = todo[~(gone[todo] <= eps)]
                if not len(todo):
                    continue
                result = attack(model, data.x[todo], data.y[todo], indices=todo)
                hit = todo[result.success]
                gone[hit] = torch.minimum(gone[hit], torch.tensor(eps if eps else 0.0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/harness_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, data = demo_model(), load_data("digits")
    suite = load_suite("quick")
    bare(model, data, suite, 128, 0)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "harness": [], "sanity": []}
    for _ in range(args.repeat):  # interleaved, so drift hits both alike
        times["bare"].append(bare(model, data, suite, 128, 0))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run_suite(model, data, suite, out=out, batch_size=128, seed=0)
            times["harness"].append(time.perf_counter() - start)
        with torch.no_grad():
            correct = model(data.x).argmax(1) == data.y
        start = time.perf_counter()
        run_sanity_checks(model, data, correct, 128, torch.device("cpu"), 0)
        times["sanity"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "suite": "quick",
        "model": "demo (digits CNN)",
        "samples": len(data),
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "seconds": times,
        "median_seconds": med,
        "overhead": med["harness"] / med["bare"] - 1,
        "overhead_without_sanity": (med["harness"] - med["sanity"]) / med["bare"] - 1,
    }
    write_json(args.out, result)
    print(
        f"bare attacks {med['bare']:.2f} s · run_suite {med['harness']:.2f} s "
        f"(sanity checks {med['sanity']:.2f} s) · overhead {result['overhead']:+.1%}, "
        f"without the sanity checks {result['overhead_without_sanity']:+.1%} "
        f"(load {os.getloadavg()[0]:.2f}) → {args.out}"
    )


if __name__ == "__main__":
    main()
