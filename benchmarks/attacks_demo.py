"""Wall time and quality of Bastion's attacks on the embedded demo CNN (digits, 1×8×8).

FGSM and PGD (L∞, eps 0.1, 40 steps) on a batch of 256, CW-L2 on a batch of 64 with
100 iterations × 1 binary step and with the suite's fast profile (5 × 1,000), each batch
the first test digits the model classifies correctly (as `attacks_vs_peers.py` takes them,
so the pass counts compare). Each figure is the median of `--repeat` runs after a warm-up.
Prints a table and writes JSON (the machine record through `_harness`).

    python benchmarks/attacks_demo.py [--repeat 5] [--out benchmarks/results/attacks_demo.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import correctly_classified, machine, write_json

from bastion.attacks import FGSM, PGD, CarliniWagnerL2
from bastion.data import load_data
from bastion.zoo import demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/attacks_demo.json")
    args = parser.parse_args()
    model = demo_model()
    data = load_data("digits", split="test")
    cases = [
        ("FGSM L∞ 0.1", FGSM(0.1), 256),
        ("PGD L∞ 0.1 × 40", PGD(0.1, steps=40), 256),
        ("PGD L∞ 0.1 × 40, no early stop", PGD(0.1, steps=40, early_stop=False), 256),
        ("CW-L2 100 × 1", CarliniWagnerL2(binary_search_steps=1, max_iterations=100), 64),
        ("CW-L2 fast (5 × 1,000)", CarliniWagnerL2.fast(), 64),
    ]
    rows = []
    for name, attack, batch in cases:
        x, y, _ = correctly_classified(model, data.x, data.y, batch)
        attack(model, x, y)  # warm-up
        times, result = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = attack(model, x, y)
            times.append(time.perf_counter() - start)
        assert result is not None
        ok = result.success & (result.pred_clean == y)
        rows.append(
            {
                "attack": name,
                "batch": batch,
                "median_seconds": statistics.median(times),
                "success_rate": result.success_rate,
                "mean_l2": float(result.distances["l2"][ok].mean()) if ok.any() else None,
                "forward": int(result.queries.sum()),
                "backward": int(result.gradients.sum()),
            }
        )
    print(
        f"{'attack':34} {'batch':>5} {'median s':>9} {'success':>8} {'mean L2':>8} "
        f"{'fwd':>7} {'bwd':>7}"
    )
    for r in rows:
        l2 = f"{r['mean_l2']:.3f}" if r["mean_l2"] is not None else "–"
        print(
            f"{r['attack']:34} {r['batch']:5d} {r['median_seconds']:9.3f} "
            f"{r['success_rate']:8.3f} {l2:>8} {r['forward']:7d} {r['backward']:7d}"
        )
    write_json(args.out, {"machine": machine(), "repeat": args.repeat, "results": rows})


if __name__ == "__main__":
    main()
