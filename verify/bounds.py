"""Layer-by-layer bounds: interval (IBP) and CROWN/DeepPoly back-substitution.

For an input box, every layer's outputs get a lower and an upper bound. Interval bounds
come first (one cheap pass); then, at every ReLU and max-pool, the pre-activation bounds
of the neurons that intervals leave unstable are tightened by back-substituting a linear
bound through all earlier layers to the input (DeepPoly; CROWN with the adaptive lower
slope). The output property is bounded the same way, row by row: a disjunct of the unsafe
set whose row is bounded away from it cannot be reached.

Bounds are computed in float64 from the weights (float32 values are exact in float64)
with rigorous outward rounding (`rounding.py`): every linear step adds an error term
2γₙ·Σ|coefficient|·|value bound| that grows with the magnitudes summed, the upper ReLU
slope is rounded up, and each bound steps one float outward at the end. They hold for the
exact (rational) network over the whole box, whatever the weights' scale. A folded layer's
`err` radius is added the same way. Branch and bound passes `splits` (a ReLU's phase
fixed) to bound a sub-problem; a sub-problem whose splits contradict the bounds is empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bastion.verify.layer_bounds import back_error, back_linear, interval
from bastion.verify.network import (
    Flatten,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)
from bastion.verify.rounding import U, down, magnitude, slack, up
from bastion.verify.spec import Property

_CHUNK = 2048  # rows back-substituted at once (memory: rows × widest layer)


class DeadlineReached(Exception):
    """The deadline passed while bounds were computed (`verify` answers UNKNOWN)."""


Splits = dict[int, torch.Tensor]
"""ReLU layer index → per-neuron phase (flat): 1 active (h ≥ 0), -1 inactive (h ≤ 0), 0 free."""


@dataclass
class LayerStats:
    """What the bounds say about one nonlinear layer (ReLU or max-pool)."""

    index: int
    kind: str
    neurons: int
    unstable: int
    unstable_ibp: int
    mean_width: float
    max_width: float

    def as_dict(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


@dataclass
class Bounds:
    """Bounds of every activation (index k: the output of layer k-1, 0 the input)."""

    lower: list[torch.Tensor]
    upper: list[torch.Tensor]
    stats: list[LayerStats]
    infeasible: bool  # the splits contradict the bounds: the sub-problem is empty

    def unstable(self, layer: int) -> torch.Tensor:
        """Flat mask of the unstable neurons entering ReLU `layer`."""
        return ((self.lower[layer] < 0) & (self.upper[layer] > 0)).flatten()


def _back_relu(
    a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on z = relu(h) → rows on h giving a lower bound (DeepPoly relaxation), the
    constant, and the rows' float64 error bound.

    The upper line z ≤ s·(h − l) is valid for any s ≥ u/(u − l): s is rounded up.
    """
    lo, hi = lo.unsqueeze(0), hi.unsqueeze(0)
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    slope = up(hi / down(hi - lo).clamp_min(1e-300))
    slope_up = torch.where(unstable, slope, active.to(a.dtype))
    slope_low = torch.where(unstable, (hi > -lo).to(a.dtype), active.to(a.dtype))
    pos, neg = a.clamp_min(0), a.clamp_max(0)
    intercept = torch.where(unstable, -slope_up * lo, torch.zeros_like(lo))
    const = (neg * intercept).flatten(1).sum(1)
    coeff = pos * slope_low + neg * slope_up
    mag = magnitude(lo, hi)
    err = slack(a[0].numel(), (coeff.abs() * mag + (neg * intercept).abs()).flatten(1).sum(1))
    return coeff, const, err


@dataclass
class _Windows:
    """Max-pool windows under bounds: which input has the largest lower bound (`src`, a
    flat position per window), whether it dominates, and the largest upper bound."""

    src: torch.Tensor  # c × windows
    dominated: torch.Tensor  # c × windows
    up_max: torch.Tensor  # c × windows


def _windows(layer: MaxPool2d, lo: torch.Tensor, hi: torch.Tensor) -> _Windows:
    c, h, w = lo.shape
    kk = layer.kernel[0] * layer.kernel[1]

    def unfold(t: torch.Tensor) -> torch.Tensor:  # c × kk × windows
        return F.unfold(t[None], layer.kernel, stride=layer.stride).view(c, kk, -1)

    lo_w, hi_w = unfold(lo), unfold(hi)
    pos_w = unfold(torch.arange(h * w, dtype=lo.dtype).view(1, h, w).expand(c, h, w))
    best = lo_w.argmax(1, keepdim=True)
    lo_max = lo_w.gather(1, best)[:, 0]
    others = hi_w.scatter(1, best, float("-inf")).amax(1)
    return _Windows(pos_w.gather(1, best)[:, 0].long(), lo_max >= others, hi_w.amax(1))


