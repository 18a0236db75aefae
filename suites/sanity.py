"""Checks that flag an evaluation that cannot be trusted (after AutoAttack's `checks.py`
and ART's security curve). Flags are reported, never change the exit code."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bastion.attacks import PGD
from bastion.data import Dataset
from bastion.suites.report_model import Flag
from bastion.validation import looks_like_probabilities

Model = Callable[[torch.Tensor], torch.Tensor]

#: The L∞ radius at which no real robustness survives on [0, 1] images: the image can be
#: moved to mid-grey everywhere.
LARGE_EPS = 0.5
_SAMPLES = 64


def _flag(name: str, message: str) -> Flag:
    return Flag(name=name, severity="warning", message=message)


def run_sanity_checks(
    model: Model,
    data: Dataset,
    correct: torch.Tensor,
    batch_size: int,
    dev: torch.device,
    seed: int,
) -> tuple[list[Flag], dict[str, int | float]]:
    """Flags, and the measurements behind them, on up to 64 correctly classified samples."""
    idx = correct.nonzero().flatten()[:_SAMPLES]
    if not len(idx):
        return [], {}
    x = data.x[idx].to(dev)
    y = data.y[idx].to(dev)
    flags: list[Flag] = []
    with torch.no_grad():
        first = model(x)
        second = model(x)
    if looks_like_probabilities(first):
        flags.append(
            _flag(
                "probability_outputs",
                "the model's outputs are non-negative and sum to 1: attacks need "
                "logits, and losses on probabilities saturate; remove the softmax",
            )
        )
    max_change = float((first - second).abs().max())
    if max_change > 0:
        flags.append(
            _flag(
                "randomness",
                f"two forward passes on the same images differ (by up to "
                f"{max_change:.3g}): the model is random, so evaluate it with EOT "
                "(expectation over transformation) attacks",
            )
        )
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = int((grad.flatten(1).abs().amax(1) == 0).sum())
    if zero:
        flags.append(
            _flag(
                "zero_gradients",
                f"{zero} of {len(idx)} samples have exactly zero input gradients: "
                "gradients are masked (e.g. saturated softmax or distillation), so "
                "gradient attacks understate the risk; try CW on logits or "
                "transfer attacks",
            )
        )
    result = PGD(LARGE_EPS, steps=20, seed=seed)(model, x, y, indices=idx.to(dev))
    large_eps_acc = 1.0 - result.success_rate
    chance = 1.0 / max(first.shape[1], 2)
    if large_eps_acc > chance + 0.1:
        flags.append(
            _flag(
                "large_eps_not_broken",
                f"PGD at L∞ eps {LARGE_EPS} leaves {large_eps_acc:.0%} accuracy "
                f"(chance is {chance:.0%}): real robustness cannot survive such a "
                "budget, so the attacks are likely being obstructed",
            )
        )
    measured = {
        "samples": len(idx),
        "max_forward_difference": max_change,
        "zero_gradient_samples": zero,
        "large_eps": LARGE_EPS,
        "large_eps_accuracy": large_eps_acc,
        "forward": int(result.queries.sum()) + 3 * len(idx),
        "backward": int(result.gradients.sum()) + len(idx),
    }
    return flags, measured
