"""DLV mode (Huang et al., CAV 2017): grid search over feature regions, z3 back-propagation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from bastion.verify.dlv import _Search, analysed_layers, verify_dlv
from bastion.verify.dlv_containment import contains, covering_region, extend_chain, image_delta
from bastion.verify.dlv_regions import (
    Region,
    back_propagate,
    coefficients,
    grid_size,
    grid_values,
    input_features,
)
from bastion.verify.dlv_verdict import DISCRETISED_SAFE
from bastion.verify.extract import extract
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE

PLANTED = [1, 6, 9, 12, 15]  # the feature whose pixels, pushed to 1.0, flip the class


def _planted(robust: bool = False) -> nn.Module:
    """h0 = Σ_planted x + 0.01 Σ_others x, h1 = 2.5; y0 = h1 (+10 if robust), y1 = h0.

    At x = 0.2 everywhere h0 ≈ 1.02 (class 0); three planted pixels at 1.0 give h0 > 2.5.
    """
    first, second = nn.Linear(16, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.fill_(0.0)
        first.weight[0] = 0.01
        first.weight[0, PLANTED] = 1.0
        first.bias.copy_(torch.tensor([0.0, 2.5]))
        second.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        second.bias.copy_(torch.tensor([10.0 if robust else 0.0, 0.0]))
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), second).eval()


X = torch.full((1, 4, 4), 0.2)
PLANTED_ARGS = dict(heuristic="derivative", span=0.4, num_span=2, features=3, timeout=30.0)


def _on_grid(adv: torch.Tensor, x: torch.Tensor, dims: list[int], span: float, m: int) -> bool:
    flat, base = adv.flatten().double(), x.flatten().double()
    others = torch.ones(len(flat), dtype=torch.bool)
    others[dims] = False
    if not torch.equal(flat[others], base[others]):
        return False
    for p in dims:
        start = float(base[p])
        allowed = {float(np.float32(min(max(start + c * span, 0), 1))) for c in range(-m, m + 1)}
        if float(flat[p]) not in allowed:
            return False
    return True


def test_dlv_finds_planted_adversarial_example_on_the_grid() -> None:
    model = _planted()
    v = verify_dlv(model, X, enumeration="convex", **PLANTED_ARGS)
    assert v.status == UNSAFE and v.engine == "dlv"
    assert sorted(v.details["dims"]) == PLANTED
    assert v.counterexample is not None
    assert int(model(v.counterexample[None]).argmax()) == 1  # the float32 model flips
    assert _on_grid(v.counterexample, X, PLANTED, 0.4, 2)
    # convex: corners only, so every planted pixel is at 0 or 1
    assert set(v.counterexample.flatten()[PLANTED].tolist()) <= {0.0, 1.0}


def test_line_enumeration_reports_fewest_manipulations() -> None:
    """Four 0.4-steps are needed (h0 must rise by > 1.478); ladder order finds one of them."""
    v = verify_dlv(_planted(), X, enumeration="line", **PLANTED_ARGS)
    assert v.status == UNSAFE
    assert v.details["manipulations"] == 4
    assert v.counterexample is not None
    assert _on_grid(v.counterexample, X, PLANTED, 0.4, 2)


def test_robust_toy_case_is_safe_with_the_minimality_guarantee() -> None:
    """Layers 0 and 2 (the first Linear's output, where only h0 moves: the region holds the
    image) are analysed; layer 2 carries the discretised guarantee, after z3 mapped its grid
    points back to inputs."""
    v = verify_dlv(_planted(robust=True), X, enumeration="line", continuous=True, **PLANTED_ARGS)
    assert v.status == SAFE and v.claim == DISCRETISED_SAFE
    assert v.summary().startswith(DISCRETISED_SAFE + " ")
    assert v.guarantee.startswith(DISCRETISED_SAFE + ":")
    assert "minimality assumption at layer 2 (not checked)" in v.guarantee
    assert v.details["analysed_layers"] == [0, 2] and v.details["carried_by_layer"] == 2
    assert v.details["features_examined"] == 3
    layer0, layer2 = v.layers
    assert layer0["points"] == 3 * 4**5  # 0.2 − 0.4 and 0.2 − 0.8 both clip to 0
    assert layer2["contained"] == layer2["features"] == 3 and layer2["moving"] == 1
    assert layer2["z3_queries"] > 0 and v.details["z3_queries"] == layer2["z3_queries"]
    cont = v.details["continuous"]
    assert cont["status"] == SAFE and cont["features"] == [SAFE] * 3


def test_input_layer_only_says_what_its_grid_covers() -> None:
    v = verify_dlv(_planted(robust=True), X, enumeration="line", layer=0, **PLANTED_ARGS)
    assert v.status == SAFE and v.details["carried_by_layer"] == 0
    assert "nothing is proved for the continuous region" in v.guarantee
    assert v.details["z3_queries"] == 0 and len(v.layers) == 1


@pytest.mark.parametrize("budget", [{"max_points": 31}, {"timeout": 1e-9}])
def test_budget_or_timeout_is_unknown_never_safe(budget: dict[str, float]) -> None:
    args = {**PLANTED_ARGS, **budget}
    v = verify_dlv(_planted(robust=True), X, enumeration="convex", **args)  # type: ignore[arg-type]
    assert v.status == UNKNOWN and v.reason and not v.guarantee


def test_continuous_mode_never_safe_where_the_grid_finds_an_example() -> None:
    v = verify_dlv(_planted(), X, enumeration="convex", continuous=True, **PLANTED_ARGS)
    assert v.status == UNSAFE
    assert v.details["continuous"]["status"] == UNSAFE


def test_grid_count_equals_formula() -> None:
    for d, m in [(1, 1), (3, 2), (5, 1)]:
        assert len(coefficients(d, m, "line")) == (2 * m + 1) ** d
        assert len(coefficients(d, m, "convex")) == 2**d
        assert len(coefficients(d, m, "point")) == 1
        steps = np.abs(coefficients(d, m, "line")).sum(1)
        assert (np.diff(steps) >= 0).all()  # ladder order: fewest span steps first
    region = Region(0, np.array([0, 3, 7]), np.full(3, 0.1), 2)
    inside = np.full(10, 0.5)
    for mode, count in [("line", 125), ("convex", 8), ("point", 1)]:
        values, _ = grid_values(region, inside, mode, (0.0, 1.0))
        assert len(values) == count == grid_size(region, inside, mode, (0.0, 1.0))
    edge = inside.copy()
    edge[[0, 3]] = [0.05, 1.0]  # clipping merges points: 4 × 3 × 5 distinct values
    values, _ = grid_values(region, edge, "line", (0.0, 1.0))
    assert len(values) == len(np.unique(values, axis=0)) == 60
    assert grid_size(region, edge, "line", (0.0, 1.0)) == 60


def _random_net(sizes: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _chain(net, first, k, x=None):  # type: ignore[no-untyped-def]
    """The regions of activations 0…k grown from the input feature `first` (around x,
    0.5 everywhere by default), as the search builds them."""
    x = torch.full(net.input_shape, 0.5) if x is None else x
    acts = [a[0].flatten().numpy() for a in net.activations(x.double()[None])]
    chain = [first]
    extend_chain(net, acts, chain, k, 5)
    return chain


def _target_of(net, x, regions, moved):  # type: ignore[no-untyped-def]
    acts = net.activations(moved.double()[None])
    return acts[regions[-1].layer][0].flatten().numpy()[regions[-1].dims]


def test_backprop_of_dense_target_reproduces_it_in_float64() -> None:
    net = extract(_random_net((16, 6, 2), 0), (1, 4, 4))
    dims = np.array([0, 5, 6, 10, 11])
    regions = _chain(net, Region(0, dims, np.full(5, 0.1), 2), 2)
    assert len(regions[-1].dims) == 5
    x = torch.full((1, 4, 4), 0.5)
    moved = x.clone().flatten()
    moved[dims] += torch.tensor([0.2, -0.1, 0.15, -0.2, 0.05])
    target = _target_of(net, x, regions, moved.view(1, 4, 4))
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() + 30)
    assert back.status in ("realised", "unknown")
    if back.status == "realised":
        assert back.input is not None
        reached = _target_of(net, x, regions, torch.from_numpy(back.input).view(1, 4, 4))
        np.testing.assert_allclose(reached, target, rtol=1e-9, atol=1e-9)
        assert (np.abs(back.input - x.flatten().numpy()) <= 0.2 + 1e-12).all()


def test_backprop_of_unreachable_target_is_never_realised() -> None:
    net = extract(_random_net((16, 6, 2), 0), (1, 4, 4))
    regions = _chain(net, Region(0, np.array([0, 5, 6, 10, 11]), np.full(5, 0.1), 2), 2)
    x = torch.full((1, 4, 4), 0.5)
    target = _target_of(net, x, regions, x) + 100.0  # far outside what the box can reach
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() + 30)
    assert back.status in ("unsat", "unknown") and back.input is None


def test_backprop_past_its_deadline_is_unknown_not_unsat() -> None:
    """DLV's code reports a z3 timeout as unsatisfiable; ours must say unknown."""
    net = extract(_random_net((16, 6, 2), 0), (1, 4, 4))
    regions = _chain(net, Region(0, np.array([0, 5, 6, 10, 11]), np.full(5, 0.1), 2), 2)
    x = torch.full((1, 4, 4), 0.5)
    target = _target_of(net, x, regions, x)
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() - 1.0)
    assert back.status == "unknown" and back.input is None and back.queries == 1


