"""Fast Gradient Sign Method (Goodfellow, Shlens, Szegedy, ICLR 2015)."""

from __future__ import annotations

import torch

from bastion.attacks.gradient_descent import GradientDescentAttack, Loss
from bastion.results import Norm


class FGSM(GradientDescentAttack):
    """One step of size eps along the sign of the loss gradient (L∞), or along the
    normalised gradient for `norm="l2"` (the fast gradient method).

    `x_adv = clip(x + eps·sign(∇x CE(Z(x), y)), 0, 1)`; targeted: minus the gradient of
    the loss towards the target class. `loss` (a `Loss`) replaces the cross-entropy.
    """

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        bounds: tuple[float, float] = (0.0, 1.0),
        loss: Loss | None = None,
    ) -> None:
        super().__init__(
            eps=eps,
            norm=norm,
            steps=1,
            rel_stepsize=1.0,
            random_start=False,
            early_stop=False,
            bounds=bounds,
            loss=loss,
        )
