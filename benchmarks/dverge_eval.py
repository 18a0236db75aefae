"""DVERGE against baseline ensembles at CPU scale: transfer robustness and transferability.

For each seed: an ensemble of `members` SmallCNNs trained normally (the baseline), and a
DVERGE ensemble fine-tuned from those same sub-models by `bastion.defenses.dverge.train`
with a short schedule. Transfer attacks are L∞ PGD (no early stop) crafted on one
independently trained baseline ensemble (the surrogate, its own seeds); robust accuracy
is the target ensemble's accuracy on those images (clean errors count as failures). Also:
white-box PGD at the smallest eps, and the matrix M[i, j] of PGD examples of sub-model i
that fool sub-model j. Prints a table and writes JSON (mean ± std over seeds).

    python benchmarks/dverge_eval.py [--quick] [--out benchmarks/results/dverge_eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bastion.attacks import PGD
from bastion.data import Dataset, load_data
from bastion.defenses import dverge
from bastion.defenses.model_families import CIFAR_MEAN, CIFAR_STD, SmallCNN
from bastion.normalized import Normalized
from bastion.zoo import train_classifier

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10_subset.npz"
CONFIG: dict[str, Any] = {
    "data": f"npz:{DATA}",
    "n_train": 2048,
    "n_test": 300,
    "width": 8,
    "members": 3,
    "seeds": [0, 1],
    "surrogate_seed": 100,
    "baseline": {"epochs": 15, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4},
    "dverge": {"epochs": 6, "batch_size": 128, "lr": 0.01, "milestones": []},
    "eps": [0.01, 0.02, 0.03, 0.05],
    "pgd_steps": 10,
    "matrix_eps": 0.03,
}
QUICK = {"n_train": 256, "n_test": 64, "members": 2, "seeds": [0]}


def baseline_members(train: Dataset, seed: int, cfg: dict[str, Any]) -> list[torch.nn.Module]:
    """`members` normally trained sub-models (Adam, no augmentation), seeds 10·seed + k."""
    models = []
    for k in range(cfg["members"]):
        model = Normalized(SmallCNN(width=cfg["width"]), CIFAR_MEAN, CIFAR_STD)
        train_classifier(model, train, {**cfg["baseline"], "seed": 10 * seed + k})
        models.append(model)
    return models


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def evaluate(
    ens: dverge.Ensemble, adv: dict[float, torch.Tensor], test: Dataset, cfg: dict[str, Any]
) -> dict[str, Any]:
    """Clean, transfer and white-box accuracy of `ens`, and its sub-models' matrix."""
    x, y = test.x, test.y
    with torch.no_grad():
        right = ens(x).argmax(1) == y
    small = cfg["eps"][0]
    white = PGD(small, steps=cfg["pgd_steps"], early_stop=False)(ens, x, y)
    matrix_attack = PGD(cfg["matrix_eps"], steps=cfg["pgd_steps"], early_stop=False)
    matrix = dverge.transfer_matrix(list(ens.members), x, y, matrix_attack)
    n = len(ens.members)
    return {
        "clean": accuracy(ens, x, y),
        "members_clean": [accuracy(m, x, y) for m in ens.members],
        "transfer": {str(e): accuracy(ens, a, y) for e, a in adv.items()},
        # of the samples the ensemble gets right clean, the fraction it still gets right
        "transfer_kept": {str(e): accuracy(ens, a[right], y[right]) for e, a in adv.items()},
        "whitebox": {str(small): float((white.pred_adv == y).float().mean())},
        "matrix": matrix.tolist(),
        "mean_offdiagonal_transfer": float((matrix.sum() - matrix.diag().sum()) / (n * n - n)),
    }


def summarise(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> str:
    values = [r[key][sub] if sub else r[key] for r in runs]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1")
    parser.add_argument("--out", default="benchmarks/results/dverge_eval.json")
    args = parser.parse_args()
    cfg = {**CONFIG, **(QUICK if args.quick else {})}
    if args.seeds:
        cfg["seeds"] = args.seeds
    load_before = os.getloadavg()
    start = time.perf_counter()
    train = load_data(f"{cfg['data']}#train").subset(cfg["n_train"])
    test = load_data(f"{cfg['data']}#test").subset(cfg["n_test"])
    surrogate = dverge.Ensemble(baseline_members(train, cfg["surrogate_seed"], cfg)).eval()
    adv = {
        e: PGD(e, steps=cfg["pgd_steps"], early_stop=False)(surrogate, test.x, test.y).x_adv
        for e in cfg["eps"]
    }
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "dverge": []}
    timing: dict[str, float] = {"baseline": 0.0, "dverge": 0.0}
    for seed in cfg["seeds"]:
        t = time.perf_counter()
        members = baseline_members(train, seed, cfg)
        timing["baseline"] += time.perf_counter() - t
        t = time.perf_counter()
        trained = dverge.train(members, train, seed=seed, **cfg["dverge"])
        timing["dverge"] += time.perf_counter() - t
        results["baseline"].append(evaluate(dverge.Ensemble(members).eval(), adv, test, cfg))
        results["dverge"].append(evaluate(trained, adv, test, cfg))
    record = {
        "config": cfg,
        "surrogate_clean": accuracy(surrogate, test.x, test.y),
        "results": results,
        "train_seconds": timing,
        "seconds": time.perf_counter() - start,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"surrogate ensemble clean accuracy {record['surrogate_clean']:.3f}")
    rows = [("clean accuracy", "clean", None)]
    rows += [(f"transfer acc @ {e}", "transfer", str(e)) for e in cfg["eps"]]
    rows += [(f"  kept of clean @ {e}", "transfer_kept", str(e)) for e in cfg["eps"]]
    rows += [(f"white-box PGD @ {cfg['eps'][0]}", "whitebox", str(cfg["eps"][0]))]
    rows += [(f"sub→sub transfer @ {cfg['matrix_eps']}", "mean_offdiagonal_transfer", None)]
    print(f"{'mean ± std over seeds ' + str(cfg['seeds']):34} {'baseline':>15} {'dverge':>15}")
    for label, key, sub in rows:
        cells = [summarise(results[name], key, sub) for name in ("baseline", "dverge")]
        print(f"{label:34} " + " ".join(f"{c:>15}" for c in cells))
    print(f"{record['seconds']:.0f} s, load {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
