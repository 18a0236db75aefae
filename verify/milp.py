"""The second exact engine: a big-M mixed-integer program solved by HiGHS (scipy).

The encoding of Tjeng et al. (MIPVerify) with the layer bounds of `bounds.py`: the
pre-activations h and outputs z of every nonlinear layer are variables; a stable ReLU is
the identity or zero, an unstable one (l < 0 < u) gets a binary a with z ≥ h, z ≥ 0,
z ≤ h − l(1 − a), z ≤ u·a; a max-pool window gets one binary per input (Σ a = 1,
z ≥ x_i, z ≤ x_i + (U − l_i)(1 − a_i)). Per disjunct `A y ≤ b` of the unsafe set the
program maximises t subject to t ≤ b − A y row by row; a point with t > 0 is a witness
(replayed on the model by the caller), as deep inside the unsafe set as the time allows.

HiGHS works in floating point with feasibility tolerances (1e-7), and big-M rows with
large bounds turn them into large absolute errors (the issue's ×1000 net: presolve said
"infeasible" with a violation of 82 logits). So "infeasible" alone is never a proof: the
program asks for t ≥ −2τ, where τ bounds the effect on the outputs of every row being off
by its tolerance relative to the magnitudes it sums (`slack.output_deviation`, rel 1e-7).
Infeasible then means the solver's bound clears zero by 2τ, the scaled tolerance twice
over: UNSAT. An optimum in [−2τ, 0] is within tolerance of the boundary: UNKNOWN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds as VarBounds
from scipy.optimize import LinearConstraint, milp

from bastion.verify.bounds import Bounds
from bastion.verify.linear_maps import affine_blocks
from bastion.verify.network import MaxPool2d, Network
from bastion.verify.outcome import Answer, Outcome
from bastion.verify.spec import Halfspaces, Property


@dataclass
class _Program:
    """Variables with bounds and sparse constraint rows, built up piece by piece."""

    lb: list[np.ndarray] = field(default_factory=list)
    ub: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    coo: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    row_lb: list[np.ndarray] = field(default_factory=list)
    row_ub: list[np.ndarray] = field(default_factory=list)
    size: int = 0
    num_rows: int = 0

    def variables(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        idx = np.arange(self.size, self.size + len(lo))
        self.size += len(lo)
        self.lb.append(np.asarray(lo, dtype=float))
        self.ub.append(np.asarray(hi, dtype=float))
        self.integer.append(np.full(len(lo), int(integer)))
        return idx

    def constrain(
        self, terms: list[tuple[np.ndarray, sp.spmatrix]], lo: np.ndarray, hi: np.ndarray
    ) -> None:
        """Rows `Σ coeff @ x[idx]` in [lo, hi]; each term is (variable indices, matrix)."""
        for idx, coeff in terms:
            c = sp.coo_matrix(coeff)
            self.coo.append((c.row + self.num_rows, idx[c.col], c.data))
        self.num_rows += len(lo)
        self.row_lb.append(np.asarray(lo, dtype=float))
        self.row_ub.append(np.asarray(hi, dtype=float))

    def copy(self) -> _Program:
        return _Program(
            list(self.lb), list(self.ub), list(self.integer), list(self.coo),
            list(self.row_lb), list(self.row_ub), self.size, self.num_rows,
        )  # fmt: skip

    def solve(self, objective: np.ndarray, time_limit: float) -> object | None:
        """HiGHS's result, or None when the program lies outside the numeric range HiGHS
        handles faithfully (it reads |coefficients| ≥ 1e15 and bounds ≥ 1e20 as infinite
        and drops coefficients ≤ 1e-9); coefficients of variables fixed at 0 are left out."""
        rows = np.concatenate([r for r, _, _ in self.coo])
        cols = np.concatenate([c for _, c, _ in self.coo])
        vals = np.concatenate([v for _, _, v in self.coo])
        lb, ub = np.concatenate(self.lb), np.concatenate(self.ub)
        keep = (vals != 0) & ~((lb[cols] == 0) & (ub[cols] == 0))
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        finite = np.abs(np.concatenate([lb, ub]))
        finite = finite[np.isfinite(finite)]
        if len(vals) and float(np.abs(vals).max()) > MAX_COEFFICIENT:
            return None
        if len(finite) and float(finite.max()) > MAX_BOUND:
            return None
        a = sp.csr_matrix((vals, (rows, cols)), shape=(self.num_rows, self.size))
        return milp(
            objective,
            integrality=np.concatenate(self.integer),
            bounds=VarBounds(lb, ub),
            constraints=LinearConstraint(
                a, np.concatenate(self.row_lb), np.concatenate(self.row_ub)
            ),
            options={"time_limit": max(time_limit, 0.01), "disp": False},
        )


def _diag(v: np.ndarray) -> sp.spmatrix:
    return sp.diags(np.asarray(v, dtype=float), format="csr")


def _power_of_two(lo: np.ndarray, hi: np.ndarray) -> float:
    """2ᵏ near the layer's largest bound: dividing by it is exact and brings it near 1."""
    top = float(np.maximum(np.abs(lo), np.abs(hi)).max(initial=0.0))
    return 1.0 if not top > 0 else float(2.0 ** np.round(np.log2(top)))


