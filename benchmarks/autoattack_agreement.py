"""Bastion's AutoAttack-strength attacks against AutoAttack itself (pyautoattack), measured.

For each model and threat model, the same images go through AutoAttack's "standard"
version (APGD-CE, APGD-T on 9 targets, FAB-T on 9 targets, Square with 5,000 queries,
each on the points still robust) and through Bastion's cascade of the same attacks
(`APGD`, `APGDT`, `FAB`, `Square`), in the same process and threads, the order of the two
alternating from one model to the next. Recorded per model: clean accuracy, both robust
accuracies (and Bastion's after each stage), both wall times, n and the load average.
Results go to `benchmarks/results/autoattack_agreement.json`, one entry per
(model, threat, n) written as it finishes; a rerun skips entries already there (resumable).

Models: (a) the CIFAR-10 ResNet-18 shipped in pyautoattack (`examples/model_test.pt`,
inputs in [0, 1]); (b) the VNN-COMP 2021 `resnet2b`/`resnet4b` (inputs normalised with
the CIFAR-10 training mean/std) at L∞ 2/255 and 8/255; (c) MNIST CNNs trained here
(cached): standard, PGD adversarial training at 0.3, FGSM training at 0.3 (prone to
catastrophic overfitting) and defensive distillation at T = 100, at L∞ 0.3.

    OMP_NUM_THREADS=1 python benchmarks/autoattack_agreement.py --models mnist-standard \\
        mnist-fgsm-at --n 100 [--data-root ../shared/data] [--via-suite]

`--via-suite` runs Bastion through `bastion.run_suite(..., suite="autoattack")` once the
built-in suite exists (suites/autoattack.toml), instead of the cascade below.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _harness import RESULTS, data_root, write_json
from torch import nn

from bastion.attacks import APGD, APGDT, FAB, FGSM, PGD, Square
from bastion.attacks.base import Attack
from bastion.data import Dataset, load_data

OUT = RESULTS / "autoattack_agreement.json"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the VNN-COMP models' normalisation (training set)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def autoattack_cascade(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int = 0
) -> dict[str, Any]:
    """AutoAttack's standard version with Bastion's attacks: each stage runs on the points
    still robust (correct and not yet broken); robust = broken by none."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    stages: list[tuple[str, Attack]] = [
        ("apgd-ce", APGD(eps, norm=norm, loss="ce", seed=seed)),  # type: ignore[arg-type]
        ("apgd-t", APGDT(eps, norm=norm, seed=seed)),  # type: ignore[arg-type]
        ("fab-t", FAB(eps, norm=norm, seed=seed)),  # type: ignore[arg-type]
        ("square", Square(eps, norm=norm, seed=seed)),  # type: ignore[arg-type]
    ]
    after: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name, attack in stages:
        idx = robust.nonzero().flatten()
        start = time.perf_counter()
        if len(idx):
            result = attack(model, x[idx], y[idx], indices=idx)
            robust[idx[result.success]] = False
        seconds[name] = time.perf_counter() - start
        after[name] = float(robust.float().mean())
    return {"robust_accuracy": float(robust.float().mean()), "after": after, "seconds": seconds}


def via_suite(model: nn.Module, data: Dataset, *, norm: str, eps: float) -> dict[str, Any]:
    """Bastion's built-in `autoattack` suite (when it exists) at one threat model."""
    import bastion

    report = bastion.run_suite(model, data, suite="autoattack", threats=[f"{norm}:{eps}"])
    return {"robust_accuracy": report.robust_accuracy(f"{norm}:{eps}")}


def reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int = 0
) -> float:
    """AutoAttack's standard version (the authors' code): its robust accuracy."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, seed=seed)
    aa.verbose = False
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=max(len(x), 1))
    with torch.no_grad():
        return float((y_adv == y).float().mean())


class Normalized(nn.Module):
    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _module_from(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cifar_test(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(root / "cifar10" / "cifar10_subset.npz") as npz:
        x = torch.from_numpy(npz["x_test"]).permute(0, 3, 1, 2).contiguous().float() / 255
        y = torch.from_numpy(npz["y_test"]).long()
    return x, y


def resnet18_model() -> nn.Module:
    import pyautoattack

    examples = Path(pyautoattack.__file__).parent / "examples"
    net = _module_from(examples / "resnet.py", "aa_resnet").ResNet18()
    net.load_state_dict(torch.load(examples / "model_test.pt", map_location="cpu"))
    return net.eval()


def vnncomp_model(root: Path, name: str) -> nn.Module:
    folder = root / "vnncomp2021" / "cifar10_resnet" / "pytorch_model"
    net = getattr(_module_from(folder / "resnet.py", "vnn_resnet"), name)()
    state = torch.load(folder / name / "model_best.pth", map_location="cpu")
    net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return Normalized(net, CIFAR_MEAN, CIFAR_STD).eval()


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def _batches(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), size):
        j = order[i : i + size]
        yield x[j], y[j]


def train_mnist(kind: str, train: Dataset, epochs: int) -> nn.Module:
    """standard | pgd-at (PGD-10 at 0.3, Madry et al.) | fgsm-at (FGSM at 0.3 from the clean
    image, Goodfellow et al., which overfits catastrophically at this eps) | distill-100."""
    torch.manual_seed(0)
    if kind == "distill-100":
        from bastion.defenses.distillation import distill

        return distill(mnist_cnn, (train.x, train.y), temperature=100, epochs=epochs).student
    net = mnist_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    make: dict[str, Callable[[], Attack] | None] = {
        "standard": None,
        "pgd-at": lambda: PGD(0.3, steps=10, rel_stepsize=0.25, early_stop=False),
        "fgsm-at": lambda: FGSM(0.3),
    }
    for epoch in range(epochs):
        for xb, yb in _batches(train.x, train.y, 128, epoch):
            factory = make[kind]
            if factory is not None:
                net.eval()
                xb = factory()(net, xb, yb).x_adv
            net.train()
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval()


def cached(name: str, build: Callable[[], nn.Module], fresh: Callable[[], nn.Module]) -> nn.Module:
    cache = Path(os.environ.get("BASTION_CACHE", Path.home() / ".cache" / "bastion")) / "bench"
    path = cache / f"autoattack_{name}.pt"
    if path.exists():
        net = fresh()
        net.load_state_dict(torch.load(path, map_location="cpu"))
        return net.eval()
    net = build()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


MODELS = (
    "resnet18",
    "resnet2b",
    "resnet4b",
    "mnist-standard",
    "mnist-pgd-at",
    "mnist-fgsm-at",
    "mnist-distill-100",
)
DEFAULT_N = {"resnet18": 100, "resnet2b": 200, "resnet4b": 200}


def load_model(
    name: str, root: Path, epochs: int
) -> tuple[nn.Module, Dataset, list[tuple[str, float]]]:
    if name.startswith("mnist-"):
        kind = name.removeprefix("mnist-")
        test = load_data(f"mnist:{root}", split="test")

        def build() -> nn.Module:
            return train_mnist(kind, load_data(f"mnist:{root}", split="train"), epochs)

        return cached(f"{name}_e{epochs}", build, mnist_cnn), test, [("linf", 0.3)]
    x, y = cifar_test(root)
    data = Dataset(
        x=x, y=y, spec="cifar10-subset", split="test", classes=[str(i) for i in range(10)]
    )
    if name == "resnet18":
        return resnet18_model(), data, [("linf", 8 / 255)]
    return vnncomp_model(root, name), data, [("linf", 2 / 255), ("linf", 8 / 255)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--n", type=int, default=None, help="images per model (default: the issue's)"
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=2, help="MNIST training epochs")
    parser.add_argument("--via-suite", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = data_root(args.data_root)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for turn, name in enumerate(args.models):
        model, data, threats = load_model(name, root, args.epochs)
        for p in model.parameters():
            p.requires_grad_(False)
        n = args.n or DEFAULT_N.get(name, 500)
        x, y = data.x[:n], data.y[:n]
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        for norm, eps in threats:
            key = f"{name}|{norm}:{eps:.6g}|n={n}"
            if key in results:
                print(f"{key}: done already, skipped")
                continue
            entry: dict[str, Any] = {
                "model": name,
                "norm": norm,
                "eps": eps,
                "n": n,
                "clean_accuracy": clean,
            }
            order = ("bastion", "autoattack") if turn % 2 == 0 else ("autoattack", "bastion")
            for who in order:
                start = time.perf_counter()
                if who == "autoattack":
                    entry["autoattack_robust_accuracy"] = reference(model, x, y, norm=norm, eps=eps)
                elif args.via_suite:
                    entry["bastion"] = via_suite(model, data.subset(n), norm=norm, eps=eps)
                else:
                    entry["bastion"] = autoattack_cascade(model, x, y, norm=norm, eps=eps)
                entry[f"{who}_seconds"] = time.perf_counter() - start
            entry["bastion_robust_accuracy"] = entry["bastion"]["robust_accuracy"]
            entry["time_ratio"] = entry["bastion_seconds"] / entry["autoattack_seconds"]
            entry["order"] = list(order)
            entry["threads"] = torch.get_num_threads()
            entry["load_average"] = os.getloadavg()
            entry["torch"] = torch.__version__
            results[key] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, results)
            print(
                f"{key}: clean {clean:.3f}  AutoAttack {entry['autoattack_robust_accuracy']:.3f} "
                f"({entry['autoattack_seconds']:.0f} s)  "
                f"Bastion {entry['bastion_robust_accuracy']:.3f} "
                f"({entry['bastion_seconds']:.0f} s)  load {entry['load_average'][0]:.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
