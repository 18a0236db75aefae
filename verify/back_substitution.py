"""Rigorous back-substitution: a lower bound of linear rows of an activation over the box.

A row `a·z_k` is carried back layer by layer to the input (CROWN/DeepPoly): through a
linear layer exactly, through a ReLU with a lower line z ≥ α·h (any α ∈ [0, 1]) and the
upper line z ≤ s·(h − l) of the triangle, through a max-pool with its window relaxation.
Every float64 step adds an error term that grows with the magnitudes summed
(`rounding.py`), so the result bounds the exact network whatever the weights' scale.

Two extensions serve the optimised bounds (`alpha_crown.py`, `beta_crown.py`):

- `Relaxation.alpha`: the lower slope of each unstable ReLU, per row (alpha-CROWN). Any
  value in [0, 1] gives a valid line; values outside are clamped, so optimised slopes
  from any arithmetic are re-evaluated here soundly.
- `Relaxation.beta` with `Relaxation.phase`: the split constraints of branch and bound,
  enforced by a multiplier β ≥ 0 (beta-CROWN). A split h ≥ 0 (phase +1) lets the
  coefficient c of h become fl(c − β) ≤ c, since c·h ≥ (c − β)·h wherever h ≥ 0; a split
  h ≤ 0 (phase −1) makes it fl(c + β) ≥ c. Rounding to nearest is monotone, so the float
  results keep these inequalities exactly and need no error term.

Bounds of an activation may be shared by all rows (its own shape) or given per row (a
leading row axis), so the rows of many branch-and-bound sub-problems, each with its own
bounds and splits, are bounded in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bastion.verify.layer_bounds import back_error, back_linear, shortcut_steps
from bastion.verify.network import Add, Flatten, MaxPool2d, Network, ReLU
from bastion.verify.rounding import U, down, magnitude, slack, up

CHUNK = 2048  # rows back-substituted at once (memory: rows × widest layer)


@dataclass
class Relaxation:
    """Per-row choices of the ReLU relaxations, by layer index; tensors `rows × neurons`
    (flat), or `neurons` shared by all rows (`phase` only)."""

    alpha: dict[int, torch.Tensor] = field(default_factory=dict)
    beta: dict[int, torch.Tensor] = field(default_factory=dict)
    phase: dict[int, torch.Tensor] = field(default_factory=dict)

    def take(self, rows: slice) -> Relaxation:
        """The choices of a slice of the rows."""

        def cut(d: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {j: (t[rows] if t.dim() == 2 else t) for j, t in d.items()}

        return Relaxation(cut(self.alpha), cut(self.beta), cut(self.phase))


def per_row(t: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether bounds `t` of an activation of `shape` carry a leading row axis."""
    return t.dim() == len(shape) + 1


