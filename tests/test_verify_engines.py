"""The verifier's verdicts against ground truth: an enumeration oracle, PGD, the float model."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from bastion.verify.bounds import compute_bounds, property_lower_bounds
from bastion.verify.falsify import falsify
from bastion.verify.network import (
    AvgPool2d,
    Conv2d,
    Dense,
    Elementwise,
    Flatten,
    MaxPool2d,
    Network,
    ReLU,
)
from bastion.verify.region import verify_region
from bastion.verify.spec import robustness_property
from bastion.verify.verifier import verify


def _mlp(seed: int, sizes: tuple[int, ...] = (4, 4, 4, 3), scale: float = 0.8) -> Network:
    g = torch.Generator().manual_seed(seed)
    layers: list = []
    for i in range(len(sizes) - 1):
        w = torch.randn(sizes[i + 1], sizes[i], generator=g) * scale
        layers.append(Dense(w, torch.randn(sizes[i + 1], generator=g) * 0.3))
        if i < len(sizes) - 2:
            layers.append(ReLU())
    return Network(tuple(layers), (sizes[0],))


def _oracle(net: Network, prop) -> str:  # type: ignore[no-untyped-def]
    """Exact by enumeration: each ReLU activation pattern makes the net affine on a
    polytope; the unsafe set is reachable iff one of these LPs is feasible."""
    dense = [layer for layer in net.layers if isinstance(layer, Dense)]
    widths = [d.weight.shape[0] for d in dense[:-1]]
    lo, hi = prop.lower.numpy(), prop.upper.numpy()
    n = len(lo)
    for pattern in itertools.product((0, 1), repeat=sum(widths)):
        a_map, c_map, rows, rhs, k = np.eye(n), np.zeros(n), [], [], 0
        for i, d in enumerate(dense):
            w, b = d.weight.double().numpy(), d.bias.double().numpy()
            a2, c2 = w @ a_map, w @ c_map + b
            if i == len(dense) - 1:
                a_map, c_map = a2, c2
                break
            p = np.array(pattern[k : k + len(b)])
            k += len(b)
            for j in range(len(b)):  # active: h ≥ 0; inactive: h ≤ 0
                rows.append(-a2[j] if p[j] else a2[j])
                rhs.append(c2[j] if p[j] else -c2[j])
            a_map, c_map = a2 * p[:, None], c2 * p
        for h in prop.unsafe:
            a, b = h.a.numpy(), h.b.numpy()
            res = linprog(
                np.zeros(n),
                A_ub=np.vstack([*rows, a @ a_map]),
                b_ub=np.concatenate([rhs, b - a @ c_map]),
                bounds=list(zip(lo, hi, strict=True)),
                method="highs",
            )
            if res.status == 0:
                return "sat"
    return "unsat"


def test_exact_engines_agree_with_enumeration_oracle() -> None:
    """z3 and the MILP (no attack, no shortcut) against exhaustive enumeration."""
    for seed in range(6):
        for eps in (0.05, 0.25, 0.6):
            net = _mlp(seed)
            x = torch.rand(4, generator=torch.Generator().manual_seed(100 + seed))
            label = int(net.forward(x[None].double()).argmax())
            prop = robustness_property(x, label, 3, eps=eps)
            truth = _oracle(net, prop)
            for engine in ("z3", "milp"):
                verdict = verify(net, prop, engine=engine, attack=False, timeout=20)
                assert verdict.vnncomp == truth, (seed, eps, engine, verdict.summary())
                if verdict.status == "UNSAFE":  # the witness really flips the float32 net
                    assert int(net.forward(verdict.counterexample[None]).argmax()) != label


def test_engines_agree_on_each_other_with_branch_and_bound() -> None:
    """Wider nets: z3 through branch and bound (leaves of ≤ 4 unstable ReLUs) and the
    MILP must give the same verdict whenever both decide."""
    both = 0
    for seed in range(6):
        net = _mlp(seed, (5, 8, 8, 3), scale=0.7)
        x = torch.rand(5, generator=torch.Generator().manual_seed(200 + seed))
        label = int(net.forward(x[None].double()).argmax())
        prop = robustness_property(x, label, 3, eps=0.15)
        a = verify(net, prop, engine="z3", attack=False, leaf_size=4, timeout=20)
        b = verify(net, prop, engine="milp", attack=False, timeout=20)
        if "unknown" not in (a.vnncomp, b.vnncomp):
            assert a.vnncomp == b.vnncomp, (seed, a.summary(), b.summary())
            both += 1
    assert both >= 5


def test_verifier_never_contradicts_pgd() -> None:
    """Where PGD finds an adversarial example, the verifier must not say SAFE."""
    for seed in range(10):
        net = _mlp(seed, (6, 10, 3), scale=1.0)
        x = torch.rand(6, generator=torch.Generator().manual_seed(300 + seed))
        label = int(net.forward(x[None].double()).argmax())
        prop = robustness_property(x, label, 3, eps=0.3)
        found = bool(falsify(net.forward, prop, seed=seed))
        verdict = verify(net, prop, attack=False, timeout=20)
        if found:
            assert verdict.status != "SAFE"


def _conv_net(seed: int) -> Network:
    g = torch.Generator().manual_seed(seed)
    return Network(
        (
            Elementwise(torch.tensor(2.0), torch.tensor(-1.0)),
            Conv2d(torch.randn(3, 1, 3, 3, generator=g) * 0.6, torch.randn(3, generator=g) * 0.1),
            ReLU(),
            MaxPool2d((2, 2), (2, 2)),
            AvgPool2d((1, 1), (1, 1)),
            Flatten(),
            Dense(torch.randn(6, 27, generator=g) * 0.4, torch.randn(6, generator=g) * 0.1),
            ReLU(),
            Dense(torch.randn(3, 6, generator=g) * 0.5, torch.zeros(3)),
        ),
        (1, 8, 8),
    )


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_contain_every_sampled_activation(method: str) -> None:
    for seed in range(3):
        net = _conv_net(seed)
        x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed))
        prop = robustness_property(x, 0, 3, eps=0.1)
        bounds = compute_bounds(net, prop, method=method)
        g = torch.Generator().manual_seed(seed + 7)
        corners = torch.randint(0, 2, (3000, 1, 8, 8), generator=g).double()
        inside = torch.rand(3000, 1, 8, 8, generator=g, dtype=torch.float64)
        for pts in (corners, inside):
            xs = prop.lower + (prop.upper - prop.lower) * pts
            for k, act in enumerate(net.activations(xs)):
                assert bool((act >= bounds.lower[k]).all() and (act <= bounds.upper[k]).all())
        lows = property_lower_bounds(net, prop, bounds)
        y = net.forward(xs)
        for h, low in zip(prop.unsafe, lows, strict=True):
            assert bool(((h.a @ y.T).T - h.b >= low).all())


def test_crown_is_tighter_than_intervals() -> None:
    net = _mlp(1, (20, 30, 30, 5), scale=0.5)
    x = torch.rand(20, generator=torch.Generator().manual_seed(1))
    prop = robustness_property(x, 0, 5, eps=0.05)
    ibp, crown = compute_bounds(net, prop, method="ibp"), compute_bounds(net, prop)
    assert sum(s.unstable for s in crown.stats) < sum(s.unstable for s in ibp.stats)
    assert float((crown.upper[-1] - crown.lower[-1]).sum()) < float(
        (ibp.upper[-1] - ibp.lower[-1]).sum()
    )


def test_conv_maxpool_net_verdicts_agree_between_engines() -> None:
    """A DLV-style region of 9 free pixels on a conv/max-pool net: the MILP decides every
    case; wherever z3 (branch and bound) decides too, it agrees."""
    agreed = 0
    for seed in range(3):
        net = _conv_net(seed)
        x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed))
        label = int(net.forward(x[None].double()).argmax())
        mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        mask[0, 2:5, 2:5] = True  # a DLV-style region: 9 free pixels
        prop = robustness_property(x, label, 3, eps=0.2, mask=mask)
        a = verify(net, prop, engine="z3", attack=False, timeout=10)
        b = verify(net, prop, engine="milp", attack=False, timeout=20)
        assert b.vnncomp != "unknown"
        if a.vnncomp != "unknown":
            assert a.vnncomp == b.vnncomp
            agreed += 1
    assert agreed >= 2


def test_timeout_is_unknown_never_safe() -> None:
    net = _mlp(3, (10, 40, 40, 40, 3), scale=0.6)
    x = torch.rand(10, generator=torch.Generator().manual_seed(3))
    label = int(net.forward(x[None].double()).argmax())
    prop = robustness_property(x, label, 3, eps=0.3)
    start = time.perf_counter()
    verdict = verify(net, prop, engine="z3", attack=False, timeout=0.5)
    assert time.perf_counter() - start < 30
    assert verdict.status in ("UNKNOWN", "UNSAFE")
    if verdict.status == "UNKNOWN":
        assert verdict.reason


def test_region_on_demo_model_safe_small_unsafe_large(demo, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x[0], int(digits.y[0])
    safe = verify_region(demo, x, eps=0.002, timeout=30)
    assert safe.status == "SAFE" and safe.engine == "bounds"
    assert safe.details["label"] == y and safe.layers
    unsafe = verify_region(demo, x, eps=0.3, timeout=30)
    assert unsafe.status == "UNSAFE"
    cex = unsafe.counterexample
    assert float((cex - x).abs().max()) <= 0.3 + 1e-6 and float(cex.min()) >= 0
    assert int(demo(cex[None]).argmax()) != y


def test_verdict_records_when_each_stage_ended() -> None:
    """`stage_seconds`: the first (interval) bound, the attack, CROWN and alpha-CROWN, in
    that order and within the verdict's time; a verdict reached early names fewer."""
    net = _mlp(5, (6, 30, 30, 3), scale=0.9)
    x = torch.rand(6, generator=torch.Generator().manual_seed(5))
    label = int(net.forward(x[None].double()).argmax())
    open_ = verify(net, robustness_property(x, label, 3, eps=0.6), engine="bounds", timeout=30)
    stages = open_.details["stage_seconds"]
    assert list(stages) == ["intervals", "attack", "crown", "alpha"], (open_.status, stages)
    times = list(stages.values())
    assert times == sorted(times) and 0 < times[-1] <= open_.seconds
    tiny = verify(net, robustness_property(x, label, 3, eps=1e-6), timeout=30)
    assert tiny.status == "SAFE" and list(tiny.details["stage_seconds"]) == ["intervals"]
