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

import torch

from bastion.results import Norm


def project_onto_hyperplane(
    t: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    norm: Norm,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The step d (rows like `t`, N × D) of least `norm` onto {z : w·z = b} ∩ box."""
    dtype = t.dtype
    t, w, b = t.double(), w.double(), b.double()
    lo, hi = bounds
    c = b - (w * t).sum(1)
    up = (w > 0) == (c >= 0)[:, None]  # the direction each coordinate moves in
    c = c.abs()
    room = torch.where(up, hi - t, t - lo).clamp_min(0)
    size = w.abs()
    active = size > 0
    rate = torch.ones_like(size) if norm == "linf" else size
    # breakpoints λ_i = room_i / r_i (inactive coordinates never move: +inf)
    brk = torch.where(active, room / rate.clamp_min(1e-300), torch.inf)
    order = brk.argsort(1)
    brk_s = brk.gather(1, order)
    value = (size * room).gather(1, order)  # the gain of a coordinate once saturated
    slope = (size * rate).gather(1, order)  # its gain per unit λ before that
    cum_v, cum_s = value.cumsum(1), slope.cumsum(1)
    total_s = cum_s[:, -1:]
    reach = cum_v[:, -1]  # the gain with every coordinate at its face
    gain = torch.where(brk_s.isfinite(), cum_v + brk_s * (total_s - cum_s), reach[:, None])
    k = (gain < c[:, None]).sum(1, keepdim=True)  # breakpoints passed before g reaches c
    zero = torch.zeros_like(c)[:, None]
    before_v = torch.where(k > 0, cum_v.gather(1, (k - 1).clamp_min(0)), zero)
    before_s = torch.where(k > 0, cum_s.gather(1, (k - 1).clamp_min(0)), zero)
    lam = (c[:, None] - before_v) / (total_s - before_s).clamp_min(1e-300)
    lam = torch.where((c >= reach)[:, None], torch.inf, lam)
    d = torch.minimum(lam * rate, room) * torch.where(up, 1.0, -1.0).to(t)
    return torch.where(active & (c > 0)[:, None], d, torch.zeros_like(d)).to(dtype)
