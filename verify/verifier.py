"""`verify`: decide a property of a ReLU network — bounds, attack, then an exact engine.

1. Interval bounds (milliseconds); if they exclude every disjunct of the unsafe set, the
   answer is SAFE without a solver.
2. PGD inside the box on the float32 model; a point it drives strictly into the unsafe
   set is UNSAFE at once.
3. CROWN/DeepPoly bounds for every layer, which settle many more instances as SAFE, then
   alpha-CROWN (the ReLU slopes optimised, `alpha_crown.py`): the intermediate layers'
   bounds, in order, within a third of the time left (the layers left keep CROWN's), then
   the disjuncts still open.
4. Each disjunct the bounds leave open goes to a complete engine: beta-CROWN branch and
   bound (`beta_crown.py`; on a small network with ≤ 16 free inputs it splits the input
   box instead, `input_split.py`), z3 under branch and bound (sub-problems of at most
   `leaf_size` unstable ReLUs), or the HiGHS MILP. "auto" runs beta-CROWN for two thirds
   of a disjunct's time, then for small regions (≤ 40 free inputs) z3 for a third of the
   rest and the MILP, for larger ones the MILP (z3's exact simplex on dense rows cannot
   finish them, specs/verification.md §4).

A witness of an exact engine is replayed through the float32 model: UNSAFE only when the
model itself puts it strictly inside the unsafe set. Witnesses on the decision boundary
are searched again with a margin δ; unsat at δ but sat at 0 stays UNKNOWN, never SAFE.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bastion.errors import ConfigError
from bastion.verify import input_split, milp, smt  # imported here: no cold import at first use
from bastion.verify.alpha_crown import ROOT_ITERATIONS
from bastion.verify.bab import branch_and_bound
from bastion.verify.beta_crown import BetaCrown
from bastion.verify.bounds import (
    Bounds,
    DeadlineReached,
    Splits,
    compute_bounds,
    property_lower_bounds,
)
from bastion.verify.falsify import falsify
from bastion.verify.network import Network
from bastion.verify.outcome import Answer, Outcome, Status
from bastion.verify.rounding import magnitude
from bastion.verify.slack import output_deviation, widen
from bastion.verify.spec import Halfspaces, Property
from bastion.verify.verdict import SAFE, UNKNOWN, UNSAFE, Verdict, guarantee_text

Forward = Callable[[torch.Tensor], torch.Tensor]
ENGINES = ("auto", "z3", "milp", "beta-crown", "bounds")
_SHARE = {"beta-crown": 2 / 3}  # of a disjunct's time, before the next engine takes over
_Z3_MAX_FREE = 40
_INPUT_SPLIT_MAX_FREE = 16  # beta-CROWN splits the input box instead of ReLUs up to here
_ALPHA_SHARE = 1 / 3  # of the time left, for alpha-CROWN's intermediate layers
_DELTA = 1e-4  # witness margin, on the scale of the outputs (VNN-COMP's tolerance)


def verify(
    network: Network,
    prop: Property,
    *,
    model: Forward | None = None,
    replay: Forward | None = None,
    engine: str = "auto",
    timeout: float = 60.0,
    attack: bool = True,
    leaf_size: int = 12,
    seed: int = 0,
) -> Verdict:
    """SAFE, UNSAFE (with a counterexample the float32 model confirms) or UNKNOWN.

    `model` is the float32 model as the user gave it (default: the network itself in
    float32); PGD searches on it and every counterexample is replayed on it alone. `replay`
    replaces it for the replay only (e.g. onnxruntime on the ONNX file, which PGD cannot
    differentiate). Both take a batch of `network.input_shape` inputs. `engine` is "auto",
    "z3", "milp", "beta-crown" or "bounds" (bounds and attack only). The wall time, from
    this call on, is at most `timeout` plus one step of an engine that cannot be
    interrupted sooner.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout}")
    if tuple(prop.lower.shape) != network.input_shape:
        raise ConfigError(
            f"the property's input box has shape {tuple(prop.lower.shape)} but the network "
            f"takes {network.input_shape}; give a box for the network's input"
        )
    start = time.perf_counter()
    deadline = start + timeout
    forward = model if model is not None else network.forward
    check = replay if replay is not None else forward
    # cheap intervals first, then the attack, then CROWN: each step can end the search
    stages: dict[str, float] = {}  # seconds from the start at which each stage ended

    def stage(name: str) -> None:
        stages[name] = round(time.perf_counter() - start, 4)

    bounds = compute_bounds(network, prop, method="ibp")
    lows = property_lower_bounds(network, prop, bounds)
    open_ = [i for i, low in enumerate(lows) if not float(low.max()) > 0]
    stats = [s.as_dict() for s in bounds.stats]
    stage("intervals")

    def done(status: Status, engine_used: str, **kw: Any) -> Verdict:
        guarantee = guarantee_text(engine_used) if status == SAFE else ""
        details: dict[str, Any] = {
            "disjuncts": len(prop.unsafe), "open_after_bounds": len(open_), "stage_seconds": stages,
        }  # fmt: skip
        details.update(kw.pop("details", {}))
        return Verdict(
            status, engine_used, time.perf_counter() - start, stats,
            guarantee=guarantee, details=details, **kw,
        )  # fmt: skip

    if not open_:
        return done(SAFE, "bounds")
    if attack:
        for x in falsify(_float32(forward), prop, seed=seed, deadline=deadline):
            verdict = _replay(done, check, prop, x, "pgd")
            if verdict is not None:
                return verdict
        stage("attack")
    if time.perf_counter() >= deadline:
        return done(UNKNOWN, "pgd" if attack else "bounds", reason="deadline reached")
    try:
        bounds = compute_bounds(network, prop, deadline=deadline)
    except DeadlineReached as exc:
        return done(UNKNOWN, "bounds", reason=str(exc))
    stats = [s.as_dict() for s in bounds.stats]
    lows = property_lower_bounds(network, prop, bounds)
    open_ = [i for i, low in enumerate(lows) if not float(low.max()) > 0]
    stage("crown")
    if not open_:
        return done(SAFE, "bounds")
    # alpha-CROWN: the ReLU slopes optimised, for the layers and the open disjuncts; where
    # the input box will be split, every sub-box gets its own bounds: the final rows only
    splits_inputs = input_split.applicable(network, prop, _INPUT_SPLIT_MAX_FREE)
    try:
        method = "crown" if splits_inputs else "alpha"
        now = time.perf_counter()
        until = now + (deadline - now) * _ALPHA_SHARE
        bounds = compute_bounds(
            network, prop, method=method, deadline=deadline, alpha_deadline=until
        )
    except DeadlineReached as exc:
        return done(UNKNOWN, "bounds", reason=str(exc))
    stats = [s.as_dict() for s in bounds.stats]
    lows = property_lower_bounds(
        network, prop, bounds, iterations=ROOT_ITERATIONS, only=open_, deadline=deadline
    )
    open_ = [i for i, low in enumerate(lows) if not float(low.max()) > 0]
    stage("alpha")
    if not open_:
        return done(SAFE, "alpha-crown")
    if engine == "bounds":
        return done(UNKNOWN, "bounds", reason="the bounds do not decide and no attack succeeded")
    free = int(prop.free.sum())
    engines = (
        [engine]
        if engine != "auto"
        else ["beta-crown", *(["z3", "milp"] if free <= _Z3_MAX_FREE else ["milp"])]
    )
    if network.residual:  # z3 and the MILP read chains of layers only
        engines = [e for e in engines if e == "beta-crown"]
        if not engines:
            why = f"{engine} does not read residual networks; use engine auto or beta-crown"
            return done(UNKNOWN, engine, reason=why)
    # most likely violated first (lowest bound); a fair share of the time each, then the
    # undecided ones again with all that is left, so one hard disjunct cannot starve the rest
    order = sorted(open_, key=lambda i: float(lows[i].max()))
    exact = _Exact(network, prop, bounds, leaf_size)
    reasons: dict[int, str] = {}
    domains = 0
    used: set[str] = set()
    for attempt in range(2):
        todo = order if attempt == 0 else [i for i in order if i in reasons]
        for n_left, i in zip(range(len(todo), 0, -1), todo, strict=True):
            if time.perf_counter() >= deadline:
                reasons.setdefault(i, "deadline reached before this disjunct was tried")
                continue
            left = deadline - time.perf_counter()
            slot = time.perf_counter() + (left / n_left if attempt == 0 else left)
            reasons.pop(i, None)
            outcome = Outcome(Answer.UNKNOWN, reason="no engine ran")
            for k, chosen in enumerate(engines):
                last = k == len(engines) - 1
                part = _SHARE.get(chosen, 1 / 3)
                share = slot if last else time.perf_counter() + (slot - time.perf_counter()) * part
                if time.perf_counter() >= slot:  # the disjunct's time is spent: start no engine
                    outcome = Outcome(Answer.UNKNOWN, reason=f"deadline reached before {chosen}")
                    break
                outcome = exact.decide(prop.unsafe[i], chosen, share)
                used.add(chosen)
                if outcome.status != Answer.UNKNOWN or last:
                    break
            domains += outcome.domains
            if outcome.status == Answer.SAT and outcome.witness is not None:
                verdict = _confirm(done, check, exact, i, outcome, chosen, slot)
                if verdict is not None:
                    return verdict
                reasons[i] = (
                    "witnesses of the exact engine lie on the boundary and the float32 model "
                    "does not confirm them"
                )
            elif outcome.status == Answer.UNKNOWN:
                reasons[i] = outcome.reason
                if outcome.witness is not None:  # the MILP's optimum within tolerance of 0
                    x = torch.as_tensor(outcome.witness).view(network.input_shape)
                    verdict = _replay(done, check, prop, x, chosen)
                    if verdict is not None:
                        return verdict
        if not reasons:
            break
    name = "+".join(e for e in engines if e in used) or "bounds"
    if reasons:
        why = "; ".join(f"disjunct {i}: {r}" for i, r in sorted(reasons.items()))
        return done(UNKNOWN, name, reason=why, details={"domains": domains})
    return done(SAFE, name, details={"domains": domains})