def test_backprop_through_conv_band_on_demo(demo: nn.Module) -> None:
    net = extract(demo, (1, 8, 8))
    x = torch.full((1, 8, 8), 0.3)
    dims = np.array([18, 19, 26, 27, 35])
    regions = _chain(net, Region(0, dims, np.full(5, 0.1), 1), 1, x)
    moved = x.clone().flatten()
    moved[dims] += 0.1
    target = _target_of(net, x, regions, moved.view(1, 8, 8))
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() + 30)
    assert back.status in ("realised", "unknown") and back.queries == 1
    if back.status == "realised":
        assert back.input is not None
        reached = _target_of(net, x, regions, torch.from_numpy(back.input).view(1, 8, 8))
        assert (np.abs(reached - target) <= regions[-1].span + 1e-9).all()


def test_hidden_layer_finds_planted_example_through_z3() -> None:
    """Layer 2 alone (the search's hidden step): only h0 moves, its region covers the image
    [−1, 4] with span 2; h0 + 2 flips the class, z3 maps it back to an input, and the
    float32 model, run on that input alone, changes its class."""
    model = _planted()
    net = extract(model, (1, 4, 4))
    feats = input_features(net, X, 0, feature_dims=5, heuristic="derivative")
    search = _Search(net, lambda b: model(b), X, 0, "line", [2], 64, 10.0)
    with torch.no_grad():
        v = search.run(feats[:1], 0.4, 2, 5, time.perf_counter() + 30, 10_000, None)
    assert v.status == UNSAFE and v.details["layer_found"] == 2
    assert v.details["backprop_status"] == "realised" and v.details["z3_queries"] >= 1
    assert v.counterexample is not None and v.margin is not None and v.margin > 0
    assert int(model(v.counterexample[None]).argmax()) == 1
    box = (X.flatten()[PLANTED] - 0.8).clamp(0, 1), (X.flatten()[PLANTED] + 0.8).clamp(0, 1)
    moved = v.counterexample.flatten()
    assert ((moved[PLANTED] >= box[0]) & (moved[PLANTED] <= box[1])).all()
    others = torch.ones(16, dtype=torch.bool)
    others[PLANTED] = False
    assert torch.equal(moved[others], X.flatten()[others])


