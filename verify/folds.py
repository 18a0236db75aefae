"""Exact folding of affine maps into a layer: the float64 result and its proven radius.

`Chain` folds BatchNorm and constant `+ - × ÷` into the preceding Dense, Conv2d or
Elementwise layer. A fold (s·w, s·b + t) is computed in float64; TwoProduct and TwoSum
(`rounding.py`) give each rounding's exact error, so the radius of the stored values'
distance from the exact ones is proven, and an exact fold gets radius zero.
"""

from __future__ import annotations

import torch

from bastion.verify.rounding import U, two_prod, two_sum


def parts(
    w: torch.Tensor, b: torch.Tensor, err: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    w, b = w.double(), b.double()
    if err is None:
        return w, b, (torch.zeros_like(w), torch.zeros_like(b))
    return w, b, (err[0].double(), err[1].double())


def compose(
    scale: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    t: torch.Tensor,
    te: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    we: torch.Tensor,
    be: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(s·w, s·b + t) in float64 and the radius of their distance from the exact values.

    `scale` is s shaped for w, its radius likewise, s shaped for b, its radius likewise;
    given |s − s*| ≤ se, |t − t*| ≤ te, |w − w*| ≤ we, |b − b*| ≤ be:
    |s*w* − fl(s·w)| ≤ se·(|w| + we) + |s|·we + |e|, with e the product's exact rounding
    error (TwoProduct), and the bias likewise: an exact fold gets radius zero.
    """
    sw, sew, sb, seb = scale
    w2, ew = two_prod(sw, w.expand(torch.broadcast_shapes(sw.shape, w.shape)))
    prod, e1 = two_prod(sb, b)
    b2, e2 = two_sum(prod, t)
    grow = 1 + 16 * U
    w_err = (sew * (w.abs() + we) + sw.abs() * we + ew.abs()) * grow
    b_err = (seb * (b.abs() + be) + sb.abs() * be + te + e1.abs() + e2.abs()) * grow
    return w2, b2, (w_err, b_err)


def nonzero(
    radius: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The radius, or None when the fold is exact (both parts zero)."""
    return radius if bool(radius[0].any() or radius[1].any()) else None


def per_channel(t: torch.Tensor) -> bool:
    return bool((t == t[:, :1, :1]).all())
