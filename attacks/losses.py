"""Per-sample losses on logits for the gradient and score-based attacks.

Each is a `Loss`: `loss(logits, y, target) -> shape N`, a quantity the attack *raises*
(`target` is None for an untargeted call). Definitions follow Croce & Hein (ICML 2020)
and their code: the DLR losses are invariant to shifting and (positively) scaling the
logits, which is what defeats distillation-style logit scaling where cross-entropy
saturates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bastion.attacks.gradient_descent import Loss

_TINY = 1e-12  # the authors' guard against a zero denominator


def _true_logit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y.reshape(-1, 1)).squeeze(1)


def _best_other(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i≠y} z_i."""
    return logits.scatter(1, y.reshape(-1, 1), float("-inf")).amax(1)


def cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    """CE(z, y) untargeted; −CE(z, t) targeted (so raising it approaches the target)."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Difference of logits ratio, untargeted: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12),
    π the logits sorted in decreasing order. A target, if given, selects `dlr_targeted`."""
    if target is not None:
        return dlr_targeted(logits, y, target)
    top = logits.topk(3, dim=1).values
    return -(_true_logit(logits, y) - _best_other(logits, y)) / (top[:, 0] - top[:, 2] + _TINY)


def dlr_targeted(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    """Targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12) (needs 4+ classes)."""
    if target is None:
        return dlr(logits, y, None)
    top = logits.topk(4, dim=1).values
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY
    return -(_true_logit(logits, y) - _true_logit(logits, target)) / scale


def margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Logit margin to raise: max_{i≠y} z_i − z_y (positive once misclassified); targeted
    z_t − max_{i≠t} z_i (positive once the target is predicted)."""
    if target is None:
        return _best_other(logits, y) - _true_logit(logits, y)
    return _true_logit(logits, target) - _best_other(logits, target)


LOSSES: dict[str, Loss] = {
    "ce": cross_entropy,
    "dlr": dlr,
    "dlr-targeted": dlr_targeted,
    "margin": margin,
}
"""The losses by the names the attacks' `loss=` arguments accept."""