def _rows(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t if per_row(t, shape) else t.unsqueeze(0)


def back_relu(
    a: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on z = relu(h) → rows on h giving a lower bound, the constant, and the rows'
    float64 error bound. `lo`, `hi` have a row axis (or 1); `alpha` (rows × neurons, flat)
    replaces CROWN's adaptive lower slope (1 where u > −l, else 0).

    The upper line z ≤ s·(h − l) is valid for any s ≥ u/(u − l): s is rounded up.
    """
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    slope = up(hi / down(hi - lo).clamp_min(1e-300))
    slope_up = torch.where(unstable, slope, active.to(a.dtype))
    if alpha is None:
        lower = (hi > -lo).to(a.dtype)
    else:
        lower = alpha.clamp(0, 1).view(a.shape[0], *a.shape[1:])
    slope_low = torch.where(unstable, lower, active.to(a.dtype))
    pos, neg = a.clamp_min(0), a.clamp_max(0)
    intercept = torch.where(unstable, -slope_up * lo, torch.zeros_like(lo))
    const = (neg * intercept).flatten(1).sum(1)
    coeff = pos * slope_low + neg * slope_up
    mag = magnitude(lo, hi)
    err = slack(a[0].numel(), (coeff.abs() * mag + (neg * intercept).abs()).flatten(1).sum(1))
    return coeff, const, err


def apply_beta(coeff: torch.Tensor, beta: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The split multipliers' term (module docstring): c − β where h ≥ 0, c + β where h ≤ 0."""
    b = beta.clamp_min(0).view(coeff.shape[0], -1)
    flat = coeff.flatten(1)
    p = phase.view(-1, flat.shape[1]) if phase.dim() > 1 else phase[None]
    out = torch.where(p > 0, flat - b, torch.where(p < 0, flat + b, flat))
    return out.view(coeff.shape)


@dataclass
class _Windows:
    """Max-pool windows under bounds: which input has the largest lower bound (`src`, a
    flat position per window), whether it dominates, and the largest upper bound."""

    src: torch.Tensor  # c × windows
    dominated: torch.Tensor  # c × windows
    up_max: torch.Tensor  # c × windows


def windows(layer: MaxPool2d, lo: torch.Tensor, hi: torch.Tensor) -> _Windows:
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


def back_maxpool(
    layer: MaxPool2d, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on z = maxpool(x) → rows on x giving a lower bound, the constant, the error.

    Lower relaxation z ≥ x_i* (i* the input with the largest lower bound), upper z ≤ max u,
    or z = x_i* exactly when x_i*'s lower bound reaches every other input's upper bound.
    Bounds shared by all rows only.
    """
    c, h, w = lo.shape
    win = windows(layer, lo, hi)
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
    relax: Relaxation | None = None,
) -> torch.Tensor:
    """Rigorous lower bounds of the rows `a` (m × shape of activation k) over the input box.

    Each step keeps the invariant row·z_{j+1} ≥ coeff·z_j + const − err for the exact
    network, with err bounding every float64 rounding so far (`rounding.py`). Bounds may be
    per row (module docstring); `relax` holds optimised slopes and split multipliers.
    """
    out = []
    shapes = network.shapes
    for start in range(0, a.shape[0], CHUNK):
        part = slice(start, start + CHUNK)
        rows = a[part]

        def bound(t: list[torch.Tensor], j: int, part: slice = part) -> torch.Tensor:
            return t[j][part] if per_row(t[j], shapes[j]) else t[j]

        chosen = relax.take(part) if relax is not None else Relaxation()
        coeff, const = rows, rows.new_zeros(rows.shape[0])
        err = rows.new_zeros(rows.shape[0])
        pending: dict[int, torch.Tensor] = {}  # coefficients on earlier activations (Add)
        for j in range(k - 1, -1, -1):
            layer = network.layers[j]
            lo, hi = bound(bounds_lo, j), bound(bounds_hi, j)
            if j + 1 in pending:
                nxt_lo, nxt_hi = bound(bounds_lo, j + 1), bound(bounds_hi, j + 1)
                coeff, e = merge(
                    coeff, pending.pop(j + 1), _rows(magnitude(nxt_lo, nxt_hi), shapes[j + 1])
                )
                err = err + e
            if isinstance(layer, Add):
                s_lo, s_hi = bound(bounds_lo, layer.skip), bound(bounds_hi, layer.skip)
                shape = shapes[layer.skip]
                side, c, e = back_shortcut(layer, coeff, s_lo, s_hi, shape)
                if layer.skip in pending:
                    mag = _rows(magnitude(s_lo, s_hi), shape)
                    side, extra = merge(side, pending[layer.skip], mag)
                    e = e + extra
                pending[layer.skip] = side
                const = const + c
                err = err + e + 2 * U * const.abs()
                continue
            if isinstance(layer, ReLU):
                lo_r, hi_r = _rows(lo, shapes[j]), _rows(hi, shapes[j])
                coeff, c, e = back_relu(coeff, lo_r, hi_r, chosen.alpha.get(j))
                if j in chosen.beta:
                    coeff = apply_beta(coeff, chosen.beta[j], chosen.phase[j])
            elif isinstance(layer, MaxPool2d):
                if per_row(lo, shapes[j]):
                    raise ValueError("max-pool bounds must be shared by all rows")
                coeff, c, e = back_maxpool(layer, coeff, lo, hi)
            elif isinstance(layer, Flatten):
                coeff, c = back_linear(layer, coeff, shapes[j])
                e = torch.zeros_like(c)
            else:
                e = back_error(layer, coeff, lo, hi, shapes[j])
                coeff, c = back_linear(layer, coeff, shapes[j])
            const = const + c
            err = err + e + 2 * U * const.abs()
        lo, hi = _rows(bound(bounds_lo, 0), shapes[0]), _rows(bound(bounds_hi, 0), shapes[0])
        if 0 in pending:
            coeff, e = merge(coeff, pending.pop(0), magnitude(lo, hi))
            err = err + e
        terms = coeff.clamp_min(0) * lo + coeff.clamp_max(0) * hi
        total = terms.flatten(1).sum(1)
        value = total + const
        size = terms.abs().flatten(1).sum(1) + value.abs() + const.abs()
        err = err + slack(lo[0].numel() + 2, size)
        out.append(down(value - up(err)))
    return torch.cat(out)


def merge(
    coeff: torch.Tensor, other: torch.Tensor, mag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows' coefficients on one activation (|z| ≤ mag) summed, and the error bound of
    that float sum's effect on the row: u·|c₁ + c₂|·|z| per entry, bounded by 2γ₂·Σ."""
    total = coeff + other
    size = ((coeff.abs() + other.abs()) * mag).flatten(1).sum(1)
    return total, slack(coeff[0].numel() + 2, size)


def back_shortcut(
    layer: Add, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on a residual join's output → the part on its shortcut's source: coefficients,
    constant and error bound (the shortcut is linear; its bounds are intervals)."""
    batched = lo if per_row(lo, shape) else lo.unsqueeze(0)
    steps = shortcut_steps(layer, batched, hi if per_row(hi, shape) else hi.unsqueeze(0))
    shapes = [tuple(t.shape[1:]) for t, _ in steps]
    const = a.new_zeros(a.shape[0])
    err = a.new_zeros(a.shape[0])
    for t in range(len(layer.shortcut) - 1, -1, -1):
        step = layer.shortcut[t]
        s_lo, s_hi = steps[t]
        if isinstance(step, Flatten):
            a, c = back_linear(step, a, shapes[t])
        else:
            e = back_error(
                step,
                a,
                s_lo if s_lo.shape[0] > 1 else s_lo[0],
                s_hi if s_hi.shape[0] > 1 else s_hi[0],
                shapes[t],
            )
            a, c = back_linear(step, a, shapes[t])
            err = err + e
        const = const + c
        err = err + 2 * U * const.abs()
    return a, const, err