def _back_maxpool(
    layer: MaxPool2d, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on z = maxpool(x) → rows on x giving a lower bound, the constant, the error.

    Lower relaxation z ≥ x_i* (i* the input with the largest lower bound), upper z ≤ max u,
    or z = x_i* exactly when x_i*'s lower bound reaches every other input's upper bound.
    """
    c, h, w = lo.shape
    win = _windows(layer, lo, hi)
    flat = a.flatten(2)  # m × c × windows
    pos, neg = flat.clamp_min(0), flat.clamp_max(0)
    through = pos + torch.where(win.dominated, neg, torch.zeros_like(neg))
    const = (torch.where(win.dominated, torch.zeros_like(neg), neg) * win.up_max).flatten(1)
    coeff = a.new_zeros(a.shape[0], c, h * w)
    coeff.scatter_add_(2, win.src.expand(a.shape[0], c, -1), through)
    mag = magnitude(lo, hi).flatten(1).gather(1, win.src)  # c × windows
    size = flat.abs() * (mag + win.up_max.abs())
    err = slack(flat[0].numel() + lo.numel(), size.flatten(1).sum(1))
    return coeff.view(a.shape[0], c, h, w), const.sum(1), err


def back_substitute(
    network: Network,
    bounds_lo: list[torch.Tensor],
    bounds_hi: list[torch.Tensor],
    a: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Rigorous lower bounds of the rows `a` (m × shape of activation k) over the input box.

    Each step keeps the invariant row·z_{j+1} ≥ coeff·z_j + const − err for the exact
    network, with err bounding every float64 rounding so far (`rounding.py`).
    """
    out = []
    for rows in a.split(_CHUNK):
        coeff, const = rows, rows.new_zeros(rows.shape[0])
        err = rows.new_zeros(rows.shape[0])
        for j in range(k - 1, -1, -1):
            layer = network.layers[j]
            if isinstance(layer, ReLU):
                coeff, c, e = _back_relu(coeff, bounds_lo[j], bounds_hi[j])
            elif isinstance(layer, MaxPool2d):
                coeff, c, e = _back_maxpool(layer, coeff, bounds_lo[j], bounds_hi[j])
            elif isinstance(layer, Flatten):
                coeff, c = back_linear(layer, coeff, network.shapes[j])
                e = torch.zeros_like(c)
            else:
                e = back_error(layer, coeff, bounds_lo[j], bounds_hi[j])
                coeff, c = back_linear(layer, coeff, network.shapes[j])
            const = const + c
            err = err + e + 2 * U * const.abs()
        lo, hi = bounds_lo[0].unsqueeze(0), bounds_hi[0].unsqueeze(0)
        terms = coeff.clamp_min(0) * lo + coeff.clamp_max(0) * hi
        total = terms.flatten(1).sum(1)
        value = total + const
        size = terms.abs().flatten(1).sum(1) + value.abs() + const.abs()
        err = err + slack(lo.numel() + 2, size)
        out.append(down(value - up(err)))
    return torch.cat(out)


def _both(
    network: Network, lo: list[torch.Tensor], hi: list[torch.Tensor], a: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of the rows `a` in one back-substitution (rows a and −a)."""
    m = a.shape[0]
    both = back_substitute(network, lo, hi, torch.cat([a, -a]), k)
    return both[:m], -both[m:]


def compute_bounds(
    network: Network,
    prop: Property,
    *,
    method: str = "crown",
    splits: Splits | None = None,
    deadline: float | None = None,
) -> Bounds:
    """Bounds of every layer over the property's input box ("ibp" or "crown").

    With a `deadline` (a `time.perf_counter()` value) CROWN stops with `DeadlineReached`
    before a layer it would start after that time.
    """
    if method not in ("ibp", "crown"):
        raise ValueError(f"unknown bound method {method!r}; use 'ibp' or 'crown'")
    splits = splits or {}
    lo = [prop.lower.to(torch.float64)]
    hi = [prop.upper.to(torch.float64)]
    stats: list[LayerStats] = []
    infeasible = False
    for i, layer in enumerate(network.layers):
        if isinstance(layer, ReLU | MaxPool2d):
            ibp_unstable = _unstable_count(layer, lo[i], hi[i])
            if method == "crown" and i > 0:
                if deadline is not None and time.perf_counter() >= deadline:
                    raise DeadlineReached(f"deadline reached in CROWN before layer {i}")
                lo[i], hi[i] = _tighten(network, lo, hi, i)
            if i in splits:
                lo[i], hi[i] = _apply_split(lo[i], hi[i], splits[i])
            if bool((lo[i] > hi[i]).any()):
                infeasible = True
            width = (hi[i] - lo[i]).clamp_min(0)
            stats.append(
                LayerStats(
                    index=i,
                    kind="relu" if isinstance(layer, ReLU) else "maxpool",
                    neurons=_units(layer, lo[i]),
                    unstable=_unstable_count(layer, lo[i], hi[i]),
                    unstable_ibp=ibp_unstable,
                    mean_width=float(width.mean()) if width.numel() else 0.0,
                    max_width=float(width.max()) if width.numel() else 0.0,
                )
            )
        l_next, h_next = interval(layer, lo[i][None], hi[i][None])
        lo.append(l_next[0])
        hi.append(h_next[0])
    if method == "crown":
        n = len(network.layers)
        eye = torch.eye(network.num_outputs, dtype=torch.float64).view(-1, *network.shapes[n])
        low, high = _both(network, lo, hi, eye, n)
        lo[n] = torch.maximum(lo[n], low.view(network.shapes[n]))
        hi[n] = torch.minimum(hi[n], high.view(network.shapes[n]))
    return Bounds(lo, hi, stats, infeasible)


def _units(layer: Layer, lo: torch.Tensor) -> int:
    """Neurons of a ReLU layer, windows of a max-pool."""
    if isinstance(layer, MaxPool2d):
        return int(F.max_pool2d(lo[None], layer.kernel, layer.stride).numel())
    return lo.numel()


def _unstable_count(layer: Layer, lo: torch.Tensor, hi: torch.Tensor) -> int:
    """ReLUs with l < 0 < u, or max-pool windows no single input dominates."""
    if isinstance(layer, MaxPool2d):
        return int((~_windows(layer, lo, hi).dominated).sum())
    return int(((lo < 0) & (hi > 0)).sum())


def _undecided_members(layer: MaxPool2d, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Flat mask of the max-pool inputs that belong to a window no input dominates."""
    c, h, w = lo.shape
    kk = layer.kernel[0] * layer.kernel[1]
    win = _windows(layer, lo, hi)
    pos = (
        F.unfold(
            torch.arange(h * w, dtype=lo.dtype).view(1, 1, h, w), layer.kernel, stride=layer.stride
        )
        .view(kk, -1)
        .long()
    )  # kk × windows: the input positions of each window
    members = torch.zeros(c, h * w, dtype=torch.bool)
    for ch in range(c):
        open_windows = ~win.dominated[ch]
        members[ch, pos[:, open_windows].flatten()] = True
    return members.flatten()


def _tighten(
    network: Network,
    lo: list[torch.Tensor],
    hi: list[torch.Tensor],
    i: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds for the neurons entering layer i that intervals leave unstable."""
    shape = lo[i].shape
    flat_lo, flat_hi = lo[i].flatten().clone(), hi[i].flatten().clone()
    layer = network.layers[i]
    if isinstance(layer, MaxPool2d):  # only the inputs of windows no input dominates yet
        todo = _undecided_members(layer, lo[i], hi[i])
    else:
        todo = (flat_lo < 0) & (flat_hi > 0)
    rows = todo.nonzero().flatten()
    if len(rows) == 0:
        return lo[i], hi[i]
    lows, highs = [], []
    for part in rows.split(_CHUNK):
        a = torch.zeros(len(part), flat_lo.numel(), dtype=torch.float64)
        a[torch.arange(len(part)), part] = 1.0
        a = a.view(len(part), *shape)
        low_part, high_part = _both(network, lo, hi, a, i)
        lows.append(low_part)
        highs.append(high_part)
    low, high = torch.cat(lows), torch.cat(highs)
    flat_lo[rows] = torch.maximum(flat_lo[rows], low)
    flat_hi[rows] = torch.minimum(flat_hi[rows], high)
    return flat_lo.view(shape), flat_hi.view(shape)


def _apply_split(
    lo: torch.Tensor, hi: torch.Tensor, phase: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    flat_lo, flat_hi = lo.flatten().clone(), hi.flatten().clone()
    flat_lo[phase > 0] = flat_lo[phase > 0].clamp_min(0)
    flat_hi[phase < 0] = flat_hi[phase < 0].clamp_max(0)
    return flat_lo.view(lo.shape), flat_hi.view(hi.shape)


def property_lower_bounds(network: Network, prop: Property, bounds: Bounds) -> list[torch.Tensor]:
    """Per disjunct, rigorous lower bounds of its rows `A y − b` (a disjunct is excluded
    when any row's bound is > 0): back-substituted from the output, or by intervals on y."""
    n = len(network.layers)
    out = []
    for h in prop.unsafe:
        a = h.a.to(torch.float64)
        b = h.b.to(torch.float64)
        crown = down(back_substitute(network, bounds.lower, bounds.upper, a, n) - b)
        y_lo, y_hi = bounds.lower[n], bounds.upper[n]
        terms = a.clamp_min(0) * y_lo + a.clamp_max(0) * y_hi
        size = terms.abs().sum(1) + b.abs()
        ibp = down(terms.sum(1) - b - slack(a.shape[1] + 2, size))
        out.append(torch.maximum(crown, ibp))
    return out
