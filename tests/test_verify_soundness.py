"""Soundness of `verify`: no SAFE where a counterexample exists, on nets where floats bite.

Oracle: the model as given, evaluated in (essentially) exact arithmetic: `Decimal` with 100
significant digits, float32 parameters read exactly, BatchNorm's square root correctly
rounded to 100 digits. A counterexample is *planted*: at a point x* of the box the last
layer's bias of the runner-up class is moved to the smallest float32 that makes the exact
margin y_c − y_j at x* lie in (−ulp, 0], a tie or a violation by less than one ulp. The
unsafe set `y_c − y_j ≤ 0` contains x*'s output, so SAFE (VNN-COMP unsat) is always wrong.

Families: linear nets with cancellation (weights 1…1e9), MLPs at weight scales 1…1e9,
BatchNorm with extreme running statistics, conv with max- and average pooling; every
robustness property has several disjuncts (one per other class). The fast slice runs in CI;
`-m slow` runs the big sweep and prints per-family counts.
"""

from __future__ import annotations

import collections
import contextlib
import decimal
import math
from decimal import Decimal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bastion.verify import Status, extract, verify
from bastion.verify.bounds import compute_bounds, property_lower_bounds
from bastion.verify.network import Dense, Network
from bastion.verify.spec import Property, class_unsafe_set

_PREC = 100
FAMILIES = ("linear", "mlp", "batchnorm", "conv")


# --- the exact oracle ---------------------------------------------------------------


def _dec(t: torch.Tensor) -> np.ndarray:
    flat = [Decimal(float(v)) for v in t.detach().double().flatten().tolist()]
    return np.array(flat, dtype=object).reshape(tuple(t.shape))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    c, h, wd = x.shape
    if pad:
        z = np.full((c, h + 2 * pad, wd + 2 * pad), Decimal(0), dtype=object)
        z[:, pad : pad + h, pad : pad + wd] = x
        x, h, wd = z, h + 2 * pad, wd + 2 * pad
    o, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.empty((o, oh, ow), dtype=object)
    for k in range(o):
        for i in range(oh):
            for j in range(ow):
                patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
                out[k, i, j] = (patch * w[k]).sum() + b[k]
    return out


def _pool(x: np.ndarray, k: int, stride: int, kind: str) -> np.ndarray:
    c, h, w = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.empty((c, oh, ow), dtype=object)
    for ch in range(c):
        for i in range(oh):
            for j in range(ow):
                win = x[ch, i * stride : i * stride + k, j * stride : j * stride + k].flatten()
                out[ch, i, j] = max(win) if kind == "max" else sum(win) / Decimal(k * k)
    return out


