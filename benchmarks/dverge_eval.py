"""DVERGE against baseline ensembles at CPU scale: transfer robustness and transferability.

For each seed: an ensemble of `members` SmallCNNs trained normally (the baseline), and a
DVERGE ensemble fine-tuned from those same sub-models by `bastion.defenses.dverge.train`
with a short schedule. Transfer attacks are L∞ PGD (no early stop) crafted on one
independently trained baseline ensemble (the surrogate, its own seeds); robust accuracy
is the target ensemble's accuracy on those images (clean errors count as failures). Also:
white-box PGD at the smallest eps, and the matrix M[i, j] of PGD examples of sub-model i
that fool sub-model j. Prints a table and writes JSON (mean ± std over seeds).

    python benchmarks/dverge_eval.py [--quick] [--out benchmarks/results/dverge_eval.json]

`--recipe digits` or `--recipe mnist` instead runs `bastion defend dverge`'s recipe (3
SmallCNNs of width 16, Adam baseline, DVERGE at lr 0.01 with the lr milestones at 1/2 and
3/4 of the epochs, no augmentation) on that data, and evaluates with the paper's transfer
attacks (`bastion.attacks.transfer`: M-PGD with 3 random starts and M-DI²-FGSM, CE and CW,
100 steps; SGM needs a ResNet surrogate and is left out) from an independently trained
baseline ensemble; it reports each sub-model's clean accuracy against the baseline's.

    python benchmarks/dverge_eval.py --recipe digits   # the CLI defaults, 20 + 20 epochs
    python benchmarks/dverge_eval.py --recipe mnist    # 5,000 MNIST images, 10 + 6 epochs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _harness import data_root, write_json

from bastion.attacks import PGD
from bastion.data import Dataset, load_data
from bastion.defenses import dverge
from bastion.defenses.model_families import CIFAR_MEAN, CIFAR_STD, SmallCNN
from bastion.normalized import Normalized
from bastion.zoo import train_classifier

DATA = data_root() / "cifar10" / "cifar10_subset.npz"
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
MNIST = data_root()
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"data": "digits", "n_train": None, "n_test": None, "baseline_epochs": 20,
               "epochs": 20, "eps": [0.05, 0.1, 0.15]},
    "mnist": {"data": f"mnist:{MNIST}", "n_train": 5000, "n_test": 500, "baseline_epochs": 10,
              "epochs": 6, "eps": [0.1, 0.2, 0.3]},
}  # fmt: skip


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


def run_recipe(name: str, out: str) -> None:
    """`bastion defend dverge`'s recipe on `name`'s data, judged by the paper's transfer
    attacks from an independent baseline ensemble (module docstring)."""
    from bastion.attacks.transfer import paper_attacks, transfer_accuracy

    cfg = RECIPES[name]
    load_before = os.getloadavg()
    start = time.perf_counter()
    train = load_data(cfg["data"], split="train", n=cfg["n_train"])
    test = load_data(cfg["data"], split="test", n=cfg["n_test"])
    c = train.x.shape[1]

    def members(seed: int) -> list[torch.nn.Module]:
        out = []
        for k in range(3):
            model = SmallCNN(c, train.num_classes)
            recipe = {"epochs": cfg["baseline_epochs"], "batch_size": 128, "lr": 1e-3}
            train_classifier(model, train, {**recipe, "seed": seed * 1000 + k})
            out.append(model)
        return out

    t = time.perf_counter()
    base = members(0)
    baseline_seconds = time.perf_counter() - t
    t = time.perf_counter()
    diverse = dverge.train(base, train, epochs=cfg["epochs"], lr=0.01)
    dverge_seconds = time.perf_counter() - t
    surrogate = dverge.Ensemble(members(7)).eval()
    baseline = dverge.Ensemble(base).eval()
    x, y = test.x, test.y
    record: dict[str, Any] = {
        "recipe": name,
        "config": cfg,
        "train_seconds": {"baseline (3 members)": baseline_seconds, "dverge": dverge_seconds},
        "baseline_members_clean": [accuracy(m, x, y) for m in base],
        "dverge_members_clean": [accuracy(m, x, y) for m in diverse.members],
        "surrogate_clean": accuracy(surrogate, x, y),
        "transfer": {},
    }
    for eps in cfg["eps"]:
        attacks = paper_attacks(eps, sgm=False)
        record["transfer"][str(eps)] = {
            "baseline": transfer_accuracy(baseline, surrogate, x, y, attacks),
            "dverge": transfer_accuracy(diverse, surrogate, x, y, attacks),
        }
        row = record["transfer"][str(eps)]
        print(
            f"eps {eps}: all-attacks accuracy baseline {row['baseline']['all']:.3f}, "
            f"dverge {row['dverge']['all']:.3f}",
            flush=True,
        )
    ratio = min(record["dverge_members_clean"]) / max(record["baseline_members_clean"])
    record["worst_member_over_best_baseline_member"] = ratio
    record.update(
        seconds=time.perf_counter() - start,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        threads=torch.get_num_threads(),
        test_samples=len(test),
    )
    print(
        f"{name}: members clean {record['dverge_members_clean']} vs baseline "
        f"{record['baseline_members_clean']} (worst/best {ratio:.3f}); train "
        f"{baseline_seconds:.0f} s + {dverge_seconds:.0f} s; load {load_before[0]:.1f}"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1")
    parser.add_argument("--out", default="benchmarks/results/dverge_eval.json")
    args = parser.parse_args()
    if args.recipe:
        out = args.out.replace("dverge_eval.json", f"dverge_{args.recipe}.json")
        run_recipe(args.recipe, out)
        return
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
    write_json(args.out, record)


if __name__ == "__main__":
    main()
