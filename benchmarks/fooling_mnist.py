"""Fooling images on an MNIST CNN (Nguyen, Yosinski, Clune 2015, §2.5 of the spec).

Trains a small LeNet-style CNN on MNIST (`bastion.zoo.train_classifier`, one epoch), then
runs MAP-Elites with the direct and the CPPN encodings, random search with the direct run's
query budget, and gradient ascent (the code's decay 0.01, and decay 0). Prints per-class
confidences and the first generation reaching 99 % / 99.99 %, writes JSON and a gallery PNG
(one row per method, one column per class).

    OMP_NUM_THREADS=1 python benchmarks/fooling_mnist.py [--data DATA_ROOT]
        [--generations 500] [--cppn-generations 300] [--out benchmarks/results/fooling_mnist.json]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from _harness import machine, mnist_spec, write_json
from PIL import Image
from torch import nn

from bastion.attacks import FoolingEvolution, FoolingGradientAscent, FoolingResult
from bastion.data import load_data
from bastion.zoo import train_classifier

RECIPE: dict[str, Any] = {
    "name": "mnist-lenet-small",
    "version": 1,
    "data": "mnist",
    "arch": "conv5(8)-pool-conv5(16)-pool-fc64-10",
    "epochs": 1,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 2e-3,
    "weight_decay": 0.0,
    "seed": 0,
}


def lenet() -> nn.Module:
    """conv5×5(8) → ReLU → pool2 → conv5×5(16) → ReLU → pool2 → fc64 → ReLU → fc10 on 1×28×28."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def row(name: str, result: FoolingResult, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": name,
        **extra,
        "fooled_0.99": result.fooled(0.99),
        "fooled_0.9999": result.fooled(0.9999),
        "median_confidence": float(result.confidence.median()),
        "confidence": [round(float(c), 7) for c in result.confidence],
        "predicted": result.predicted.tolist(),
        "first_generation_0.99": result.first_generation(0.99).tolist(),
        "first_generation_0.9999": result.first_generation(0.9999).tolist(),
        "generations": result.generations,
        "queries": result.queries,
        "gradients": result.gradients,
        "seconds": round(result.seconds, 2),
    }


def gallery(results: list[FoolingResult], path: Path, scale: int = 3) -> None:
    """One row per method, one column per class, 2-pixel gaps, upscaled `scale`×."""
    rows = [torch.cat([torch.nn.functional.pad(im, (1, 1, 1, 1)) for im in r.images], 2)
            for r in results]  # fmt: skip
    grid = torch.cat(rows, 1)[0]
    pixels = (grid.clamp(0, 1) * 255).round().byte().numpy()
    picture = Image.fromarray(pixels).resize(
        (pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST
    )
    picture.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", default=None, help="data root ($BASTION_DATA, ../shared/data)")
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--cppn-generations", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/fooling_mnist.json")
    args = parser.parse_args()
    spec = mnist_spec(args.data)
    start = time.perf_counter()
    model = lenet()  # trained afresh each run, so the training time is measured too
    train_classifier(model, load_data(spec, split="train"), RECIPE)
    train_seconds = time.perf_counter() - start
    test = load_data(spec, split="test")
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    shape = tuple(test.x.shape[1:])
    direct = FoolingEvolution("direct", generations=args.generations)(model, input_shape=shape)
    cppn = FoolingEvolution("cppn", generations=args.cppn_generations)(model, input_shape=shape)
    random = FoolingEvolution(generations=0, init_size=direct.queries)(model, input_shape=shape)
    mean = test.x.mean(0)
    ascent = FoolingGradientAscent()(model, input_shape=shape, start=mean)
    ascent0 = FoolingGradientAscent(decay=0.0)(model, input_shape=shape, start=mean)
    rows = [
        row("MAP-Elites direct", direct, {"encoding": "direct"}),
        row("MAP-Elites CPPN", cppn, {"encoding": "cppn"}),
        row("random search (direct's queries)", random, {"encoding": "direct"}),
        row("gradient ascent decay 0.01", ascent, {"decay": 0.01}),
        row("gradient ascent decay 0", ascent0, {"decay": 0.0}),
    ]
    direct_200 = direct.history[min(200, direct.generations)]
    out = Path(args.out)
    gallery([direct, cppn, ascent0], out.with_suffix(".png"))
    record = {
        "benchmark": "fooling_mnist",
        "model": {**RECIPE, "test_accuracy": accuracy, "train_seconds": train_seconds},
        "direct_confidence_at_generation_200": [round(float(c), 7) for c in direct_200],
        "rows": rows,
        "gallery": out.with_suffix(".png").name + " (rows: direct, CPPN, ascent decay 0)",
        "machine": machine(),
    }
    write_json(out, record)
    print(f"MNIST CNN test accuracy {accuracy:.4f} (trained in {train_seconds:.1f} s)")
    print(f"{'method':36} {'≥99%':>5} {'≥99.99%':>8} {'median':>9} {'gens':>5} {'s':>7}")
    for r in rows:
        print(
            f"{r['method']:36} {r['fooled_0.99']:5.2f} {r['fooled_0.9999']:8.2f} "
            f"{r['median_confidence']:9.6f} {r['generations']:5d} {r['seconds']:7.1f}"
        )
        print(f"{'':4}per class: {' '.join(f'{c:.4f}' for c in r['confidence'])}")
        print(f"{'':4}first ≥99%: {r['first_generation_0.99']}")
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