def exact_forward(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """The model's outputs at one input (no batch axis) in 100-digit decimal arithmetic."""
    with decimal.localcontext() as ctx:
        ctx.prec = _PREC
        z = _dec(x)
        for m in model:
            if isinstance(m, nn.Linear):
                z = _dec(m.weight) @ z.flatten() + _dec(m.bias)
            elif isinstance(m, nn.Conv2d):
                z = _conv(z, _dec(m.weight), _dec(m.bias), m.stride[0], m.padding[0])
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                view = (-1,) + (1,) * (z.ndim - 1)
                var = _dec(m.running_var) + Decimal(m.eps)
                scale = _dec(m.weight) / np.array([v.sqrt() for v in var], dtype=object)
                shift = _dec(m.bias) - _dec(m.running_mean) * scale
                z = z * scale.reshape(view) + shift.reshape(view)
            elif isinstance(m, nn.ReLU):
                z = np.array([max(v, Decimal(0)) for v in z.flatten()], dtype=object).reshape(
                    z.shape
                )
            elif isinstance(m, nn.MaxPool2d):
                z = _pool(z, m.kernel_size, m.stride, "max")  # type: ignore[arg-type]
            elif isinstance(m, nn.AvgPool2d):
                z = _pool(z, m.kernel_size, m.stride, "avg")  # type: ignore[arg-type]
            elif isinstance(m, nn.Flatten):
                z = z.flatten()
            else:
                raise TypeError(m)
        return z.flatten()


def exact_margin(model: nn.Sequential, x: torch.Tensor, label: int) -> Decimal:
    """min over j ≠ label of y_label − y_j, exactly: ≤ 0 means x is a counterexample."""
    y = exact_forward(model, x)
    return min(y[label] - y[j] for j in range(len(y)) if j != label)


# --- instances with a planted counterexample ----------------------------------------


def _scale_(module: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)


def make_model(
    family: str, rng: np.random.Generator, scale: float | None = None
) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A small random float32 model of the family, in eval mode, and its input shape;
    weights scaled by `scale` (default: a random power of ten, 1 … 1e9)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    scale = float(10.0 ** rng.integers(0, 10)) if scale is None else scale
    if family == "linear":
        n = int(rng.integers(2, 5))
        model = nn.Sequential(nn.Linear(n, int(rng.integers(2, 4))))
        shape: tuple[int, ...] = (n,)
    elif family == "mlp":  # 40 free inputs send `auto` straight to the MILP
        n, h = int(rng.choice([2, 3, 4, 5, 40])), int(rng.integers(3, 13))
        model = nn.Sequential(
            nn.Linear(n, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 4)
        )
        shape = (n,)
    elif family == "batchnorm":
        n, h = int(rng.integers(2, 5)), int(rng.integers(3, 7))
        bn = nn.BatchNorm1d(h)
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(rng.choice([-1e3, 1e3, 0.5], h)))
            bn.running_var.copy_(torch.from_numpy(rng.choice([0.0, 1e-8, 1e6, 1.0], h)))
            bn.weight.copy_(torch.from_numpy(rng.normal(size=h) * 2))
            bn.bias.copy_(torch.from_numpy(rng.normal(size=h)))
        model = nn.Sequential(nn.Linear(n, h), bn, nn.ReLU(), nn.Linear(h, 3))
        shape = (n,)
        scale = 1.0
    else:  # conv
        pool: nn.Module = nn.MaxPool2d(2) if rng.random() < 0.5 else nn.AvgPool2d(2)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=int(rng.integers(0, 2))), nn.ReLU(), pool,
            nn.Flatten(), nn.LazyLinear(3),
        )  # fmt: skip
        shape = (1, 6, 6)
        model(torch.zeros(1, *shape))
    _scale_(model, scale) if family in ("linear", "mlp", "conv") else None
    return model.eval(), shape


def _candidates(model: nn.Sequential, lo: torch.Tensor, hi: torch.Tensor, label: int) -> list:
    """Points of the box where the margin is small: sign corners and a few PGD points."""
    m64 = _copy64(model)
    pts = [lo.clone(), hi.clone(), (lo + hi) / 2]
    x = ((lo + hi) / 2).clone().requires_grad_(True)
    for _ in range(30):
        y = m64(x[None])[0]
        others = torch.cat([y[:label], y[label + 1 :]])
        margin = y[label] - others.max()
        (g,) = torch.autograd.grad(margin, x)
        pts.append(torch.where(g > 0, lo, hi))
        with torch.no_grad():
            x = (x - (hi - lo) * 0.2 * g.sign()).clamp(lo, hi)
        x.requires_grad_(True)
    pts.append(x.detach())
    return pts


def _copy64(model: nn.Sequential) -> nn.Sequential:
    import copy

    return copy.deepcopy(model).double()