def encode(
    network: Network, prop: Property, bounds: Bounds
) -> tuple[_Program, np.ndarray, np.ndarray, float]:
    """The network on the box as a program: the program, the input and output variables,
    and the output scale c (the output variables hold y / c).

    Each layer's variables are kept in units of a power of two near its largest bound, so
    HiGHS sees values near 1 whatever the weights' scale (its infinity is 1e20); dividing by
    a power of two is exact, so the scaled program is the same program.
    """
    prog = _Program()
    x_lo = prop.lower.flatten().double().numpy()
    x_hi = prop.upper.flatten().double().numpy()
    z = prog.variables(x_lo, x_hi)
    inputs = z
    scale = 1.0
    for block in affine_blocks(network):
        h_lo = bounds.lower[block.end].flatten().numpy()
        h_hi = bounds.upper[block.end].flatten().numpy()
        c = _power_of_two(h_lo, h_hi)
        h_lo, h_hi = h_lo / c, h_hi / c
        h = prog.variables(h_lo, h_hi)
        # c·h' − M·(scale·z') = bias, divided by c
        matrix = block.matrix * (scale / c)
        bias = block.bias / c
        prog.constrain([(h, sp.identity(len(h))), (z, -matrix)], bias, bias)
        scale = c
        if block.end == len(network.layers):
            return prog, inputs, h, scale
        layer = network.layers[block.end]
        if isinstance(layer, MaxPool2d):
            z = _maxpool(prog, layer, h, h_lo, h_hi, network.shapes[block.end])
        else:
            z = _relu(prog, h, h_lo, h_hi)
    raise AssertionError("unreachable: the last block ends at the output")