def _confirm(
    done: Callable[..., Verdict],
    forward: Forward,
    exact: _Exact,
    i: int,
    outcome: Outcome,
    engine: str,
    deadline: float,
) -> Verdict | None:
    """UNSAFE if the float32 model confirms the witness, or (z3) a deeper one (margin δ).

    The MILP's witness already maximises the depth of the violation, so for it a search at
    margin δ could only find a shallower point: it is not run again.
    """
    assert outcome.witness is not None
    prop, shape = exact.prop, exact.network.input_shape
    verdict = _replay(done, forward, prop, torch.as_tensor(outcome.witness).view(shape), engine)
    if verdict is not None or engine == "milp":
        return verdict
    deeper = exact.decide(_tighter(prop.unsafe[i]), engine, deadline)
    if deeper.status == Answer.SAT and deeper.witness is not None:
        return _replay(done, forward, prop, torch.as_tensor(deeper.witness).view(shape), engine)
    return None


def _depth_at_centre(network: Network, prop: Property, disjunct: Halfspaces) -> float:
    """min over rows of b − A y at the box centre (float64): a sanity check of the MILP."""
    centre = ((prop.lower + prop.upper) / 2)[None].double()
    with torch.no_grad():
        y = network.forward(centre)
    return float((disjunct.b.double() - y.double() @ disjunct.a.double().T).min())


