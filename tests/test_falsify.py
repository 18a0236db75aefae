"""The verifier's attack-first search (APGD on the property's violation) against oracles:
nets whose unsafe set is known to be reachable only in a small corner of the box, and nets
where it is empty or only touched with zero depth. A point it returns must be inside the box
and strictly unsafe in exact rational arithmetic on the float32 weights."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
import torch
from torch import nn

from bastion.verify.falsify import falsify
from bastion.verify.spec import Halfspaces, Property

N_IN = 6


def _corner_net() -> nn.Sequential:
    """y0 = Σ relu(x_i − 1/2) + Σ x_i / 4 (max 4.5, only at the all-ones corner),
    y1 = relu(x_0 − 1/2), y2 = −Σ x_i. Every gradient is non-zero where it matters (the
    x_i / 4 terms move the inputs the ReLUs still ignore), and the corner's outputs are
    exact in float32."""
    first = nn.Linear(N_IN, 2 * N_IN)
    second = nn.Linear(2 * N_IN, 3)
    with torch.no_grad():
        first.weight.copy_(torch.cat([torch.eye(N_IN), torch.eye(N_IN)]))
        first.bias.copy_(torch.cat([torch.full((N_IN,), -0.5), torch.zeros(N_IN)]))
        second.weight.zero_()
        second.bias.zero_()
        second.weight[0, :N_IN] = 1.0
        second.weight[0, N_IN:] = 0.25
        second.weight[1, 0] = 1.0
        second.weight[2, N_IN:] = -1.0
    return nn.Sequential(first, nn.ReLU(), second)


def _rows(*rows: tuple[dict[int, float], float]) -> Halfspaces:
    """A conjunction of rows `Σ a_j y_j ≤ b`, given as ({j: a_j}, b)."""
    a = torch.zeros(len(rows), 3, dtype=torch.float64)
    b = torch.zeros(len(rows), dtype=torch.float64)
    for r, (coefs, rhs) in enumerate(rows):
        for j, c in coefs.items():
            a[r, j] = c
        b[r] = rhs
    return Halfspaces(a, b)


def _box(lower: float = 0.0, upper: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.full((N_IN,), lower, dtype=torch.float64),
        torch.full((N_IN,), upper, dtype=torch.float64),
    )


def _exact_depth(net: nn.Sequential, prop: Property, x: torch.Tensor) -> Fraction:
    """max over disjuncts of min over rows of b − A y at x, in rational arithmetic on the
    float32 weights (x must be inside the box, also checked exactly)."""
    xs = [Fraction(float(v)) for v in x.flatten().tolist()]
    lo = [Fraction(float(v)) for v in prop.lower.flatten().tolist()]
    hi = [Fraction(float(v)) for v in prop.upper.flatten().tolist()]
    assert all(a <= v <= b for a, v, b in zip(lo, xs, hi, strict=True)), "point leaves the box"
    h = xs
    for layer in net:
        if isinstance(layer, nn.Linear):
            w = [[Fraction(float(c)) for c in row] for row in layer.weight.tolist()]
            b = [Fraction(float(c)) for c in layer.bias.tolist()]
            h = [
                sum((wi * hi_ for wi, hi_ in zip(row, h, strict=True)), bi)
                for row, bi in zip(w, b, strict=True)
            ]
        else:
            h = [max(v, Fraction(0)) for v in h]
    depths = []
    for d in prop.unsafe:
        rows = [
            Fraction(float(d.b[r]))
            - sum(Fraction(float(c)) * y for c, y in zip(d.a[r].tolist(), h, strict=True))
            for r in range(len(d.b))
        ]
        depths.append(min(rows))
    return max(depths)


def _forward(net: nn.Module):  # type: ignore[no-untyped-def]
    return lambda x: net(x.to(torch.float32))


def test_finds_the_corner_of_a_reachable_unsafe_set_and_exact_arithmetic_confirms_it() -> None:
    """The unsafe set y0 ≥ 4.4 needs Σ x_i ≥ 5.92 (a 4e-10 share of the box): no start
    lands in it, the ascent must get there."""
    net = _corner_net()
    lo, hi = _box()
    prop = Property(lo, hi, (_rows(({0: -1.0}, -4.4)),))
    for seed in range(3):
        found = falsify(_forward(net), prop, seed=seed)
        assert found, seed
        depths = [_exact_depth(net, prop, x) for x in found]
        assert all(d > 0 for d in depths)
        assert depths == sorted(depths, reverse=True)  # deepest first


def test_disjunctive_property_reaches_the_only_reachable_conjunction() -> None:
    """(y0 ≥ 5) ∨ (y0 ≥ 3.9 ∧ y1 ≥ 0.3 ∧ y2 ≥ −5.8) ∨ (y1 ≤ −1): only the middle
    conjunction is reachable, in a thin slab below the corner (the corner itself violates
    its last row, so the rows pull against each other); each of its rows must hold."""
    net = _corner_net()
    lo, hi = _box()
    unsafe = (
        _rows(({0: -1.0}, -5.0)),
        _rows(({0: -1.0}, -3.9), ({1: -1.0}, -0.3), ({2: -1.0}, 5.8)),
        _rows(({1: 1.0}, -1.0)),
    )
    prop = Property(lo, hi, unsafe)
    for seed in range(3):
        found = falsify(_forward(net), prop, seed=seed)
        assert found, seed
        for x in found:
            assert _exact_depth(net, prop, x) > 0
            with torch.no_grad():
                y = net(x[None].float())[0]
            assert float(y[0]) >= 3.9 and float(y[1]) >= 0.3 and float(y[2]) >= -5.8


def test_never_claims_a_point_of_an_unreachable_unsafe_set() -> None:
    """y0 ≤ 4.5 and 0 ≤ y1 ≤ 1/2 everywhere: each disjunct is missed by at least 1e-4."""
    net = _corner_net()
    lo, hi = _box()
    unsafe = (
        _rows(({0: -1.0}, -4.5001)),
        _rows(({1: -1.0}, -0.5001)),
        _rows(({0: 1.0}, -1e-4)),
    )
    prop = Property(lo, hi, unsafe)
    for seed in range(3):
        assert falsify(_forward(net), prop, seed=seed, steps=200) == []


def test_a_boundary_touched_with_zero_depth_is_not_a_counterexample() -> None:
    """y0 ≥ 4.5 is reached only at the corner, with depth exactly 0 (exact in float32), and
    y1 ≤ 0 on the half of the box where x_0 ≤ 1/2, again with depth 0: the ascent drives
    to these points, but strictly unsafe points do not exist, so none is returned."""
    net = _corner_net()
    lo, hi = _box()
    prop = Property(lo, hi, (_rows(({0: -1.0}, -4.5)), _rows(({1: 1.0}, 0.0))))
    for seed in range(3):
        assert falsify(_forward(net), prop, seed=seed) == []


def test_points_stay_inside_a_box_whose_ends_are_not_float32() -> None:
    """Box ends such as 0.1 and 0.7 (not float32 numbers): the float32 points returned lie
    inside the float64 box, and fixed inputs (lower = upper) keep their value."""
    net = _corner_net()
    lo, hi = _box(0.1, 0.7)
    lo[3] = hi[3] = 0.25  # fixed; float32(0.25) is exact
    # on this box y0 ≤ 5 · 0.2 + (5 · 0.7 + 0.25) / 4 = 1.9375, reached at the upper corner
    prop = Property(lo, hi, (_rows(({0: -1.0}, -1.9)),))
    found = falsify(_forward(net), prop, seed=1)
    assert found
    for x in found:
        assert x.dtype == torch.float32
        assert bool(((x.double() >= lo) & (x.double() <= hi)).all())
        assert float(x[3]) == 0.25
        assert _exact_depth(net, prop, x) > 0


def test_a_point_on_an_open_face_is_not_returned() -> None:
    """y0 of the corner net on the box [0, 1/2]ⁿ with the upper faces open (as a strict
    `<` in a VNN-LIB file makes them): y0 > 0.75 − 1e-8 holds at the all-1/2 corner only,
    which the box excludes, so nothing may be returned; with closed faces it is found."""
    net = _corner_net()
    lo, hi = _box(0.0, 0.5)
    unsafe = (_rows(({0: -1.0}, -(0.75 - 1e-8))),)
    closed = Property(lo, hi, unsafe)
    found = falsify(_forward(net), closed, seed=0)
    assert found and all(bool((x == 0.5).all()) for x in found)
    open_ = Property(lo, hi, unsafe, open_upper=torch.ones(N_IN, dtype=torch.bool))
    for seed in range(3):
        assert falsify(_forward(net), open_, seed=seed) == []


def test_no_float32_point_in_the_box_means_no_search() -> None:
    """An input pinned to 0.1 (not a float32 number, so no float32 point is in the box)."""
    net = _corner_net()
    lo, hi = _box()
    lo[2] = hi[2] = 0.1
    prop = Property(lo, hi, (_rows(({0: 1.0}, 10.0)),))  # y0 ≤ 10: every point is unsafe
    assert falsify(_forward(net), prop) == []


def test_same_seed_same_points() -> None:
    net = _corner_net()
    lo, hi = _box()
    prop = Property(lo, hi, (_rows(({0: -1.0}, -4.4)),))
    a = falsify(_forward(net), prop, seed=4)
    b = falsify(_forward(net), prop, seed=4)
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_the_search_stops_at_the_deadline() -> None:
    """A slow model (20 ms a pass) and an unreachable unsafe set: the search ends within a
    pass or two of the deadline instead of running its 100 iterations (> 2 s)."""
    net = _corner_net()

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return net(x.to(torch.float32))

    lo, hi = _box()
    prop = Property(lo, hi, (_rows(({0: -1.0}, -5.0)),))
    start = time.perf_counter()
    assert falsify(slow, prop, deadline=start + 0.2) == []
    assert time.perf_counter() - start < 0.5
    start = time.perf_counter()
    assert falsify(slow, prop, deadline=start - 1.0) == []  # already past: no pass at all
    assert time.perf_counter() - start < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_finds_the_corner_on_cuda() -> None:
    net = _corner_net().cuda()
    lo, hi = _box()
    prop = Property(lo, hi, (_rows(({0: -1.0}, -4.4)),))
    found = falsify(_forward(net), prop, seed=0, device="cuda")
    assert found and all(x.device.type == "cuda" for x in found)
    assert all(_exact_depth(net.cpu(), prop, x.cpu()) > 0 for x in found)
