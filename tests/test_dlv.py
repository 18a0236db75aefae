"""DLV mode (Huang et al., CAV 2017): grid search over feature regions, z3 back-propagation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from bastion.verify.dlv import verify_dlv
from bastion.verify.dlv_regions import (
    Region,
    back_propagate,
    coefficients,
    grid_size,
    grid_values,
    input_features,
    synthesise,
)
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
    v = verify_dlv(_planted(robust=True), X, enumeration="line", continuous=True, **PLANTED_ARGS)
    assert v.status == SAFE
    assert "complete for the discretised region under the minimality assumption" in v.guarantee
    assert "nothing is proved for the continuous region" in v.guarantee
    assert v.details["features_examined"] == 3
    assert v.details["points"] == 3 * 4**5  # 0.2 − 0.4 and 0.2 − 0.8 both clip to 0
    cont = v.details["continuous"]
    assert cont["status"] == SAFE and cont["features"] == [SAFE] * 3


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


def _target_of(net, x, regions, moved):  # type: ignore[no-untyped-def]
    acts = net.activations(moved.double()[None])
    return acts[regions[-1].layer][0].flatten().numpy()[regions[-1].dims]


def test_backprop_of_dense_target_reproduces_it_in_float64() -> None:
    net = extract(_random_net((16, 6, 2), 0), (1, 4, 4))
    dims = np.array([0, 5, 6, 10, 11])
    regions = synthesise(net, Region(0, dims, np.full(5, 0.1), 2), 2, 5)
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
    regions = synthesise(net, Region(0, np.array([0, 5, 6, 10, 11]), np.full(5, 0.1), 2), 2, 5)
    x = torch.full((1, 4, 4), 0.5)
    target = _target_of(net, x, regions, x) + 100.0  # far outside what the box can reach
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() + 30)
    assert back.status in ("unsat", "unknown") and back.input is None


def test_backprop_past_its_deadline_is_unknown_not_unsat() -> None:
    """DLV's code reports a z3 timeout as unsatisfiable; ours must say unknown."""
    net = extract(_random_net((16, 6, 2), 0), (1, 4, 4))
    regions = synthesise(net, Region(0, np.array([0, 5, 6, 10, 11]), np.full(5, 0.1), 2), 2, 5)
    x = torch.full((1, 4, 4), 0.5)
    target = _target_of(net, x, regions, x)
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() - 1.0)
    assert back.status == "unknown" and back.input is None and back.queries == 1


def test_backprop_through_conv_band_on_demo(demo: nn.Module) -> None:
    net = extract(demo, (1, 8, 8))
    x = torch.full((1, 8, 8), 0.3)
    dims = np.array([18, 19, 26, 27, 35])
    regions = synthesise(net, Region(0, dims, np.full(5, 0.1), 1), 1, 5)
    moved = x.clone().flatten()
    moved[dims] += 0.1
    target = _target_of(net, x, regions, moved.view(1, 8, 8))
    back = back_propagate(net, x, regions, target, deadline=time.perf_counter() + 30)
    assert back.status in ("realised", "unknown") and back.queries == 1
    if back.status == "realised":
        assert back.input is not None
        reached = _target_of(net, x, regions, torch.from_numpy(back.input).view(1, 8, 8))
        assert (np.abs(reached - target) <= regions[-1].span + 1e-9).all()


def test_hidden_layer_analysis_finds_planted_example_through_z3() -> None:
    """Layer 2 is h = (h0, h1); only h0 can move, by 2.0 per span. Its convex corners
    h0 ± 4 sit exactly on the edge of what the input box reaches, so "line" is used:
    h0 + 2 already flips the class and lies inside."""
    model = _planted()
    v = verify_dlv(model, X, layer=2, enumeration="line", **PLANTED_ARGS)
    assert v.status == UNSAFE and v.details["backprop_status"] == "realised"
    assert v.details["z3_queries"] >= 1
    assert v.counterexample is not None and int(model(v.counterexample[None]).argmax()) == 1
    safe = verify_dlv(_planted(robust=True), X, layer=2, **PLANTED_ARGS)
    assert safe.status == SAFE and "covering/refinement assumption" in safe.guarantee


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
    assert out.split()[0] in (SAFE, UNSAFE, UNKNOWN)
    assert "dlv" in out