def plant(
    model: nn.Sequential, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[Property, torch.Tensor, int] | None:
    """Move the last bias so that a point x* of a box has exact margin in (−ulp, 0].

    Returns the property (robustness of `label` on the box), x* and the label, or None
    when the planted margin cannot be certified (the model's outputs overflow float32).
    """
    centre = torch.from_numpy(rng.random(shape))
    radius = float(rng.choice([1e-3, 0.05, 0.3]))
    lo, hi = (centre - radius).clamp(0, 1), (centre + radius).clamp(0, 1)
    with torch.no_grad():
        label = int(_copy64(model)(centre[None]).argmax())
    pts = _candidates(model, lo, hi, label)
    with torch.no_grad():
        values = [float(_margin64(model, p, label)) for p in pts]
    x_star = pts[int(np.argmin(values))].detach()
    y = exact_forward(model, x_star)
    j = max((k for k in range(len(y)) if k != label), key=lambda k: y[k])
    last = model[-1]
    with decimal.localcontext() as ctx:
        ctx.prec = _PREC
        target = Decimal(float(last.bias[j].detach())) + (y[label] - y[j])
        b = np.float32(float(target))
        while Decimal(float(b)) < target:
            b = np.nextafter(b, np.float32(np.inf))
    if not math.isfinite(float(b)):
        return None
    with torch.no_grad():
        last.bias[j] = float(b)
    margin = exact_margin(model, x_star, label)
    assert margin <= 0, "planting failed: the oracle and the plant disagree"
    prop = Property(lo.double(), hi.double(), class_unsafe_set(label, len(y)))
    return prop, x_star, label


def _margin64(model: nn.Sequential, x: torch.Tensor, label: int) -> torch.Tensor:
    y = _copy64(model)(x[None].double())[0]
    return y[label] - torch.cat([y[:label], y[label + 1 :]]).max()


def check_instance(family: str, seed: int, engine: str, timeout: float) -> str:
    """Plant, verify, and assert: never SAFE; an UNSAFE witness is in the box and the
    float32 model puts it strictly in the unsafe set. Returns the VNN-COMP word."""
    rng = np.random.default_rng(seed)
    model, shape = make_model(family, rng)
    planted = plant(model, shape, rng)
    if planted is None:
        return "skipped"
    prop, _, _ = planted
    network = extract(model, shape)
    verdict = verify(network, prop, model=model, engine=engine, timeout=timeout, seed=seed)
    assert verdict.status != Status.SAFE, (family, seed, engine, verdict.summary())
    if verdict.status == Status.UNSAFE:
        x = verdict.counterexample
        assert x is not None and bool(prop.contains(x[None].double())[0])
        with torch.no_grad():
            y = model(x[None].float())
        assert float(prop.violation(y)[0]) > 0
    return verdict.vnncomp


# --- the reproductions --------------------------------------------------------


def _cancelling(weight: float) -> tuple[Network, Property]:
    """y0 − y1 = w·x0 − w·x1 with x1's upper end one float64 above x0's lower end."""
    w = float(np.float32(weight))
    net = Network((Dense(torch.tensor([[w, -w], [0.0, 0.0]]), torch.zeros(2)),), (2,))
    x0 = 0.05
    x1 = math.nextafter(x0, 1.0)
    lower = torch.tensor([x0, x0 - 0.01], dtype=torch.float64)
    upper = torch.tensor([x0 + 0.01, x1], dtype=torch.float64)
    return net, Property(lower, upper, class_unsafe_set(0, 2))


@pytest.mark.parametrize("weight", [1.8e9, 1.8e5, 1e3])
@pytest.mark.parametrize("engine", ["bounds", "z3", "milp", "auto"])
def test_cancellation_cannot_hide_a_counterexample(weight: float, engine: str) -> None:
    net, prop = _cancelling(weight)
    corner = torch.tensor([prop.lower[0], prop.upper[1]], dtype=torch.float64)
    w = Decimal(float(net.layers[0].weight[0, 0]))  # type: ignore[union-attr]
    assert w * Decimal(float(corner[0])) - w * Decimal(float(corner[1])) < 0  # a violation
    verdict = verify(net, prop, engine=engine, timeout=10)
    assert verdict.status != Status.SAFE, verdict.summary()


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, 1e9])
def test_bounds_hold_exactly(scale: float) -> None:
    """Every activation's bounds contain the exact value at corners and random points."""
    rng = np.random.default_rng(int(scale))
    for family in ("mlp", "conv", "batchnorm"):
        model, shape = make_model(family, rng, scale)
        network = extract(model, shape)
        prop = random_box(rng, shape, 0.1, 3 + (family == "mlp"))
        bounds = compute_bounds(network, prop)
        lows = property_lower_bounds(network, prop, bounds)
        n = len(network.layers)
        for k in range(12):
            u = torch.from_numpy(rng.random(shape))
            if k % 2:
                u = (u > 0.5).double()
            x = prop.lower + (prop.upper - prop.lower) * u
            y = exact_forward(model, x)
            for i in range(len(y)):
                assert Decimal(float(bounds.lower[n].flatten()[i])) <= y[i], family
                assert Decimal(float(bounds.upper[n].flatten()[i])) >= y[i], family
            for h, low in zip(prop.unsafe, lows, strict=True):
                for r in range(len(h.b)):
                    row = sum(
                        Decimal(float(a)) * v for a, v in zip(h.a[r].tolist(), y, strict=True)
                    )
                    assert Decimal(float(low[r])) <= row - Decimal(float(h.b[r]))


