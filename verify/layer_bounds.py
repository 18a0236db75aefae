"""Linear layers in the bound computations, each step with its rigorous float64 error term.

Dense, Conv2d, Elementwise and AvgPool2d layers: their weight parts (cached per layer), the
interval image of a box (`interval`), a back-substitution step (`back_linear`) and the
error bound of that step (`back_error`): 2γₙ·|a|·(|W|·|z| + |b|) plus a folded layer's
radius (`rounding.py` states the error model). `bounds.py` composes them with the ReLU and
max-pool relaxations.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from bastion.verify.network import (
    Add,
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    Layer,
    MaxPool2d,
    ReLU,
    apply_layer,
)
from bastion.verify.rounding import U, down, magnitude, slack, up


def interval(layer: Layer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval image of a box through one layer (batch axis 1), rounded outward."""
    if isinstance(layer, Add):
        raise TypeError("a residual Add needs its source's bounds: use interval_add")
    if isinstance(layer, ReLU):
        return lo.clamp_min(0), hi.clamp_min(0)
    if isinstance(layer, MaxPool2d | Flatten):
        return apply_layer(layer, lo), apply_layer(layer, hi)
    pos, neg = weights(layer, lo.dtype)
    bias = _bias(layer, lo.dtype)
    low = linear_part(layer, lo, pos) + linear_part(layer, hi, neg) + bias
    high = linear_part(layer, hi, pos) + linear_part(layer, lo, neg) + bias
    err = _error(layer, magnitude(lo, hi))
    return down(low - err), up(high + err)


_PARTS: weakref.WeakKeyDictionary[Layer, dict[torch.dtype, tuple[torch.Tensor, ...]]] = (
    weakref.WeakKeyDictionary()
)


