"""Where the `autoattack` suite and AutoAttack part on one model: Bastion's cascade up to
FAB-T (APGD-CE, APGD-T on 9 targets, FAB-T on 9), then Square with 5,000 queries on the
points it leaves — Bastion's with several seeds and the authors' (pyautoattack) with
seed 0 — on the same points. Records each stage's robust count, each Square's breaks (the
sample indices) and CPU seconds, one thread. Results: `benchmarks/results/square_seeds.json`.

    OMP_NUM_THREADS=1 python benchmarks/square_seeds.py [--model mnist-pgd-at] [--epochs 1]
        [--n 500] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _harness import RESULTS, data_root, machine, write_json
from autoattack_agreement import MODELS, load_model

from bastion.attacks import APGD, APGDT, FAB, Square

OUT = RESULTS / "square_seeds.json"


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mnist-pgd-at")
    parser.add_argument("--epochs", type=int, default=1, help="MNIST training epochs")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, data, threats = load_model(args.model, data_root(None), args.epochs)
    for p in model.parameters():
        p.requires_grad_(False)
    (norm, eps), *_ = threats
    sub = data.subset(args.n)
    x, y, idx = sub.x, sub.y, torch.arange(args.n)
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    doc: dict[str, Any] = {"model": args.model, "epochs": args.epochs, "n": args.n,
                           "norm": norm, "eps": eps, "stages": {}, "square": {}}  # fmt: skip
    for name, attack in (
        ("apgd-ce", APGD(eps, norm=norm)),
        ("apgd-t", APGDT(eps, norm=norm)),
        ("fab-t", FAB(eps, norm=norm, targeted=True, n_target_classes=9)),
    ):
        keep = robust.nonzero().flatten()
        hit, cpu = _timed(lambda a=attack, k=keep: a(model, x[k], y[k], indices=k).success)
        robust[keep[hit]] = False
        doc["stages"][name] = {"robust": int(robust.sum()), "cpu_seconds": round(cpu, 1)}
    left = robust.nonzero().flatten()

    def ours(seed: int) -> torch.Tensor:
        return Square(eps, norm=norm, seed=seed)(model, x[left], y[left], indices=left).success

    runs: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (f"bastion seed {s}", lambda s=s: ours(s)) for s in args.seeds
    ]
    runs.insert(1, ("authors seed 0", lambda: _authors(model, x[left], y[left], norm, eps)))
    for name, run in runs:
        hit, cpu = _timed(run)
        doc["square"][name] = {
            "breaks": int(hit.sum()),
            "indices": idx[left][hit].tolist(),
            "cpu_seconds": round(cpu, 1),
        }
        print(name, doc["square"][name], flush=True)
    doc["machine"] = machine()
    write_json(OUT, doc)
    return 0


def _authors(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float
) -> torch.Tensor:
    """pyautoattack's Square as AutoAttack's standard version configures it."""
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(model, p_init=0.8, n_queries=5000, eps=eps,
                          norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, seed=0,
                          verbose=False, device="cpu", resc_schedule=False)  # fmt: skip
    with torch.no_grad():
        return model(attack.perturb(x, y)).argmax(1) != y


if __name__ == "__main__":
    raise SystemExit(main())