def test_layer0_unsafe_is_never_safe_at_a_deeper_layer(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    """The issue's reproduction: on an image where the input grid finds a counterexample,
    every K > 0 answers UNSAFE too (layer 0 is analysed first), with a replayed witness."""
    net = extract(demo, tuple(digits.x[0].shape))
    hidden = analysed_layers(net, len(net.layers) - 2)[1:]
    assert hidden
    args = dict(features=10, span=0.25, num_span=2, enumeration="line", timeout=60.0)
    found = 0
    for i in range(6):
        base = verify_dlv(demo, digits.x[i], layer=0, **args)  # type: ignore[arg-type]
        if base.status != UNSAFE:
            continue
        found += 1
        for k in hidden:
            v = verify_dlv(demo, digits.x[i], layer=k, **args)  # type: ignore[arg-type]
            assert v.status == UNSAFE and v.details["layer_found"] == 0
            assert v.counterexample is not None
            assert int(demo(v.counterexample[None]).argmax()) != v.details["label"]
    assert found


def test_hidden_safe_never_comes_without_z3_or_containment(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    """On the demo CNN a 5-pixel feature moves hundreds of conv outputs: the layer-1 region
    cannot contain the image, so layer 1 never carries a SAFE and the guarantee says so."""
    for i in range(1, 4):
        v = verify_dlv(demo, digits.x[i], features=4, span=0.25, num_span=2)
        assert v.details["analysed_layers"] == [0, 1]
        if v.status != SAFE:
            continue
        layer1 = v.layers[1]
        assert layer1["contained"] < layer1["features"] and layer1["moving"] > 5
        assert v.details["carried_by_layer"] == 0
        assert "layer 1 was searched" in v.guarantee and "not carry the guarantee" in v.guarantee
        assert v.summary().startswith(DISCRETISED_SAFE)


def test_unrealisable_hidden_flip_is_not_a_counterexample() -> None:
    """a = x_p + x_q and b = x_p − x_q, y1 − y0 = a + b − 2.1 = 2·x_p − 2.1 < 0 on the whole
    box: the hidden corner (a, b) = (max, max) flips but needs x_p > 1. z3 proves it
    unrealisable: no UNSAFE, and layer 1 does not carry the guarantee."""
    first, second = nn.Linear(4, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 1.0, 0, 0], [1.0, -1.0, 0, 0]]))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        second.bias.copy_(torch.tensor([0.0, -2.1]))
    model = nn.Sequential(nn.Flatten(), first, second).eval()
    x = torch.full((1, 2, 2), 0.5)
    v = verify_dlv(model, x, features=1, feature_dims=2, span=0.5, heuristic="activation",
                   enumeration="convex", layer=2)  # fmt: skip
    assert v.status == SAFE and v.details["carried_by_layer"] == 0
    layer2 = v.layers[1]
    assert layer2["flips"] == layer2["spurious"] >= 1 and layer2["backprop"].get("unsat")


