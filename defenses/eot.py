"""Expectation over transformation (EOT; Athalye, Carlini & Wagner, ICML 2018, and
Athalye, Engstrom, Ilyas & Kwok, ICML 2018): the attacker's view of a randomised defense.

A randomised preprocessing (`RawISP(randomize=True)`) gives a different output at every
call, so one call's gradient points at one random draw. EOT attacks the expected
classifier instead: `ExpectationOverTransformation(defended, samples)` runs the defended
model on `samples` copies of each image in one batch (each copy gets its own draw of the
randomness) and returns the log of the mean softmax — log-probabilities, which are logits up
to a per-row constant, so every attack and loss takes it unchanged. Its gradient is the
gradient of the expected classifier's loss, estimated from `samples` draws per step.
Default 20 draws, as the "rand" version of AutoAttack (Croce & Hein 2020).

Judge an attack on this view with the defended model itself (a fresh draw), as deployed,
not with the averaged view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import ConfigError

_FLOOR = 1e-40  # as Ensemble: the log of an averaged probability of exactly zero

EOT_SAMPLES = 20


class ExpectationOverTransformation(nn.Module):
    """`log(mean_s softmax(model(x)))` over `samples` calls of a randomised `model`, all
    in one forward pass (the images repeated `samples` times along the batch)."""

    def __init__(
        self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], samples: int = EOT_SAMPLES
    ) -> None:
        super().__init__()
        if samples < 1:
            raise ConfigError(f"EOT needs at least one sample, got {samples}")
        self.model = model
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        logits = self.model(x.repeat(self.samples, *[1] * (x.dim() - 1)))
        probs = F.softmax(logits.view(self.samples, n, -1), dim=2).mean(0)
        return probs.clamp_min(_FLOOR).log()