def _relu(prog: _Program, h: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    z = prog.variables(np.maximum(lo, 0), np.maximum(hi, 0))
    active, unstable = lo >= 0, (lo < 0) & (hi > 0)
    if active.any():
        k = np.flatnonzero(active)
        zero = np.zeros(len(k))
        prog.constrain([(z[k], _eye(len(k))), (h[k], -_eye(len(k)))], zero, zero)
    if unstable.any():
        k = np.flatnonzero(unstable)
        n, lk, u = len(k), lo[k], hi[k]
        a = prog.variables(np.zeros(n), np.ones(n), integer=True)
        inf = np.full(n, np.inf)
        prog.constrain([(z[k], _eye(n)), (h[k], -_eye(n))], np.zeros(n), inf)  # z ≥ h
        # z − h − l·a ≤ −l  (z ≤ h − l(1 − a))
        prog.constrain([(z[k], _eye(n)), (h[k], -_eye(n)), (a, -_diag(lk))], -inf, -lk)
        prog.constrain([(z[k], _eye(n)), (a, -_diag(u))], -inf, np.zeros(n))  # z ≤ u·a
        # the triangle cut z ≤ u(h − l)/(u − l) as a redundant row: it tightens the LP
        s = u / (u - lk)
        prog.constrain([(z[k], _eye(n)), (h[k], -_diag(s))], -inf, -s * lk)
    return z


def _eye(n: int) -> sp.spmatrix:
    return sp.identity(n, format="csr")


def _maxpool(
    prog: _Program,
    layer: MaxPool2d,
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    shape: tuple[int, ...],
) -> np.ndarray:
    c, h, w = shape
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    ch, oy, ox, a, b = np.meshgrid(
        np.arange(c), np.arange(oh), np.arange(ow), np.arange(kh), np.arange(kw), indexing="ij"
    )
    members = ((ch * h + oy * sh + a) * w + ox * sw + b).reshape(c * oh * ow, kh * kw)
    m_lo, m_hi = lo[members], hi[members]
    z = prog.variables(m_lo.max(1), m_hi.max(1))
    n, k = members.shape
    big_u = m_hi.max(1)
    sel = prog.variables(np.zeros(n * k), np.ones(n * k), integer=True).reshape(n, k)
    inf = np.full(n, np.inf)
    for j in range(k):
        xi = x[members[:, j]]
        prog.constrain([(z, _eye(n)), (xi, -_eye(n))], np.zeros(n), inf)  # z ≥ x_i
        # z − x_i + (U − l_i) a_i ≤ U − l_i
        gap = big_u - m_lo[:, j]
        prog.constrain([(z, _eye(n)), (xi, -_eye(n)), (sel[:, j], _diag(gap))], -inf, gap)
    ones = sp.csr_matrix(np.ones((1, k)))
    prog.constrain([(sel.ravel(), sp.block_diag([ones] * n, format="csr"))], np.ones(n), np.ones(n))
    return z


# HiGHS's primal/dual feasibility tolerance (default 1e-7): the LPs whose bounds prune nodes
# and prove infeasibility are solved to it. (mip_feasibility_tolerance, 1e-6, only decides
# whether an incumbent counts, and every incumbent is replayed on the model anyway.)
TOLERANCE = 1e-7
MAX_COEFFICIENT = 1e9  # far below HiGHS's large_matrix_value (1e15, read as infinite)
MAX_BOUND = 1e12  # far below HiGHS's infinite_bound (1e20)


def solve_disjunct(
    base: _Program,
    outputs: np.ndarray,
    disjunct: Halfspaces,
    *,
    deadline: float,
    margin: float,
    scale: float = 1.0,
) -> Outcome:
    """Can the program reach `A y ≤ b`? Maximises the depth t ≥ −2·margin of the violation.

    `margin` is τ, the scaled solver tolerance (module docstring), `scale` the output
    scale of `encode`. Returns the full variable vector as the witness (the caller reads
    the inputs from it).
    """
    start = time.perf_counter()
    prog = base.copy()
    a = disjunct.a.double().numpy()
    b = disjunct.b.double().numpy() / scale
    m = len(b)
    t = prog.variables(np.full(1, -2 * margin / scale), np.full(1, np.inf))
    prog.constrain(  # t + A y ≤ b
        [(np.repeat(t, m), sp.identity(m)), (outputs, sp.csr_matrix(a))], np.full(m, -np.inf), b
    )
    objective = np.zeros(prog.size)
    objective[t] = -1.0
    res = prog.solve(objective, deadline - time.perf_counter())
    seconds = time.perf_counter() - start
    if res is None:
        why = "the program's coefficients or bounds span more than HiGHS handles faithfully"
        return Outcome(Answer.UNKNOWN, None, seconds, why)
    if res.status == 2:  # type: ignore[attr-defined]
        return Outcome(Answer.UNSAT, None, seconds)
    x = getattr(res, "x", None)
    if x is not None and float(x[t[0]]) > 0:
        return Outcome(Answer.SAT, np.asarray(x), seconds)
    if x is not None and res.status == 0:  # type: ignore[attr-defined]
        value = float(x[t[0]]) * scale
        why = f"the MILP optimum {value:.3g} is within its tolerance ({margin:.3g}) of 0"
        return Outcome(Answer.UNKNOWN, np.asarray(x), seconds, why)
    reason = "time limit" if res.status == 1 else str(res.message)  # type: ignore[attr-defined]
    return Outcome(Answer.UNKNOWN, None, seconds, reason)
