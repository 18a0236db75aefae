"""The minimum-norm step from a point onto a hyperplane inside the pixel box (FAB's projection).

Given points t, hyperplanes w·z = b and the box [lo, hi], find per row the step d of least
L∞ or L2 norm with w·(t + d) = b and t + d in the box. After flipping signs so that the
required gain c = b − w·t is ≥ 0, each coordinate moves towards the box face in the
direction of w_i by d_i = sign(w_i)·min(λ·r_i, room_i), with r_i = 1 (L∞) or |w_i| (L2):
the gain g(λ) = Σ |w_i|·min(λ·r_i, room_i) is increasing and piecewise linear in λ, with
breakpoints room_i / r_i, so λ is found by sorting the breakpoints and solving the linear
piece where g crosses c. Where even the whole box cannot reach the plane, every
coordinate moves to its face (the furthest the box allows).
"""

from __future__ import annotations

import numpy as np
import torch

from bastion.results import Norm


def _sort_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t.sort(1)`. On the CPU through NumPy's quicksort, several times faster there than
    torch's sort (the sort is most of FAB's projection, and the projection about half of
    FAB's time); ties may come out in another order, which changes λ by rounding only."""
    if t.device.type != "cpu":
        return t.sort(1)
    order = torch.from_numpy(np.argsort(t.numpy(), axis=1))
    return t.gather(1, order), order


def project_onto_hyperplane(
    t: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    norm: Norm,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The step d (rows like `t`, N × D) of least `norm` onto {z : w·z = b} ∩ box."""
    lo, hi = bounds
    c = b - (w * t).sum(1)
    up = (w > 0) == (c >= 0)[:, None]  # the direction each coordinate moves in
    c = c.abs()[:, None]
    room = torch.where(up, hi - t, t - lo).clamp_min(0)
    size = w.abs()
    active = size > 0
    rate = size.masked_fill(~active, 1) if norm == "l2" else None  # r_i (L∞: 1)
    # breakpoints λ_i = room_i / r_i; a zero weight never moves (a huge breakpoint, no slope)
    brk = room / rate if rate is not None else room.clone()
    brk = brk.masked_fill(~active, torch.finfo(t.dtype).max)
    brk_s, order = _sort_rows(brk)
    value = (size * room).gather(1, order)  # a coordinate's gain once at its face
    slope = (size * rate if rate is not None else size).gather(1, order)  # gain per unit λ
    zero = torch.zeros_like(c)
    cum_v = torch.cat([zero, value.cumsum(1)], 1)  # cum_v[:, k]: the first k saturated
    cum_s = torch.cat([zero, slope.cumsum(1)], 1)
    total_s = cum_s[:, -1:]
    gain = cum_v[:, 1:] + brk_s * (total_s - cum_s[:, 1:])  # g at each breakpoint
    k = (gain < c).sum(1, keepdim=True)  # breakpoints passed before g reaches c
    lam = (c - cum_v.gather(1, k)) / (total_s - cum_s.gather(1, k)).clamp_min(1e-30)
    lam = lam.masked_fill(c >= cum_v[:, -1:], torch.inf)  # unreachable: go to the faces
    step = torch.minimum(lam * rate if rate is not None else lam.expand_as(room), room)
    step = step * (active & (c > 0)).to(t.dtype)
    return torch.where(up, step, -step)
