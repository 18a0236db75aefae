"""Early checks on images, labels and model outputs, each failing with one clear sentence."""

from __future__ import annotations

import torch

from bastion.errors import InvalidInputError, ModelOutputError


def check_images(x: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
    """Require a finite float batch N×C×H×W with every pixel inside `bounds`."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(
            f"images must be a torch.Tensor, got {type(x).__name__}; "
            "convert with torch.as_tensor(...)"
        )
    if not x.is_floating_point():
        raise InvalidInputError(
            f"images must be a float tensor in [0, 1], got dtype {x.dtype}; "
            "divide uint8 images by 255"
        )
    if x.dim() != 4:
        raise InvalidInputError(
            f"images must have shape N×C×H×W, got {tuple(x.shape)}; "
            "add the missing batch or channel axis"
        )
    if not x.numel():
        return
    lo, hi = bounds
    low, high = (float(v) for v in torch.aminmax(x))  # one pass; NaN propagates into both
    if lo <= low and high <= hi:
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise InvalidInputError(
            f"{bad} image(s) contain NaN or infinite pixels; clean or drop them before evaluating"
        )
    raise InvalidInputError(
        f"pixel values span [{low:.4g}, {high:.4g}] but must lie in [{lo:g}, {hi:g}]; put "
        "normalisation inside the model with bastion.Normalized instead of normalising the data"
    )


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> None:
    """Require n integer labels, each a valid class index."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.int8,
    ):
        raise InvalidInputError("labels must be an integer torch.Tensor of class indices")
    if y.shape != (n,):
        raise InvalidInputError(f"expected {n} labels of shape ({n},), got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        raise InvalidInputError(
            f"labels must lie in [0, {num_classes}), got "
            f"[{int(y.min())}, {int(y.max())}]; check the dataset's classes"
        )


def check_logits(logits: torch.Tensor, n: int) -> None:
    """Require a finite N×K output from the model."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelOutputError(
            f"the model must return logits of shape N×K for N={n} images, "
            f"got {shape}; wrap it so it returns one score per class"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ModelOutputError(
            "the model returned NaN or infinite outputs; check its weights "
            "and that it expects pixels in [0, 1]"
        )


def looks_like_probabilities(logits: torch.Tensor) -> bool:
    """True when every row is non-negative and sums to 1 (a softmax output, not logits)."""
    if logits.numel() == 0:
        return False
    sums = logits.double().sum(1)
    return bool((logits >= 0).all()) and bool(
        torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    )
