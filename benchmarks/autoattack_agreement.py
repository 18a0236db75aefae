"""Bastion's AutoAttack-strength suites against AutoAttack itself (pyautoattack), measured.

For each model and threat model, the same images go through AutoAttack's "standard"
version (the authors' code: APGD-CE, APGD-T on 9 targets, FAB-T on 9 targets, Square with
5,000 queries, each on the points still robust) and through Bastion as a user runs it,
`bastion.run_suite(model, data, suite=...)` with the built-in `autoattack` suite (the same
four attacks, cascaded) and the `quick` suite, all images in one batch, in the same
process and threads, the order alternating from one model to the next. Recorded per
part: robust accuracy (Bastion's after each check too), wall and CPU seconds (the CPU
time of this one-thread process is the load-robust figure on a shared machine), the
seconds of each of AutoAttack's attacks and of each Bastion check, the load average
before and after, and the machine. Results go to `benchmarks/results/autoattack_agreement.json`,
one entry per (model, threat, n[, MNIST epochs]); each part is saved as it finishes and
a rerun does only the parts still missing (resumable). Entries without `parts` are
earlier runs of Bastion's attacks through a cascade of the benchmark's own.

Models: (a) the CIFAR-10 ResNet-18 shipped in pyautoattack (`examples/model_test.pt`,
inputs in [0, 1]); (b) the VNN-COMP 2021 `resnet2b`/`resnet4b` (inputs normalised with
the CIFAR-10 training mean/std) at L∞ 2/255 and 8/255; (c) MNIST CNNs trained here
(cached, every epoch's weights kept): standard, PGD adversarial training at 0.3, FGSM
training at 0.3 (prone to catastrophic overfitting) and defensive distillation at
T = 100, at L∞ 0.3.

    OMP_NUM_THREADS=1 python benchmarks/autoattack_agreement.py --models resnet4b \
        [--eps 2/255] [--n 200] [--suites autoattack quick] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _harness import RESULTS, data_root, machine, update_json
from torch import nn

from bastion.attacks import FGSM, PGD
from bastion.attacks.base import Attack
from bastion.data import Dataset, load_data

OUT = RESULTS / "autoattack_agreement.json"
REFERENCE = "pyautoattack"  # the authors' code; "autoattack" is Bastion's suite of that name
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the VNN-COMP models' normalisation (training set)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def via_suite(model: nn.Module, data: Dataset, *, suite: str, threat: str) -> dict[str, Any]:
    """Bastion as a user runs it: `bastion.run_suite(model, data, suite=suite)` at one
    threat model, all images in one batch (as the reference gets them). Returns the
    threat's robust accuracy, the robust accuracy after each check of the threat and each
    check's seconds (the rest of the wall time is the clean pass and the sanity checks)."""
    import bastion

    start, cpu = time.perf_counter(), time.process_time()
    report = bastion.run_suite(
        model, data, suite=suite, threats=[threat], batch_size=len(data), gallery=0
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    doc = json.loads(report.to_json())
    (row,) = doc["threat_models"]
    return {
        "suite": suite,
        "robust_accuracy": report.robust_accuracy(threat),
        "seconds": wall,
        "cpu_seconds": cpu,
        "after": {k: v["robust_accuracy"] for k, v in row["attacks"].items()},
        "check_seconds": {c["id"]: c["seconds"] for c in doc["checks"]},
        "flags": [f["name"] for f in doc["flags"]],
    }


def reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seed: int = 0
) -> dict[str, Any]:
    """AutoAttack's standard version (the authors' code): its robust accuracy, wall time
    and the seconds of each of its attacks (timed around their `perturb` calls)."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    start, cpu = time.perf_counter(), time.process_time()
    aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, seed=seed)
    aa.verbose = False
    seconds: dict[str, float] = {}
    for stage, attack in (("apgd", aa.apgd), ("apgd-t", aa.apgd_targeted), ("fab", aa.fab),
                          ("square", aa.square)):  # fmt: skip
        attack.perturb = _timed(attack.perturb, stage, seconds)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=max(len(x), 1))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    with torch.no_grad():
        robust = float((y_adv == y).float().mean())
    renamed = {"apgd": "apgd-ce", "fab": "fab-t"}
    return {
        "robust_accuracy": robust,
        "seconds": wall,
        "cpu_seconds": cpu,
        "stage_seconds": {renamed.get(k, k): v for k, v in seconds.items()},
    }


def _timed(fn: Callable[..., Any], name: str, into: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - start

    return wrapper


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


def train_mnist(
    kind: str,
    train: Dataset,
    epochs: int,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """standard | pgd-at (PGD-10 at 0.3, Madry et al.) | fgsm-at (FGSM at 0.3 from the clean
    image, Goodfellow et al., which overfits catastrophically at this eps) | distill-100.
    `on_epoch(k, net)` sees the weights after each epoch k (they equal a k-epoch training)."""
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
        if on_epoch is not None:
            on_epoch(epoch + 1, net)
    return net.eval()


def _cache_path(name: str) -> Path:
    cache = Path(os.environ.get("BASTION_CACHE", Path.home() / ".cache" / "bastion")) / "bench"
    return cache / f"autoattack_{name}.pt"


def _save(net: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def cached(name: str, build: Callable[[], nn.Module], fresh: Callable[[], nn.Module]) -> nn.Module:
    path = _cache_path(name)
    if path.exists():
        net = fresh()
        net.load_state_dict(torch.load(path, map_location="cpu"))
        return net.eval()
    net = build()
    _save(net, path)
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
            def checkpoint(k: int, net: nn.Module) -> None:  # a longer run keeps the shorter ones
                if kind != "distill-100":
                    _save(net, _cache_path(f"{name}_e{k}"))

            train = load_data(f"mnist:{root}", split="train")
            return train_mnist(kind, train, epochs, on_epoch=checkpoint)

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
    parser.add_argument(
        "--suites", nargs="+", default=["autoattack", "quick"], help="Bastion suites to time"
    )
    parser.add_argument("--eps", nargs="+", default=None, help="only these eps (e.g. 2/255)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = data_root(args.data_root)
    for turn, name in enumerate(args.models):
        model, data, threats = load_model(name, root, args.epochs)
        for p in model.parameters():
            p.requires_grad_(False)
        n = args.n or DEFAULT_N.get(name, 500)
        subset = data.subset(n)
        with torch.no_grad():
            clean = float((model(subset.x).argmax(1) == subset.y).float().mean())
        for norm, eps in threats:
            if args.eps and not any(math.isclose(eps, _fraction(e)) for e in args.eps):
                continue
            run_entry(
                args.out, name, args.epochs if name.startswith("mnist-") else None,
                model, subset, clean, norm, eps, args.suites, turn,
            )  # fmt: skip
    return 0


def _fraction(text: str) -> float:
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom or 1)


def run_entry(
    out: Path,
    name: str,
    epochs: int | None,
    model: nn.Module,
    data: Dataset,
    clean: float,
    norm: str,
    eps: float,
    suites: list[str],
    turn: int,
) -> None:
    """One (model, threat, n) entry: AutoAttack and each Bastion suite, in an order that
    alternates between models; each part is saved as it finishes, and a rerun does only
    the parts still missing (so an interrupted entry resumes)."""
    n = len(data)
    key = f"{name}|{norm}:{eps:.6g}|n={n}" + (f"|epochs={epochs}" if epochs else "")
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    entry: dict[str, Any] = doc.get(key) or {
        "model": name, "epochs": epochs, "norm": norm, "eps": eps, "n": n,
        "clean_accuracy": clean, "parts": {},
    }  # fmt: skip
    order = [REFERENCE, *suites] if turn % 2 == 0 else [*suites, REFERENCE]
    for who in order:
        if who in entry["parts"]:
            continue
        before = os.getloadavg()
        if who == REFERENCE:
            part = reference(model, data.x, data.y, norm=norm, eps=eps)
        else:
            part = via_suite(model, data, suite=who, threat=f"{norm}:{eps!r}")
        part["load_average"] = [round(a, 2) for a in (*before, *os.getloadavg())]
        part["machine"] = machine()
        entry["parts"][who] = part
        _summarise(entry)
        update_json(out, key, entry)
        print(f"{key} {who}: robust {part['robust_accuracy']:.3f} in {part['seconds']:.0f} s "
              f"(load {before[0]:.1f})", flush=True)  # fmt: skip


def _summarise(entry: dict[str, Any]) -> None:
    """The headline figures of an entry from its parts done so far, under the names the
    earlier entries use: `autoattack_*` the reference, `bastion_*` the `autoattack` suite,
    `quick_*` the quick suite, each time ratio against the reference's wall time."""
    parts = entry["parts"]
    ref = parts.get(REFERENCE)
    for who, part in parts.items():
        label = {REFERENCE: "autoattack", "autoattack": "bastion"}.get(who, who)
        entry[f"{label}_robust_accuracy"] = part["robust_accuracy"]
        entry[f"{label}_seconds"] = part["seconds"]
        if ref is not None and who != REFERENCE:
            ratio = "time_ratio" if label == "bastion" else f"{label}_time_ratio"
            entry[ratio] = part["seconds"] / ref["seconds"]
            if "cpu_seconds" in part and "cpu_seconds" in ref:
                entry[f"{label}_cpu_ratio"] = part["cpu_seconds"] / ref["cpu_seconds"]
    entry["load_average"] = max((p["load_average"] for p in parts.values()), key=max)


if __name__ == "__main__":
    sys.exit(main())
