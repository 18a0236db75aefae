"""RAW camera-ISP preprocessing: round-trip fidelity and robustness (spec §5.2–5.4).

1. Round-trip PSNR of `RawISP` on scikit-image photos, per demosaicing algorithm.
2. On the CIFAR-10 subset and on MNIST, a small CNN trained on clean images (undefended),
   then wrapped with `RawISP().wrap(model)` (no retraining, as in the paper): clean
   accuracy with and without the defense; robust accuracy under FGSM and PGD transferred
   from the undefended model (the attacker ignores the defense); and under adaptive PGD
   (the attacker knows it): BPDA (identity backward, Athalye et al. 2018), exact gradients
   through the torch ISP, and BPDA + EOT (logits averaged over 8 draws) against the
   randomised defense. Writes `benchmarks/results/raw_isp_eval.json`.

    OMP_NUM_THREADS=1 python benchmarks/raw_isp_eval.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import skimage.data
import torch
from _harness import data_root, mnist_spec, write_json
from torch import nn

from bastion.attacks import FGSM, PGD
from bastion.data import Dataset, load_data
from bastion.defenses import RawISP
from bastion.defenses.bayer import DEMOSAIC
from bastion.defenses.distillation import DistillationCNN, soft_labels
from bastion.zoo import train_classifier

OUT = Path(__file__).parent / "results" / "raw_isp_eval.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
EOT_SAMPLES = 8
TASKS = {
    "cifar10-subset": {
        "data": f"npz:{data_root() / 'cifar10' / 'cifar10_subset.npz'}",
        "eps": (2 / 255, 8 / 255),
        "epochs": 15,
    },
    "mnist": {"data": mnist_spec(), "eps": (0.1, 0.2), "epochs": 3, "n_train": 6000},
}


class EOT(nn.Module):
    """Expectation over transformation: the mean logits over `samples` calls of a random model."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model = model
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def round_trip() -> dict[str, dict[str, float]]:
    """PSNR (dB) of RawISP(x) against x per photo and demosaicing algorithm."""
    rows: dict[str, dict[str, float]] = {}
    for name in PHOTOS:
        img = torch.from_numpy(getattr(skimage.data, name)()).float() / 255
        x = img.permute(2, 0, 1)[None] if img.dim() == 3 else img[None, None]
        rows[name] = {d: _psnr(RawISP(demosaic=d)(x), x) for d in DEMOSAIC}
        rows[name]["malvar, randomized"] = _psnr(RawISP(randomize=True)(x), x)
    return rows


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((soft_labels(model, x, 1.0, batch_size=250).argmax(1) == y).float().mean())


def robustness(name: str, task: dict[str, Any], n_test: int, quick: bool) -> dict[str, Any]:
    """Clean and robust accuracy of one small CNN with and without the defense."""
    split = "#train" if task["data"].startswith("npz:") else ""
    train = load_data(task["data"] + split, split="train", n=task.get("n_train"))
    test_spec = task["data"] + ("#test" if split else "")
    test: Dataset = load_data(test_spec, split="test", n=n_test)
    c, h, w = train.x.shape[1:]
    model = DistillationCNN(c, (h, w), 10, width=16, hidden=128)
    epochs = 1 if quick else task["epochs"]
    recipe = {"seed": 0, "epochs": epochs, "batch_size": 64, "lr": 1e-3}
    start = time.perf_counter()
    train_classifier(model, train, recipe)
    row: dict[str, Any] = {"train_samples": len(train), "epochs": epochs}
    row["train_seconds"] = time.perf_counter() - start
    defended = RawISP().wrap(model).eval()
    randomized = RawISP(randomize=True, seed=0).wrap(model).eval()
    x, y = test.x, test.y
    row["clean"] = {
        "undefended": _accuracy(model, x, y),
        "raw_isp": _accuracy(defended, x, y),
        "raw_isp_randomized": _accuracy(randomized, x, y),
    }
    steps = 5 if quick else 20
    adaptive = {
        "pgd_bpda": RawISP(bpda=True).wrap(model),
        "pgd_exact_gradient": defended,
        "pgd_bpda_eot": EOT(RawISP(randomize=True, seed=1, bpda=True).wrap(model), EOT_SAMPLES),
    }
    row["robust"] = {}
    for eps in task["eps"]:
        fgsm = FGSM(eps)(model, x, y).x_adv
        pgd = PGD(eps, steps=steps)(model, x, y).x_adv
        entry: dict[str, float] = {
            "fgsm_undefended": _accuracy(model, fgsm, y),
            "pgd_undefended": _accuracy(model, pgd, y),
            "fgsm_transfer_raw_isp": _accuracy(defended, fgsm, y),
            "pgd_transfer_raw_isp": _accuracy(defended, pgd, y),
            "pgd_transfer_raw_isp_randomized": _accuracy(randomized, pgd, y),
        }
        for attack_name, target in adaptive.items():
            x_adv = PGD(eps, steps=steps)(target, x, y).x_adv
            judged = randomized if attack_name.endswith("eot") else defended
            suffix = "_randomized" if attack_name.endswith("eot") else ""
            entry[f"{attack_name}_raw_isp{suffix}"] = _accuracy(judged, x_adv, y)
        row["robust"][f"{eps:.4g}"] = entry
        print(f"{name} eps {eps:.4g}: {entry}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    n_test = 64 if args.quick else 250
    config = {
        "model": "DistillationCNN(width=16, hidden=128), Adam lr 1e-3, batch 64, seed 0",
        "test_samples": n_test,
        "pgd": "PGD L∞, 20 steps, rel. step 2.5/steps, random start, seed 0",
        "eot_samples": EOT_SAMPLES,
        "defense": "RawISP() defaults: mean metadata, Malvar, highlight protection, no noise; "
        "randomized: RawISP(randomize=True) (metadata + shot/read noise per call)",
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }
    start = time.perf_counter()
    results: dict[str, Any] = {"round_trip_psnr_db": round_trip()}
    print(
        f"{'photo':10} " + " ".join(f"{k:>20}" for k in next(iter(results.values()))["astronaut"])
    )
    for photo, r in results["round_trip_psnr_db"].items():
        print(f"{photo:10} " + " ".join(f"{v:20.2f}" for v in r.values()))
    for name, task in TASKS.items():
        results[name] = robustness(name, task, n_test, args.quick)
        print(f"{name}: clean {results[name]['clean']}", flush=True)
    config["load_average_end"] = os.getloadavg()
    config["seconds"] = time.perf_counter() - start
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        write_json(OUT, {"config": config, "results": results})
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