def _float32(forward: Forward) -> Forward:
    return lambda x: forward(x.to(torch.float32))


def _tighter(disjunct: Halfspaces) -> Halfspaces:
    """The disjunct with its rows moved δ inside: `A y ≤ b − δ`."""
    return Halfspaces(disjunct.a, disjunct.b - _DELTA)


def _replay(
    done: Callable[..., Verdict], forward: Forward, prop: Property, x: torch.Tensor, engine: str
) -> Verdict | None:
    """UNSAFE if the model, on this one input alone (clipped into the box, float32), puts
    it strictly inside the unsafe set; else None. The verdict's output is that replay's."""
    x32 = _into_box(x, prop)
    if not bool(prop.contains(x32[None].double())[0]):
        return None
    with torch.no_grad():
        y = forward(x32[None]).detach().flatten(1).cpu()
    margin = float(prop.violation(y)[0])
    if not margin > 0:
        return None
    return done(UNSAFE, engine, counterexample=x32, output=y[0], margin=margin)


def _into_box(x: torch.Tensor, prop: Property) -> torch.Tensor:
    """x in float32, clipped so that every coordinate lies inside the box exactly."""
    lo, hi = prop.lower, prop.upper
    x32 = x.detach().cpu().double().clamp(lo, hi).to(torch.float32)
    x32 = torch.where(x32.double() < lo, x32.nextafter(torch.full_like(x32, np.inf)), x32)
    x32 = torch.where(x32.double() > hi, x32.nextafter(torch.full_like(x32, -np.inf)), x32)
    return x32