def _sample_deltas(net, x, region, k, n=400, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    base = x.double().flatten()
    lo = (base[region.dims] - torch.from_numpy(region.span * region.num_span)).clamp(0, 1)
    hi = (base[region.dims] + torch.from_numpy(region.span * region.num_span)).clamp(0, 1)
    pts = base.repeat(n, 1)
    u = torch.rand(n, len(region.dims), generator=gen, dtype=torch.float64)
    u[: n // 2] = u[: n // 2].round()  # corners, where the extremes of a ReLU net often are
    pts[:, region.dims] = lo + u * (hi - lo)
    acts = net.activations(pts.view(n, *net.input_shape))[k].flatten(1)
    alpha = net.activations(base.view(1, *net.input_shape))[k].flatten(1)
    slack = 1e-13 * (1 + float(acts.abs().max()))  # the samples' own float64 rounding
    return (acts - alpha).numpy(), slack


@pytest.mark.parametrize("scale", [1.0, 1e6])
def test_image_bounds_contain_every_sampled_image(demo: nn.Module, scale: float) -> None:
    """Soundness of the containment bounds: sampled points of the feature's box (corners
    included) map inside [dlo, dhi] at every layer; neurons out of reach are exactly 0."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12),
                          nn.ReLU(), nn.Linear(12, 3)).eval()  # fmt: skip
    with torch.no_grad():
        model[1].weight[:, 8:] = 0.0  # pixels 8… reach no neuron of layer 2's rows 0..
        model[1].weight[:6, :8] = 0.0  # rows 0-5 see only pixels 8-15
        model[3].weight.mul_(scale)
    cnn = extract(demo, (1, 8, 8))
    for net, x, dims in [
        (extract(model, (1, 4, 4)), torch.rand(1, 4, 4), np.array([0, 3, 5])),
        (cnn, torch.rand(1, 8, 8), np.array([18, 19, 27])),
    ]:
        region = Region(0, dims, np.full(len(dims), 0.15), 2)
        acts = [a[0].flatten().numpy() for a in net.activations(x.double()[None])]
        for k in range(1, len(net.layers) + 1):
            dlo, dhi = image_delta(net, acts, region, k)
            deltas, slack = _sample_deltas(net, x, region, k)
            assert (deltas >= dlo - slack).all() and (deltas <= dhi + slack).all()
            if k == 1:  # a linear map's interval is reached at the box's corners: tight
                assert np.allclose(deltas.min(0), dlo, atol=1e-9 * (1 + np.abs(dlo).max()))
            cover, moving = covering_region(k, dlo, dhi, feature_dims=10_000, num_span=2)
            assert contains(cover, dlo, dhi) and len(cover.dims) == moving
        if net is not cnn:
            dlo, dhi = image_delta(net, acts, region, 2)
            assert (dlo[:6] == 0).all() and (dhi[:6] == 0).all()


def test_contains_refuses_a_region_that_misses_the_image() -> None:
    dlo, dhi = np.array([0.0, -1.0, 0.0, -0.5]), np.array([0.0, 2.0, 0.5, 0.0])
    region, moving = covering_region(3, dlo, dhi, feature_dims=3, num_span=2)
    assert moving == 3 and contains(region, dlo, dhi) and region.dims.tolist() == [1, 2, 3]
    assert (region.span * 2 >= np.array([2.0, 0.5, 0.5])).all()
    small, _ = covering_region(3, dlo, dhi, feature_dims=2, num_span=2)  # one neuron left out
    assert not contains(small, dlo, dhi)
    short = Region(3, region.dims, region.span * 0.99, 2)  # spans that fall short
    assert not contains(short, dlo, dhi)


def test_sift_features_partition_the_coordinates(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.x[0]
    net = extract(demo, tuple(x.shape))
    feats = input_features(net, x, 0, feature_dims=5, heuristic="sift")
    allc = np.concatenate(feats)
    assert all(1 <= len(f) <= 5 for f in feats)
    assert len(allc) == len(set(allc.tolist())) == x.numel()


def test_dlv_is_deterministic(demo: nn.Module, digits) -> None:  # type: ignore[no-untyped-def]
    runs = [
        verify_dlv(demo, digits.x[i], features=3, span=0.25, num_span=2, enumeration="line")
        for i in (0, 0, 5)
    ]
    a, b = runs[0], runs[1]
    assert a.status == b.status and a.details == b.details
    if a.counterexample is not None:
        assert b.counterexample is not None and torch.equal(a.counterexample, b.counterexample)
    for v in runs:
        if v.status == UNSAFE:
            assert v.counterexample is not None
            assert int(demo(v.counterexample[None]).argmax()) != v.details["label"]


def test_cli_region_dlv_on_demo(demo: nn.Module, capsys: pytest.CaptureFixture[str]) -> None:
    from bastion.cli import main

    argv = ["verify", "--region", "dlv", "--features", "3", "--span", "0.25", "--num-span", "2",
            "--index", "1", "--timeout", "20", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.split()[0] in (SAFE, UNSAFE, UNKNOWN)
    if first.startswith(SAFE):  # the discretised SAFE is never printed bare
        assert first.startswith(DISCRETISED_SAFE + " ")
    assert "dlv" in out and "layer 0 (input grid)" in out
