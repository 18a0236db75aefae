"""The one result type every attack returns, and the distances it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Norm = Literal["linf", "l2", "l1", "l0"]
NORMS: tuple[Norm, ...] = ("linf", "l2", "l1", "l0")


def distances(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample L0 (changed pixel values), L1, L2 and L∞ distances between two batches."""
    d = (x_adv - x).flatten(1)  # float32 differences, summed in float64
    if not d.shape[1]:
        return {k: d.new_zeros(d.shape[0], dtype=torch.float64) for k in ("l0", "l1", "l2", "linf")}
    size = d.abs()
    return {
        "l0": (d != 0).sum(1).double(),
        "l1": size.sum(1, dtype=torch.float64),
        "l2": torch.linalg.vector_norm(d, dim=1, dtype=torch.float64),
        "linf": size.amax(1).double(),
    }


@dataclass
class AttackResult:
    """What an attack found for a batch.

    `x_adv` holds the adversarial image where `success` is True and the clean input where
    it is False (never zeros). `success` equals a re-prediction of `x_adv` by the model.
    `queries` counts model forward passes per sample; `gradients` counts backward passes
    per sample; `iterations` counts optimisation steps per sample.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    pred_clean: torch.Tensor
    pred_adv: torch.Tensor
    distances: dict[str, torch.Tensor]
    queries: torch.Tensor
    iterations: torch.Tensor
    seconds: float
    gradients: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.success.shape[0])

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if len(self) else 0.0

    def __getitem__(self, index: int | slice | torch.Tensor) -> AttackResult:
        """The result restricted to some samples (for example `result[success]`)."""
        return AttackResult(
            x_adv=self.x_adv[index],
            success=self.success[index],
            pred_clean=self.pred_clean[index],
            pred_adv=self.pred_adv[index],
            distances={k: v[index] for k, v in self.distances.items()},
            queries=self.queries[index],
            iterations=self.iterations[index],
            seconds=self.seconds,
            gradients=self.gradients[index] if self.gradients.numel() else self.gradients,
        )
