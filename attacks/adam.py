"""Adam (Kingma & Ba, ICLR 2015, Algorithm 1) on a tensor of per-sample parameters.

The optimiser Carlini–Wagner runs on its `w`: an in-place step on one tensor whose rows
are independent samples, and `keep(mask)` to drop rows from the state when samples leave
the active batch (the attack keeps its active set compact). ε is added to the
bias-corrected √v̂, as torch.optim.Adam does (TensorFlow 1 adds it to the uncorrected √v).
The arithmetic folds both bias corrections into the step size and ε,
`w ← w − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε·√(1−β₂ᵗ))`, the same quantity as
torch.optim.Adam's `w ← w − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)` rounded in another order:
equal to it within float rounding (tested), and bit for bit what CW computed before this
class existed, so its results did not move.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam state (m, v, t) for one parameter tensor; `step` updates the tensor in place."""

    def __init__(
        self,
        param: torch.Tensor,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """One Adam step on `param` (no autograd) with the gradient `grad` of its shape."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        correction2 = math.sqrt(1 - b2**self.t)
        lr_t = self.lr * correction2 / (1 - b1**self.t)
        param.addcdiv_(self.m, self.v.sqrt().add_(self.eps * correction2), value=-lr_t)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the state of `rows` (a boolean mask or indices over the first axis)."""
        self.m, self.v = self.m[rows], self.v[rows]