class _Exact:
    """The exact engines of one `verify` call; the MILP is encoded once, on first use.

    Both decide the network as stored; where a layer holds a rounded fold the disjunct is
    widened by the fold's effect first (`slack.py`), so their unsat holds for the network
    as given. Branch and bound prunes with the bounds, which include the fold radius.
    """

    def __init__(self, network: Network, prop: Property, bounds: Bounds, leaf_size: int) -> None:
        self.network, self.prop, self.bounds, self.leaf_size = network, prop, bounds, leaf_size
        self._milp: Any = None
        self._deviation: torch.Tensor | None = None

    def _widen(self, disjunct: Halfspaces) -> Halfspaces:
        if not self.network.folded:
            return disjunct
        if self._deviation is None:
            self._deviation = output_deviation(self.network, self.bounds)
        return widen(disjunct, self._deviation)

    def decide(self, disjunct: Halfspaces, engine: str, deadline: float) -> Outcome:
        """Can the box reach `disjunct`? Decided by `engine` ("beta-crown", "z3" or "milp")
        by `deadline`; UNKNOWN at once, nothing encoded or bounded, when it has passed."""
        if time.perf_counter() >= deadline:
            return Outcome(Answer.UNKNOWN, reason=f"deadline reached before {engine} started")
        if engine == "milp":
            return self._solve_milp(disjunct, deadline)
        if engine == "beta-crown":
            if input_split.applicable(self.network, self.prop, _INPUT_SPLIT_MAX_FREE):
                return input_split.InputSplit(self.network, self.prop, disjunct).run(deadline)
            return BetaCrown(self.network, self.prop, disjunct, self.bounds).run(deadline)
        network, exact = self.network, self._widen(disjunct)

        def leaf(sub: Property, splits: Splits, bounds: Bounds) -> Outcome:
            return smt.solve_smt(network, sub, exact, bounds, splits=splits, deadline=deadline)

        return branch_and_bound(
            network, self.prop, disjunct, leaf=leaf, leaf_size=self.leaf_size,
            deadline=deadline, root=self.bounds,
        )  # fmt: skip

    def _solve_milp(self, disjunct: Halfspaces, deadline: float) -> Outcome:
        if self._milp is None:
            tolerance = output_deviation(self.network, self.bounds, rel=milp.TOLERANCE)
            self._milp = (*milp.encode(self.network, self.prop, self.bounds), tolerance)
        prog, inputs, outputs, scale, tolerance = self._milp
        wide = self._widen(disjunct)
        y_mag = magnitude(self.bounds.lower[-1], self.bounds.upper[-1]).flatten()
        rows = wide.a.double().abs() @ (tolerance + milp.TOLERANCE * y_mag)
        margin = float(rows.max()) + milp.TOLERANCE * float(wide.b.abs().max() + 1)
        out = milp.solve_disjunct(
            prog, outputs, wide, deadline=deadline, margin=margin, scale=scale
        )
        if (
            out.status == Answer.UNSAT
            and _depth_at_centre(self.network, self.prop, wide) >= -margin
        ):
            # a point of the box reaches depth ≥ −τ, yet HiGHS found none ≥ −2τ: not trusted
            why = "HiGHS's infeasibility is contradicted by the box centre"
            return Outcome(Answer.UNKNOWN, None, out.seconds, why, domains=1)
        if out.witness is not None:
            out.witness = out.witness[inputs]
        out.domains = 1
        return out
