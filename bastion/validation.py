"""Early checks on images, labels and model outputs, each failing with one clear sentence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bastion.errors import BastionError, InvalidInputError, ModelOutputError


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
        f"pixel values span {span(low, high, lo, hi)} but must lie in [{lo:g}, {hi:g}]; put "
        "normalisation inside the model with bastion.Normalized instead of normalising the data"
    )


def span(low: float, high: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """`[low, high]` with enough digits that a value outside [lo, hi] does not print as
    inside it (1.0001 is not shown as 1)."""
    return f"[{_shown(low, lo, hi)}, {_shown(high, lo, hi)}]"


def _shown(value: float, lo: float, hi: float) -> str:
    outside = not lo <= value <= hi
    for digits in range(4, 18):
        text = f"{value:.{digits}g}"
        if not outside or not lo <= float(text) <= hi:
            return text
    return repr(value)


def check_model_accepts(model: Any, x: torch.Tensor, source: str = "the data") -> None:
    """Run the model once on the first two images of `x` (moved to the model's device) and
    require logits, so that a model that cannot take this data fails before any attack runs:
    an `InvalidInputError` naming the shapes, or a `ModelOutputError` for a tuple, a dict or
    NaN outputs."""
    probe = x[:2]
    device = next((t.device for t in _tensors(model)), None)
    if device is not None:
        probe = probe.to(device)
    try:
        with torch.no_grad():
            out = model(probe)
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's forward can raise anything
        shape = "×".join(map(str, x.shape[1:]))
        raise InvalidInputError(
            f"the model cannot take {shape} images from {source} ({_last_line(exc)}); give "
            "data of the size and channel count the model was trained on"
        ) from None
    if isinstance(out, (tuple, list, dict)):
        raise ModelOutputError(
            f"the model returns a {type(out).__name__} of {len(out)} outputs, not one tensor "
            "of logits; save a model whose forward returns only the logits (e.g. model(x)[0])"
        )
    check_logits(out, probe.shape[0])


def _tensors(model: Any) -> Iterator[torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()


def _last_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong: the first, or for a
    TorchScript error (a traceback of its own) the last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1] if "TorchScript" in lines[0] else lines[0]
    text = text.removeprefix("RuntimeError: ")
    return text if len(text) <= 160 else text[:157] + "..."


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
