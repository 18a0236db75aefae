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

from bastion.verify.alpha_crown import optimised_rows, tighten_layer
from bastion.verify.back_substitution import CHUNK, back_substitute, windows
from bastion.verify.layer_bounds import interval, interval_add
from bastion.verify.network import (
    Add,
    Layer,
    MaxPool2d,
    Network,
    ReLU,
)
from bastion.verify.rounding import down, slack
from bastion.verify.spec import Property


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
    alpha_deadline: float | None = None,
) -> Bounds:
    """Bounds of every layer over the property's input box ("ibp", "crown" or "alpha":
    CROWN, then alpha-CROWN's optimised slopes for the neurons still unstable).

    With a `deadline` (a `time.perf_counter()` value) CROWN stops with `DeadlineReached`
    before a layer it would start after that time. alpha-CROWN stops optimising at
    `alpha_deadline` (default `deadline`): the layers after it keep CROWN's bounds.
    """
    if method not in ("ibp", "crown", "alpha"):
        raise ValueError(f"unknown bound method {method!r}; use 'ibp', 'crown' or 'alpha'")
    splits = splits or {}
    stop = deadline if alpha_deadline is None else alpha_deadline
    lo = [prop.lower.to(torch.float64)]
    hi = [prop.upper.to(torch.float64)]
    stats: list[LayerStats] = []
    infeasible = False
    for i, layer in enumerate(network.layers):
        if isinstance(layer, ReLU | MaxPool2d):
            ibp_unstable = _unstable_count(layer, lo[i], hi[i])
            if method != "ibp" and i > 0:
                if deadline is not None and time.perf_counter() >= deadline:
                    raise DeadlineReached(f"deadline reached in CROWN before layer {i}")
                lo[i], hi[i] = _tighten(network, lo, hi, i)
                if method == "alpha" and isinstance(layer, ReLU):
                    lo[i], hi[i] = tighten_layer(network, lo, hi, i, deadline=stop)
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
        if isinstance(layer, Add):
            skip = (lo[layer.skip][None], hi[layer.skip][None])
            l_next, h_next = interval_add(layer, lo[i][None], hi[i][None], *skip)
        else:
            l_next, h_next = interval(layer, lo[i][None], hi[i][None])
        lo.append(l_next[0])
        hi.append(h_next[0])
    if method != "ibp":
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
        return int((~windows(layer, lo, hi).dominated).sum())
    return int(((lo < 0) & (hi > 0)).sum())


def _undecided_members(layer: MaxPool2d, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Flat mask of the max-pool inputs that belong to a window no input dominates."""
    c, h, w = lo.shape
    kk = layer.kernel[0] * layer.kernel[1]
    win = windows(layer, lo, hi)
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
    for part in rows.split(CHUNK):
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


def property_lower_bounds(
    network: Network,
    prop: Property,
    bounds: Bounds,
    *,
    iterations: int = 0,
    only: list[int] | None = None,
    deadline: float | None = None,
) -> list[torch.Tensor]:
    """Per disjunct, rigorous lower bounds of its rows `A y − b` (a disjunct is excluded
    when any row's bound is > 0): back-substituted from the output, or by intervals on y.

    With `iterations` > 0 the rows' ReLU slopes are optimised first (alpha-CROWN), for the
    disjuncts in `only` (default all; the others get CROWN's slopes).
    """
    n = len(network.layers)
    out = []
    for i, h in enumerate(prop.unsafe):
        a = h.a.to(torch.float64)
        b = h.b.to(torch.float64)
        if iterations > 0 and (only is None or i in only):
            rows, _ = optimised_rows(
                network, bounds.lower, bounds.upper, a.view(-1, *network.shapes[n]), n,
                iterations=iterations, deadline=deadline,
            )  # fmt: skip
        else:
            rows = back_substitute(network, bounds.lower, bounds.upper, a, n)
        crown = down(rows - b)
        y_lo, y_hi = bounds.lower[n], bounds.upper[n]
        terms = a.clamp_min(0) * y_lo + a.clamp_max(0) * y_hi
        size = terms.abs().sum(1) + b.abs()
        ibp = down(terms.sum(1) - b - slack(a.shape[1] + 2, size))
        out.append(torch.maximum(crown, ibp))
    return out
