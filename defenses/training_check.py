"""The guard of the training recipes: a defended model that trained to (near) chance, or
to far below the model it defends, is refused with one sentence instead of being returned.

`bastion defend` turns the error into exit code 2 and saves nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from bastion.errors import BastionError
from bastion.modes import eval_mode

CHANCE_FACTOR = 1.5
"""A model whose accuracy is at most this many times chance accuracy has not trained."""

MAX_LOSS = 0.5
"""A defended model that lost more than this fraction of its reference model's accuracy
above chance has trained far below it (0.5: digits at 98 % → refused below 54 %)."""


class TrainingFailedError(BastionError):
    """A training recipe ended with a model that does not classify its training data."""


def chance_accuracy(y: torch.Tensor, num_classes: int | None = None) -> float:
    """The accuracy of always predicting the most common label of `y` (1/K when balanced)."""
    counts = torch.bincount(y.long().flatten().cpu(), minlength=num_classes or 0)
    return float(counts.max()) / max(int(y.numel()), 1)


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of `model` on (x, y) in eval mode (the mode is restored after)."""
    with eval_mode(model), torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)])
    return float((pred == y.to(pred.device)).float().mean())


def check_trained(
    what: str,
    acc: float,
    chance: float,
    *,
    hint: str,
    reference: tuple[str, float] | None = None,
) -> None:
    """Raise `TrainingFailedError` when `acc` is within `CHANCE_FACTOR`× of `chance`, or
    when it lost more than `MAX_LOSS` of the `reference` (name, accuracy)'s margin over
    chance. `what` names the model ("the student"), `hint` says what to try."""
    if acc <= CHANCE_FACTOR * chance:
        raise TrainingFailedError(
            f"{what} trained to accuracy {acc:.3f} on its training data, within "
            f"{CHANCE_FACTOR:g}× of chance ({chance:.3f}), so nothing was kept; {hint}"
        )
    if reference is not None:
        name, ref = reference
        if ref > chance and acc < ref - MAX_LOSS * (ref - chance):
            raise TrainingFailedError(
                f"{what} trained to accuracy {acc:.3f} on its training data, far below "
                f"{name} ({ref:.3f}), so nothing was kept; {hint}"
            )
