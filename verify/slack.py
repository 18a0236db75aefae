"""How far the exact engines' network may be from the real one, as a widening of the unsafe set.

The exact engines (z3, the MILP) decide the network as stored. Two things separate that
from the network as given: a folded layer holds a float64 rounding of an irrational or
inexact fold (its `err` radius), and HiGHS solves in floating point with feasibility
tolerances. Both are bounded here as a per-output deviation d ≥ |y(x) − ŷ(x)| over the box,
propagated layer by layer: d' = |W|·d + Werr·|z| + berr + rel·(|W|·|z| + |b| + 1) through a
linear layer (|z| from the layer bounds; rel models a tolerance relative to the magnitudes
a row sums), unchanged through ReLU (1-Lipschitz), the window maximum through max-pool.
A disjunct `A y ≤ b` is then widened to `A y ≤ b + |A|·d`: if the stored network cannot
reach the widened set, the real one cannot reach the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bastion.verify.bounds import Bounds
from bastion.verify.layer_bounds import abs_image, linear_part, weights
from bastion.verify.network import Flatten, MaxPool2d, Network, ReLU
from bastion.verify.rounding import gamma, magnitude, up
from bastion.verify.spec import Halfspaces


def output_deviation(network: Network, bounds: Bounds, rel: float = 0.0) -> torch.Tensor:
    """Per output, an upper bound of |y − ŷ| over the box (see the module docstring)."""
    d = rel * (magnitude(bounds.lower[0], bounds.upper[0]) + 1)
    for j, layer in enumerate(network.layers):
        if isinstance(layer, ReLU):
            continue
        if isinstance(layer, MaxPool2d):
            d = F.max_pool2d(d[None], layer.kernel, layer.stride)[0]
            continue
        if isinstance(layer, Flatten):
            d = d.flatten()
            continue
        mag = magnitude(bounds.lower[j], bounds.upper[j])[None]
        absolute, fold = abs_image(layer, mag)
        pos, neg = weights(layer, d.dtype)
        spread = linear_part(layer, d[None], pos - neg)
        n = d.numel() + 4
        d = up((spread + fold + rel * (absolute + 1))[0] * (1 + 2 * gamma(n)))
    return d.flatten()


def widen(disjunct: Halfspaces, deviation: torch.Tensor) -> Halfspaces:
    """`A y ≤ b + |A|·d`, rounded up: reachable by ŷ whenever y reaches `A y ≤ b`."""
    if not bool(deviation.any()):
        return disjunct
    a = disjunct.a.double()
    extra = a.abs() @ deviation.double()
    n = a.shape[1] + 2
    return Halfspaces(disjunct.a, up(disjunct.b.double() + extra * (1 + 2 * gamma(n))))