def random_box(
    rng: np.random.Generator, shape: tuple[int, ...], radius: float, classes: int
) -> Property:
    """The box of `radius` around a random point of [0, 1]^shape (clipped), class 0 to hold."""
    centre = torch.from_numpy(rng.random(shape))
    return Property(
        (centre - radius).clamp(0, 1), (centre + radius).clamp(0, 1), class_unsafe_set(0, classes)
    )


# --- the fuzz battery ----------------------------------------------------------------

_ENGINES = st.sampled_from(["auto", "bounds", "beta-crown", "z3", "milp"])


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 10**6), engine=_ENGINES)
def test_fuzz_fast_slice(family: str, seed: int, engine: str) -> None:
    check_instance(family, seed, engine, timeout=3.0)


@pytest.mark.slow
def test_fuzz_sweep() -> None:
    """The big sweep: 100 instances per family, engines in turn; prints the counts."""
    counts: dict[str, collections.Counter[str]] = {f: collections.Counter() for f in FAMILIES}
    engines = ("auto", "bounds", "beta-crown", "z3", "milp")
    for family in FAMILIES:
        for i in range(100):
            seed = 1_000_003 * FAMILIES.index(family) + i
            word = check_instance(family, seed, engines[i % len(engines)], timeout=5.0)
            counts[family][word] += 1
    for family, c in counts.items():
        print(f"{family}: {sum(c.values())} instances, {dict(c)}, unsat 0")