def weights(layer: Layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative parts of a linear layer's weight (scale), cached."""
    pos, neg, _ = _parts(layer, dtype)
    return pos, neg


def _parts(layer: Layer, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(W⁺, W⁻, |W|) of a linear layer in `dtype`, computed once per layer."""
    if isinstance(layer, AvgPool2d):
        one, zero = torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)
        return one, zero, one
    per_layer = _PARTS.setdefault(layer, {})
    if dtype not in per_layer:
        w = (layer.scale if isinstance(layer, Elementwise) else layer.weight).to(dtype)  # type: ignore[union-attr]
        per_layer[dtype] = (w.clamp_min(0), w.clamp_max(0), w.abs())
    return per_layer[dtype]


def _bias(layer: Layer, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(layer, Dense):
        return layer.bias.to(dtype)
    if isinstance(layer, Conv2d):
        return layer.bias.to(dtype)[:, None, None]
    if isinstance(layer, Elementwise):
        return layer.shift.to(dtype)
    return torch.zeros((), dtype=dtype)


def linear_part(layer: Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's linear part (no bias) with weight (scale) `w`, on a batch x."""
    if isinstance(layer, Dense):
        return F.linear(x, w)
    if isinstance(layer, Conv2d):
        return F.conv2d(x, w, None, stride=layer.stride, padding=layer.padding)
    if isinstance(layer, Elementwise):
        return x * w
    if isinstance(layer, AvgPool2d):  # w is the scalar 1 (or 0 for its negative part)
        return F.avg_pool2d(x, layer.kernel, layer.stride, layer.padding) * w
    raise TypeError(f"not a linear layer: {layer!r}")


def _terms(layer: Layer) -> int:
    """Products summed per output of the layer (forward), plus the bias and two adds."""
    if isinstance(layer, Dense):
        n = layer.weight.shape[1]
    elif isinstance(layer, Conv2d):
        n = layer.weight[0].numel()
    elif isinstance(layer, AvgPool2d):
        n = layer.kernel[0] * layer.kernel[1] + 1  # the sum, then one division
    else:
        n = 1
    return 2 * n + 4


def _error(layer: Layer, mag: torch.Tensor) -> torch.Tensor:
    """Bound of |float64 result − exact result| of the layer on inputs |x| ≤ mag (batch
    axis 1), including the layer's fold radius: 2γₙ(|W|·mag + |b|) + Werr·mag + berr."""
    absolute, fold = abs_image(layer, mag)
    return slack(_terms(layer), absolute) + fold


def abs_image(layer: Layer, mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|W|·mag + |b|, an upper bound of the fold radius' effect Werr·mag + berr)."""
    absolute = linear_part(layer, mag, _parts(layer, mag.dtype)[2]) + _bias(layer, mag.dtype).abs()
    radius = getattr(layer, "err", None)
    if radius is None:
        return absolute, torch.zeros_like(absolute)
    w_err, b_err = (r.to(mag.dtype) for r in radius)
    fold = linear_part(layer, mag, w_err) + _bias_like(layer, b_err)
    return absolute, fold * (1 + 8 * _terms(layer) * U)


def _bias_like(layer: Layer, b: torch.Tensor) -> torch.Tensor:
    return b[:, None, None] if isinstance(layer, Conv2d) else b


def back_linear(
    layer: Layer, a: torch.Tensor, in_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients on the layer's input and the constant, for rows `a` on its output."""
    m = a.shape[0]
    if isinstance(layer, Flatten):
        return a.reshape(m, *in_shape), a.new_zeros(m)
    if isinstance(layer, Dense):
        w, b = layer.weight.to(a), layer.bias.to(a)
        return a @ w, a @ b
    if isinstance(layer, Elementwise):
        scale = layer.scale.to(a).expand(in_shape)
        shift = layer.shift.to(a).expand(in_shape)
        return a * scale, (a * shift).flatten(1).sum(1)
    if isinstance(layer, Conv2d):
        w, b = layer.weight.to(a), layer.bias.to(a)
        const = (a.sum((2, 3)) * b).sum(1)
        return _transpose_conv(a, w, layer.stride, layer.padding, in_shape, 1), const
    if isinstance(layer, AvgPool2d):
        c = in_shape[0]
        k = layer.kernel
        w = a.new_full((c, 1, *k), 1.0 / (k[0] * k[1]))
        return _transpose_conv(a, w, layer.stride, layer.padding, in_shape, c), a.new_zeros(m)
    raise TypeError(f"not a linear layer: {layer!r}")


def _transpose_conv(
    a: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    in_shape: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    out_pad = [
        in_shape[1 + d] - ((a.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + w.shape[2 + d])
        for d in range(2)
    ]
    return F.conv_transpose2d(
        a, w, stride=stride, padding=padding, output_padding=out_pad, groups=groups
    )


def back_error(
    layer: Layer,
    a: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Error bound of one back step through a linear layer for rows `a` on its output:
    2γₙ·|a|·(|W|·mag + |b|) plus the fold radius' effect, n ≥ the length of every sum.
    `lo`, `hi` are the layer input's bounds, shared, or per row when they have one more
    axis than `shape` (the input's shape)."""
    mag = magnitude(lo, hi)
    if shape is None or mag.dim() == len(shape):
        mag = mag.unsqueeze(0)
    absolute, fold = abs_image(layer, mag)
    n = mag[0].numel() + a[0].numel() + _terms(layer)
    rows = a.abs().flatten(1)
    size = (rows * absolute.flatten(1)).sum(1)
    return slack(n, size) + (rows * fold.flatten(1)).sum(1) * (1 + 4 * n * U)


def shortcut_steps(
    layer: Add, lo: torch.Tensor, hi: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Interval bounds (batch axis 1) of each activation along a residual shortcut, from
    its source's bounds: the source first, the shortcut's output last."""
    steps = [(lo, hi)]
    for step in layer.shortcut:
        steps.append(interval(step, *steps[-1]))
    return steps


def interval_add(
    layer: Add,
    lo: torch.Tensor,
    hi: torch.Tensor,
    skip_lo: torch.Tensor,
    skip_hi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval image of a residual join (batch axis 1): the input's bounds plus the
    shortcut's, each sum stepped one float outward (it rounds once, by half an ulp)."""
    s_lo, s_hi = shortcut_steps(layer, skip_lo, skip_hi)[-1]
    return down(lo + s_lo), up(hi + s_hi)
