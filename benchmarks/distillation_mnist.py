"""Defensive distillation on MNIST: FGSM is masked, FGSM on Z/T and CW-L2 are not (spec §7.2–7.5).

Trains, for T in {1, 20, 100}, a teacher and a student with `bastion.defenses.distill`
(the T = 1 teacher is the undistilled baseline: plain training, same budget), then measures
on the MNIST test set: clean accuracy; FGSM robust accuracy on the deployed model (T = 1);
FGSM on the logits divided by T (`TemperatureScaled`); FGSM transferred from the undistilled
model; CW-L2 success rate and mean L2 (reduced budget); the logit margin; and the harness's
sanity flags. Writes `benchmarks/results/distillation_mnist.json`.

    OMP_NUM_THREADS=1 python benchmarks/distillation_mnist.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from _harness import mnist_spec, write_json
from torch import nn

from bastion.attacks import FGSM, CarliniWagnerL2
from bastion.data import load_data
from bastion.defenses.distillation import DistillationCNN, TemperatureScaled, distill, soft_labels
from bastion.suites.sanity import run_sanity_checks

DATA = mnist_spec()
TEMPERATURES = (1, 20, 100)
EPS = (0.05, 0.1, 0.2, 0.3)
OUT = Path(__file__).parent / "results" / "distillation_mnist.json"


def _accuracy_under(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    return float((soft_labels(model, x_adv, 1.0).argmax(1) == y).float().mean())


def evaluate(
    model: nn.Module,
    temperature: float,
    test: Any,
    cw_n: int,
    cw: CarliniWagnerL2,
    transfer: dict[float, torch.Tensor],
) -> dict[str, Any]:
    """Every figure of the table for one deployed model."""
    x, y = test.x, test.y
    with torch.no_grad():
        raw = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])
    top2 = raw.topk(2, dim=1).values
    correct = raw.argmax(1) == y
    flags, measured = run_sanity_checks(model, test, correct, 128, torch.device("cpu"), 0)
    row: dict[str, Any] = {
        "clean_accuracy": float(correct.float().mean()),
        "median_logit_margin": float((top2[:, 0] - top2[:, 1]).median()),
        # softmax(Z) of the top class is exactly 1 in float32: the gradient of CE vanishes
        "saturated_softmax": float((raw.log_softmax(1).max(1).values == 0).float().mean()),
        "fgsm": {},
        "fgsm_on_logits_over_T": {},
        "fgsm_transfer_from_undistilled": {},
        "sanity_flags": [f.name for f in flags],
        "zero_gradient_samples": measured.get("zero_gradient_samples"),
        "large_eps_accuracy": measured.get("large_eps_accuracy"),
    }
    scaled = TemperatureScaled(model, temperature)
    for eps in EPS:
        row["fgsm"][eps] = 1 - FGSM(eps)(model, x, y).success_rate
        row["fgsm_on_logits_over_T"][eps] = _accuracy_under(model, FGSM(eps)(scaled, x, y).x_adv, y)
        if eps in transfer:
            row["fgsm_transfer_from_undistilled"][eps] = _accuracy_under(model, transfer[eps], y)
    start = time.perf_counter()
    res = cw(model, x[:cw_n], y[:cw_n])
    attacked = res.pred_clean == y[:cw_n]
    broken = res.success & attacked
    row["cw"] = {
        "samples": cw_n,
        "attacked": int(attacked.sum()),
        "success_rate": float(broken.sum() / attacked.sum().clamp_min(1)),
        "mean_l2": float(res.distances["l2"][broken].mean()) if broken.any() else None,
        "median_l2": float(res.distances["l2"][broken].median()) if broken.any() else None,
        "seconds": time.perf_counter() - start,
    }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    args = parser.parse_args()
    n_train, n_test, cw_n, epochs = (1000, 200, 20, 1) if args.quick else (6000, 1000, 60, 3)
    cw = CarliniWagnerL2(binary_search_steps=8, max_iterations=200)
    train = load_data(DATA, split="train", n=n_train)
    test = load_data(DATA, split="test", n=n_test)

    def build() -> nn.Module:
        return DistillationCNN(1, (28, 28), 10, width=16, hidden=100)

    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=3e-3)

    config = {
        "data": DATA,
        "train_samples": n_train,
        "test_samples": n_test,
        "architecture": "DistillationCNN(width=16, hidden=100): conv16-16-pool-32-32-pool-fc100-"
        "dropout-fc100-10",
        "optimizer": "Adam lr 3e-3, batch 64",
        "epochs": f"1 init + {epochs} teacher + {epochs} student (seed 0)",
        "fgsm_eps": list(EPS),
        "cw": "CarliniWagnerL2(binary_search_steps=8, max_iterations=200), other defaults "
        "(reduced from 9 × 10,000)",
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    start = time.perf_counter()
    rows: dict[str, Any] = {}
    transfer: dict[float, torch.Tensor] = {}
    for t in TEMPERATURES:
        t0 = time.perf_counter()
        result = distill(
            build, train, temperature=t, epochs=epochs, batch_size=64, optimizer=adam, seed=0
        )
        train_seconds = time.perf_counter() - t0
        if t == 1:
            transfer = {eps: FGSM(eps)(result.teacher, test.x, test.y).x_adv for eps in EPS}
            rows["undistilled"] = evaluate(result.teacher, 1, test, cw_n, cw, transfer)
            rows["undistilled"]["train_seconds"] = train_seconds
        rows[f"distilled T={t}"] = evaluate(result.student, t, test, cw_n, cw, transfer)
        rows[f"distilled T={t}"]["train_seconds"] = train_seconds
        clean = rows[f"distilled T={t}"]["clean_accuracy"]
        print(
            f"T={t}: student clean accuracy {clean:.3f}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    config["load_average_end"] = os.getloadavg()
    config["seconds"] = time.perf_counter() - start
    header = (
        f"{'model':18} {'clean':>6} {'margin':>8} "
        + " ".join(f"{'FGSM' + str(e):>9}" for e in EPS)
        + " "
        + " ".join(f"{'Z/T' + str(e):>8}" for e in EPS)
        + f" {'xfer0.1':>8} {'CW succ':>8} {'CW L2':>6}  flags"
    )
    print(header)
    for name, r in rows.items():
        print(
            f"{name:18} {r['clean_accuracy']:6.3f} {r['median_logit_margin']:8.1f} "
            + " ".join(f"{r['fgsm'][e]:9.3f}" for e in EPS)
            + " "
            + " ".join(f"{r['fgsm_on_logits_over_T'][e]:8.3f}" for e in EPS)
            + f" {r['fgsm_transfer_from_undistilled'].get(0.1, float('nan')):8.3f}"
            + f" {r['cw']['success_rate']:8.3f} {r['cw']['mean_l2'] or float('nan'):6.2f}"
            + f"  {','.join(r['sanity_flags']) or '-'}"
        )
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        write_json(OUT, {"config": config, "results": rows})
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