@pytest.mark.parametrize("seed", range(3))
def test_milp_never_unsat_on_a_net_with_weights_times_1000(seed: int) -> None:
    """The issue's case: ×1000 weights (logits ~1e8), 40 free inputs, so `auto` goes to the
    MILP at once; HiGHS's presolve used to call a reachable disjunct infeasible."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(40, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    ).eval()
    _scale_(model, 1000.0)
    planted = plant(model, (40,), np.random.default_rng(seed))
    assert planted is not None
    prop = planted[0]
    network = extract(model, (40,))
    for engine in ("milp", "auto"):
        verdict = verify(network, prop, model=model, engine=engine, timeout=4, attack=False)
        assert verdict.status != Status.SAFE, verdict.summary()


def reachable_by_enumeration(model: nn.Sequential, prop: Property) -> bool:
    """Exact oracle for tiny MLPs: each ReLU activation pattern makes the net affine on a
    polytope; the unsafe set is reachable iff, for some pattern and disjunct, the
    conjunction is feasible over the rationals (one plain z3 LP per pattern, no bounds)."""
    import itertools

    import z3

    linears = [m for m in model if isinstance(m, nn.Linear)]
    widths = [m.out_features for m in linears[:-1]]
    q = lambda v: z3.RealVal(str(Decimal(float(v))))  # noqa: E731 - exact decimal of the float
    for pattern in itertools.product((0, 1), repeat=sum(widths)):
        s = z3.Solver()
        xs = [z3.Real(f"x{i}") for i in range(prop.lower.numel())]
        for x, lo, hi in zip(xs, prop.lower.tolist(), prop.upper.tolist(), strict=True):
            s.add(x >= q(lo), x <= q(hi))
        z: list = xs
        k = 0
        for li, lin in enumerate(linears):
            w, b = lin.weight.tolist(), lin.bias.tolist()
            h = [
                z3.Sum([q(w[o][i]) * z[i] for i in range(len(z))]) + q(b[o]) for o in range(len(b))
            ]
            if li == len(linears) - 1:
                z = h
                break
            nxt = []
            for o, ho in enumerate(h):
                on = pattern[k + o]
                s.add(ho >= 0 if on else ho <= 0)
                nxt.append(ho if on else z3.RealVal(0))
            k += len(h)
            z = nxt
        for d in prop.unsafe:
            s.push()
            for r in range(len(d.b)):
                row = z3.Sum([q(a) * y for a, y in zip(d.a[r].tolist(), z, strict=True)])
                s.add(row <= q(d.b[r]))
            if s.check() == z3.sat:
                return True
            s.pop()
    return False


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(seed=st.integers(0, 10**6), engine=_ENGINES, radius=st.sampled_from([0.02, 0.1, 0.4]))
def test_tiny_nets_agree_with_pattern_enumeration(seed: int, engine: str, radius: float) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    model.eval()
    _scale_(model, float(10.0 ** (seed % 10)))
    centre = torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        label = int(model(centre[None].float()).argmax())
    prop = Property(centre - radius, centre + radius, class_unsafe_set(label, 3))
    verdict = verify(extract(model, (2,)), prop, model=model, engine=engine, timeout=5)
    if verdict.status == Status.SAFE:
        assert not reachable_by_enumeration(model, prop), verdict.summary()
    if verdict.status == Status.UNSAFE:
        assert reachable_by_enumeration(model, prop)


class _BatchOnly(nn.Module):
    """A model whose batched evaluation disagrees with its single-input one: in a batch the
    runner-up scores one above the label (the issue's PGD hits that vanish when replayed)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if x.shape[0] > 1:
            y = torch.stack([y[:, 0], y[:, 0] + 1], 1)
        return y


def test_a_batch_only_hit_is_not_unsafe() -> None:
    # y0 − y1 = 2·relu(x) − x + 0.5 = |x| + 0.5 > 0 on [−1, 1]: safe, intervals cannot tell
    inner = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        inner[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        inner[0].bias.zero_()
        inner[2].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        inner[2].bias.copy_(torch.tensor([0.0, -0.5]))
    model = _BatchOnly(inner.eval())
    prop = Property(
        torch.tensor([-1.0], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        class_unsafe_set(0, 2),
    )
    verdict = verify(extract(inner, (1,)), prop, model=model, engine="bounds", timeout=5)
    assert verdict.status != Status.UNSAFE, verdict.summary()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    a=st.floats(-1e150, 1e150, allow_nan=False, allow_subnormal=False),
    b=st.floats(-1e150, 1e150, allow_nan=False, allow_subnormal=False),
)
def test_two_sum_and_two_prod_are_exact(a: float, b: float) -> None:
    from fractions import Fraction

    from bastion.verify.rounding import two_prod, two_sum

    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    s, e = two_sum(ta, tb)
    assert Fraction(float(s)) + Fraction(float(e)) == Fraction(a) + Fraction(b)
    p, e = two_prod(ta, tb)
    if abs(float(p)) >= 2.0**-960 or a == 0 or b == 0:
        assert Fraction(float(p)) + Fraction(float(e)) == Fraction(a) * Fraction(b)
    else:  # underflow: the residual is an upper bound of the error
        assert abs(Fraction(float(p)) - Fraction(a) * Fraction(b)) <= abs(Fraction(float(e)))


@pytest.mark.parametrize("family, seed, engine", [("mlp", 1000086, "milp")])
def test_sweep_findings_stay_fixed(family: str, seed: int, engine: str) -> None:
    """Instances the slow sweep once caught answering SAFE (see the commit history)."""
    check_instance(family, seed, engine, timeout=5.0)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(seed=st.integers(0, 10**6), scale=st.sampled_from([1.0, 1e3, 1e6]))
def test_marabou_counterexamples_are_never_proved_safe(tmp_path_factory, seed, scale) -> None:  # type: ignore[no-untyped-def]
    """Marabou (test extra) as a third oracle: where it returns a witness that violates the
    property in exact arithmetic, `verify` must not answer SAFE."""
    marabou = pytest.importorskip("maraboupy.Marabou")
    from bastion.verify import write_vnnlib

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model.eval()
    _scale_(model, scale)
    centre = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        label = int(model(centre[None].float()).argmax())
    prop = Property(
        (centre - 0.45).clamp(0, 1), (centre + 0.45).clamp(0, 1), class_unsafe_set(label, 3)
    )
    folder = tmp_path_factory.mktemp("marabou")
    onnx_path, vnnlib = folder / "net.onnx", folder / "p.vnnlib"
    torch.onnx.export(model, (torch.zeros(1, 3),), str(onnx_path), dynamo=False)
    write_vnnlib([prop], vnnlib)
    net = marabou.read_onnx(str(onnx_path))
    options = marabou.createOptions(verbosity=0, timeoutInSeconds=10)
    with contextlib.chdir(folder):  # Marabou writes failedMarabouQuery.ipq into the cwd
        code, values, _ = net.solve(propertyFilename=str(vnnlib), options=options, verbose=False)
    if code != "sat":
        return
    x = torch.tensor([values[v] for v in net.inputVars[0].flatten()], dtype=torch.float64)
    if not (bool(prop.contains(x[None])[0]) and exact_margin(model, x, label) <= 0):
        return  # Marabou's witness is off the box or not a counterexample exactly
    verdict = verify(extract(model, (3,)), prop, model=model, timeout=10)
    assert verdict.status != Status.SAFE, verdict.summary()
