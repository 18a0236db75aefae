"""Feature-guided black-box attacks (DeepGame MCTS, SafeCV) against white-box CW-L2.

On the first `--n` correctly classified test images of two models — a small MNIST CNN
trained here (one epoch, cached by its recipe) and the embedded demo CNN (digits, 8×8) —
runs FeatureGameMCTS (cooperative, L2 budget 10, τ = 1), SafeCV (the package's MNIST example
parameters) and CarliniWagnerL2.fast() on the same images, and reports success rate, mean
L0 / L2 over successes, mean queries and seconds per image, next to the numbers the spec
records from the authors' runs. Prints a table and writes JSON.

    python benchmarks/blackbox_mnist.py [--n 20] [--queries 10000] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from _harness import RESULTS, correctly_classified, machine, mnist_spec, write_json
from torch import nn

from bastion.attacks import Attack, CarliniWagnerL2, FeatureGameMCTS, SafeCV
from bastion.data import load_data
from bastion.zoo import cached_model, demo_model, recipe_hash

MNIST_RECIPE: dict[str, Any] = {
    "name": "blackbox-mnist-cnn",
    "version": 1,
    "data": "mnist train (60k)",
    "arch": "conv16-pool-conv32-pool-fc64-10",
    "epochs": 1,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 3e-3,
    "seed": 0,
}
# what the spec (§1.7) records from the authors' own runs, for the table
REFERENCE = {
    "SafeCV MNIST example (Carlini's MNIST model, 1 image)": {"l0": 55},
    "DeepGame Fig. 14 MNIST examples (2 images)": {"l2": [1.414, 1.996]},
}


class MnistCNN(nn.Module):
    """conv3×3(16) → ReLU → pool2 → conv3×3(32) → ReLU → pool2 → fc64 → ReLU → fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def evaluate(name: str, attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    start = time.perf_counter()
    result = attack(model, x, y)
    seconds = time.perf_counter() - start
    ok = result.success
    mean = {k: float(result.distances[k][ok].mean()) if ok.any() else None for k in ("l0", "l2")}
    return {
        "attack": name,
        "images": len(x),
        "success_rate": result.success_rate,
        "mean_l0": mean["l0"],
        "mean_l2": mean["l2"],
        "median_l2": float(result.distances["l2"][ok].median()) if ok.any() else None,
        "mean_queries": float(result.queries.double().mean()),
        "seconds_per_image": seconds / len(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per model")
    parser.add_argument("--queries", type=int, default=10_000, help="query budget per image")
    parser.add_argument("--out", default=str(RESULTS / "blackbox_mnist.json"))
    parser.add_argument(
        "--data", default=None, help="data root (default $BASTION_DATA or ../shared/data)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    mnist = cached_model(MNIST_RECIPE, MnistCNN, mnist_spec(args.data))
    train_seconds = time.perf_counter() - start
    cases = {
        "mnist": (mnist, load_data(mnist_spec(args.data), split="test", n=1000)),
        "demo": (demo_model(), load_data("digits", split="test")),
    }
    attacks: list[tuple[str, Attack]] = [
        (f"MCTS L2≤10, {args.queries} queries", FeatureGameMCTS(max_queries=args.queries)),
        ("MCTS L2≤10, 2000 queries (CLI default)", FeatureGameMCTS()),
        (f"SafeCV (VC 6, 100 sims, ≤{args.queries} q)", SafeCV(max_queries=args.queries)),
        ("CW-L2 fast 5×1000 (white-box)", CarliniWagnerL2.fast()),
    ]
    rows = []
    for model_name, (model, data) in cases.items():
        with torch.no_grad():
            clean = float((model(data.x).argmax(1) == data.y).float().mean())
        x, y, _ = correctly_classified(model, data.x, data.y, args.n)
        for name, attack in attacks:
            row = {
                "model": model_name,
                "clean_accuracy": clean,
                **evaluate(name, attack, model, x, y),
            }
            rows.append(row)
            l0, l2 = (
                row[k] if row[k] is not None else float("nan") for k in ("mean_l0", "mean_l2")
            )
            print(
                f"{model_name:6} {name:42} success {row['success_rate']:.2f}  L0 {l0:7.1f}  "
                f"L2 {l2:6.3f}  queries {row['mean_queries']:8.0f}  "
                f"{row['seconds_per_image']:6.2f} s/img",
                flush=True,
            )
    out = {
        "benchmark": "blackbox_mnist",
        "rows": rows,
        "reference": REFERENCE,
        "mnist_model": {
            "recipe": MNIST_RECIPE,
            "recipe_hash": recipe_hash(MNIST_RECIPE),
            "load_or_train_seconds": train_seconds,
        },
        "n": args.n,
        "queries": args.queries,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    write_json(args.out, out)
    print(f"wrote {args.out} (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
