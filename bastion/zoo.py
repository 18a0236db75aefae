"""The embedded default model: a small CNN trained in seconds on scikit-learn's digits.

`demo_model()` trains it on the first call and caches the weights (safetensors) under
`$BASTION_CACHE` or `~/.cache/bastion`, keyed by a hash of the training recipe, so later
calls load it in milliseconds and a changed recipe never loads stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bastion.data import Dataset

RECIPE: dict[str, Any] = {
    "name": "digits-cnn",
    "version": 1,
    "data": "digits",
    "arch": "conv16-conv32-pool-fc64-10",
    "epochs": 30,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "seed": 0,
}


class DigitsCNN(nn.Module):
    """conv3×3(16) → ReLU → conv3×3(32) → ReLU → maxpool2 → fc64 → ReLU → fc10, on 1×8×8."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cache_dir() -> Path:
    """Where Bastion caches trained models: `$BASTION_CACHE` or `~/.cache/bastion`."""
    root = os.environ.get("BASTION_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bastion"


def recipe_hash(recipe: dict[str, Any] | None = None) -> str:
    """A short hash of a training recipe (the current `RECIPE` by default)."""
    # read RECIPE at call time, not as a bound default: a replaced recipe gets its own hash
    recipe = RECIPE if recipe is None else recipe
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def demo_model(
    *, device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None
) -> nn.Module:
    """The embedded default, in eval mode: trained on the first call, then loaded from cache."""
    return cached_model(
        RECIPE, DigitsCNN, "digits", prefix="demo-", device=device, progress=progress
    )


def cached_model(
    recipe: dict[str, Any],
    build: Callable[[], nn.Module],
    data_spec: str,
    *,
    prefix: str = "",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """`build()` trained by `recipe` on the training split of `data_spec`, cached under
    `cache_dir()` by the recipe's hash (atomically); a corrupt cache entry is retrained."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"{prefix}{recipe['name']}-{recipe_hash(recipe)}.safetensors"
    model = build()
    if path.exists():
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception:  # a corrupt cache entry is retrained, not trusted
            path.unlink(missing_ok=True)
    if not path.exists():
        from bastion.data import load_data

        train_classifier(model, load_data(data_spec, split="train"), recipe, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(model.state_dict(), str(tmp), metadata={"recipe": json.dumps(recipe)})
        os.replace(tmp, path)
    return model.to(device).eval()


def train_classifier(
    model: nn.Module,
    train: Dataset,
    recipe: dict[str, Any],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Train `model` with Adam and cross-entropy as `recipe` says (seed, epochs, batch size,
    lr, weight decay), deterministically: the initial weights and the batch order are drawn
    from the recipe's seed, not from the global generator, and training runs on one torch
    thread (float reductions depend on the thread count), so every machine gets the same
    weights; the caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(model, train, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    model: nn.Module,
    train: Dataset,
    recipe: dict[str, Any],
    progress: Callable[[int, int], None] | None,
) -> None:
    gen = torch.Generator().manual_seed(recipe["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model.apply(_reset)
    opt = torch.optim.Adam(
        model.parameters(), lr=recipe["lr"], weight_decay=recipe.get("weight_decay", 0.0)
    )
    n, bs, epochs = len(train), recipe["batch_size"], recipe["epochs"]
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress is not None:
            progress(epoch + 1, epochs)
    model.eval()


def _reset(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        module.reset_parameters()
