"""The exact SMT engine: one z3 query (QF_LRA) per disjunct of the unsafe set.

Weights enter as the rationals their float32 values denote, so an `unsat` is a proof for
the network over the rationals (float32 rounding inside the model is not modelled). Only
the inputs that may move are variables; fixed inputs are folded into the sums. Neurons the
bounds prove stable are the identity or zero; an unstable ReLU is the disjunction
(h ≥ 0 ∧ z = h) ∨ (h ≤ 0 ∧ z = 0) with its bounds and the triangle cut
z ≤ u(h − l)/(u − l) as redundant constraints; a branch-and-bound split fixes a phase.
Each query gets a fresh solver and the time left to the global deadline; a watchdog
interrupts z3 at the deadline, and a timeout is `unknown`, never `unsat` (DLV's bug).
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
import z3

from bastion.verify.bounds import Bounds, Splits
from bastion.verify.linear_maps import layer_matrix
from bastion.verify.network import AvgPool2d, MaxPool2d, Network, ReLU
from bastion.verify.outcome import Answer, Outcome
from bastion.verify.spec import Halfspaces, Property

Term: TypeAlias = "z3.ArithRef | Fraction"  # a z3 expression, or an exact constant

SmtOutcome = Outcome  # the former name, kept for the DLV back-propagation's imports


def _q(value: float | Fraction) -> Fraction:
    return value if isinstance(value, Fraction) else Fraction(float(value))


class _Encoder:
    """Builds the constraints of one sub-problem into a fresh solver."""

    def __init__(self, ctx: z3.Context) -> None:
        self.ctx = ctx
        self.solver = z3.SolverFor("QF_LRA", ctx=ctx)
        self.count = 0

    def real(self, lo: float, hi: float) -> z3.ArithRef:
        v = z3.Real(f"v{self.count}", ctx=self.ctx)
        self.count += 1
        self.solver.add(v >= _z3c(_q(lo), self.ctx), v <= _z3c(_q(hi), self.ctx))
        return v

    def affine(self, matrix: sp.csr_matrix, bias: list[Fraction], terms: list[Term]) -> list[Term]:
        """Rows of `matrix @ terms + bias` as z3 sums (shared, not copied, by later layers),
        or as exact constants where every term is constant."""
        out: list[Term] = []
        for r in range(matrix.shape[0]):
            start, end = matrix.indptr[r], matrix.indptr[r + 1]
            const = bias[r]
            parts = []
            for j, w in zip(matrix.indices[start:end], matrix.data[start:end], strict=True):
                t = terms[j]
                coeff = _q(w)
                if isinstance(t, Fraction):
                    const += coeff * t
                elif coeff:
                    parts.append(_z3c(coeff, self.ctx) * t)
            if not parts:
                out.append(const)
                continue
            expr = z3.Sum(*parts) + _z3c(const, self.ctx) if const else z3.Sum(*parts)
            out.append(expr)
        return out


def _z3c(value: Fraction, ctx: z3.Context) -> z3.ArithRef:
    return z3.RealVal(f"{value.numerator}/{value.denominator}", ctx=ctx)


def _term(value: Term, ctx: z3.Context) -> z3.ArithRef:
    return _z3c(value, ctx) if isinstance(value, Fraction) else value


def solve_smt(
    network: Network,
    prop: Property,
    disjunct: Halfspaces,
    bounds: Bounds,
    *,
    splits: Splits | None = None,
    delta: float = 0.0,
    deadline: float,
) -> Outcome:
    """Is there an input of the box whose output satisfies `A y ≤ b − delta`?"""
    start = time.perf_counter()
    splits = splits or {}
    ctx = z3.Context()
    enc = _Encoder(ctx)
    lower = prop.lower.flatten().double().numpy()
    upper = prop.upper.flatten().double().numpy()
    inputs: list[Term] = []
    free: list[tuple[int, z3.ArithRef]] = []
    for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
        if lo == hi:
            inputs.append(_q(lo))
        else:
            v = enc.real(lo, hi)
            inputs.append(v)
            free.append((i, v))
    terms = inputs
    for j, layer in enumerate(network.layers):
        if isinstance(layer, ReLU):
            phase = splits.get(j)
            terms = _relu(enc, terms, bounds, j, phase)
        elif isinstance(layer, MaxPool2d):
            terms = _maxpool(enc, terms, layer, bounds, j, network.shapes[j])
        else:
            matrix, bias = layer_matrix(layer, network.shapes[j])
            if isinstance(layer, AvgPool2d):  # 1/k² is not a float: use the exact fraction
                matrix = matrix.copy()
                k = Fraction(1, layer.kernel[0] * layer.kernel[1])
                matrix.data = np.array([k] * len(matrix.data), dtype=object)
            terms = enc.affine(matrix, [_q(b) for b in bias], terms)
    a, b = disjunct.a.double().numpy(), disjunct.b.double().numpy()
    for r in range(len(b)):
        const = Fraction(0)
        parts: list[z3.ArithRef] = []
        for c, t in zip(a[r], terms, strict=True):
            if not c:
                continue
            if isinstance(t, Fraction):
                const += _q(c) * t
            else:
                parts.append(_z3c(_q(c), ctx) * t)
        rhs = _q(b[r]) - _q(delta) - const
        if parts:
            enc.solver.add(z3.Sum(*parts) <= _z3c(rhs, ctx))
        elif rhs < 0:
            enc.solver.add(z3.BoolVal(False, ctx=ctx))
    return _check(enc, free, lower, start, deadline)


def _relu(enc: _Encoder, terms: list[Term], bounds: Bounds, j: int, phase: object) -> list[Term]:
    lo = bounds.lower[j].flatten().numpy()
    hi = bounds.upper[j].flatten().numpy()
    ph = np.zeros(len(terms), dtype=int) if phase is None else np.asarray(phase).astype(int)
    out: list[Term] = []
    for i, h in enumerate(terms):
        if isinstance(h, Fraction):
            out.append(max(h, Fraction(0)))
        elif lo[i] >= 0 or ph[i] > 0:
            if ph[i] > 0:
                enc.solver.add(h >= 0)
            out.append(h)
        elif hi[i] <= 0 or ph[i] < 0:
            if ph[i] < 0:
                enc.solver.add(h <= 0)
            out.append(Fraction(0))
        else:
            z = enc.real(0.0, float(hi[i]))
            l_, u_ = _q(lo[i]), _q(hi[i])
            enc.solver.add(z >= h)
            enc.solver.add(z <= _z3c(u_ / (u_ - l_), enc.ctx) * (h - _z3c(l_, enc.ctx)))
            enc.solver.add(z3.Or(z3.And(h >= 0, z == h), z3.And(h <= 0, z == 0)))
            out.append(z)
    return out


def _maxpool(
    enc: _Encoder,
    terms: list[Term],
    layer: MaxPool2d,
    bounds: Bounds,
    j: int,
    shape: tuple[int, ...],
) -> list[Term]:
    c, h, w = shape
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    lo = bounds.lower[j].flatten().numpy()
    hi = bounds.upper[j].flatten().numpy()
    out: list[Term] = []
    for ch in range(c):
        for oy in range((h - kh) // sh + 1):
            for ox in range((w - kw) // sw + 1):
                idx = [
                    (ch * h + oy * sh + a) * w + ox * sw + b for a in range(kh) for b in range(kw)
                ]
                best = max(idx, key=lambda i: lo[i])
                if all(lo[best] >= hi[i] for i in idx if i != best):
                    out.append(terms[best])
                    continue
                z = enc.real(float(lo[best]), float(max(hi[i] for i in idx)))
                xs = [_term(terms[i], enc.ctx) for i in idx if hi[i] >= lo[best]]
                enc.solver.add(*[z >= x for x in xs])
                enc.solver.add(z3.Or(*[z == x for x in xs]))
                out.append(z)
    return out


def _check(
    enc: _Encoder,
    free: list[tuple[int, z3.ArithRef]],
    base: np.ndarray,
    start: float,
    deadline: float,
) -> Outcome:
    left = deadline - time.perf_counter()
    if left <= 0:
        return Outcome(Answer.UNKNOWN, None, time.perf_counter() - start, "deadline reached")
    enc.solver.set("timeout", max(1, int(left * 1000)))
    watchdog = threading.Timer(left, enc.ctx.interrupt)  # z3's own timeout is not always kept
    watchdog.start()
    try:
        result = enc.solver.check()
    finally:
        watchdog.cancel()
    seconds = time.perf_counter() - start
    if result == z3.unsat:
        return Outcome(Answer.UNSAT, None, seconds)
    if result == z3.sat:
        model = enc.solver.model()
        x = base.copy()
        for i, v in free:
            value = model.eval(v, model_completion=True)
            x[i] = float(Fraction(value.numerator_as_long(), value.denominator_as_long()))
        return Outcome(Answer.SAT, x, seconds)
    return Outcome(Answer.UNKNOWN, None, seconds, enc.solver.reason_unknown() or "timeout")
