"""Projected gradient descent (Madry et al., ICLR 2018) and its no-restart form, BIM."""

from __future__ import annotations

import torch

from bastion.attacks.gradient_descent import GradientDescentAttack, Loss
from bastion.results import Norm


class PGD(GradientDescentAttack):
    """PGD with a uniform random start in the eps-ball, `steps` projected steps.

    Defaults follow Madry et al.: 40 steps of 2.5·eps/steps (so the iterate can cross the
    ball), random start on. `early_stop` (on) stops each sample at its first adversarial
    iterate: the same success, fewer passes. Deterministic: the random start of a sample
    depends only on (seed, sample index). `loss` (a `Loss`, default cross-entropy) is
    the objective ascended, e.g. `bastion.attacks.losses.dlr`.
    """

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        steps: int = 40,
        rel_stepsize: float | None = None,
        abs_stepsize: float | None = None,
        random_start: bool = True,
        early_stop: bool = True,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
        loss: Loss | None = None,
    ) -> None:
        super().__init__(
            eps=eps,
            norm=norm,
            steps=steps,
            rel_stepsize=rel_stepsize if rel_stepsize is not None else 2.5 / steps,
            abs_stepsize=abs_stepsize,
            random_start=random_start,
            early_stop=early_stop,
            seed=seed,
            bounds=bounds,
            loss=loss,
        )


class BIM(PGD):
    """Basic iterative method (Kurakin et al., 2017): PGD without the random start."""

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        steps: int = 10,
        rel_stepsize: float | None = None,
        abs_stepsize: float | None = None,
        early_stop: bool = True,
        bounds: tuple[float, float] = (0.0, 1.0),
        loss: Loss | None = None,
    ) -> None:
        super().__init__(
            eps=eps,
            norm=norm,
            steps=steps,
            rel_stepsize=rel_stepsize,
            abs_stepsize=abs_stepsize,
            random_start=False,
            early_stop=early_stop,
            bounds=bounds,
            loss=loss,
        )
