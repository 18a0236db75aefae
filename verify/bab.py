"""Branch and bound, so the exact engine only sees small sub-problems.

A sub-problem is a sub-box of the input region plus fixed phases of some ReLUs (`Splits`).
Each one is re-bounded with CROWN: an empty or bounded-away sub-problem is closed; one
with at most `leaf_size` unstable ReLUs goes to the exact engine (`leaf`); any other is
split. With few free inputs (≤ `input_split_max`, e.g. DLV feature regions, ACAS Xu) the
split halves the free input whose width times its influence on the first layer is
largest — this shrinks every later layer's bounds at once; otherwise it fixes the phase of
the unstable ReLU with the largest triangle relaxation area u·(−l)/(u − l). Depth-first,
so memory stays small; the first real witness ends the search, an `unknown` leaf is
remembered while the others are still explored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bastion.verify.bounds import (
    Bounds,
    DeadlineReached,
    Splits,
    compute_bounds,
    property_lower_bounds,
)
from bastion.verify.network import Dense, Network, ReLU
from bastion.verify.outcome import Answer, Outcome
from bastion.verify.spec import Halfspaces, Property

Leaf = Callable[[Property, Splits, Bounds], Outcome]


def _unstable(network: Network, bounds: Bounds, splits: Splits) -> list[tuple[int, torch.Tensor]]:
    out = []
    for j, layer in enumerate(network.layers):
        if isinstance(layer, ReLU):
            mask = bounds.unstable(j)
            if j in splits:
                mask &= splits[j] == 0
            out.append((j, mask))
    return out


def _choose(bounds: Bounds, unstable: list[tuple[int, torch.Tensor]]) -> tuple[int, int]:
    best, where = -1.0, (-1, -1)
    for j, mask in unstable:
        if not bool(mask.any()):
            continue
        lo, hi = bounds.lower[j].flatten(), bounds.upper[j].flatten()
        score = torch.where(mask, hi * (-lo) / (hi - lo).clamp_min(1e-12), -1.0)
        k = int(score.argmax())
        if float(score[k]) > best:
            best, where = float(score[k]), (j, k)
    return where


def _open_windows(bounds: Bounds) -> int:
    """Max-pool windows whose maximum the bounds do not pin to one input (z3 case splits)."""
    return sum(s.unstable for s in bounds.stats if s.kind == "maxpool")


def _input_split(network: Network, prop: Property) -> tuple[Property, Property]:
    width = (prop.upper - prop.lower).flatten()
    first = next((layer for layer in network.layers if isinstance(layer, Dense)), None)
    score = width.clone()
    if first is not None and first.weight.shape[1] == width.numel():
        score = score * first.weight.double().abs().sum(0)
    score[width <= 0] = -1.0
    k = int(score.argmax())
    mid = (prop.lower.flatten()[k] + prop.upper.flatten()[k]) / 2
    lo_hi, hi_lo = prop.upper.clone(), prop.lower.clone()
    lo_hi.view(-1)[k] = mid
    hi_lo.view(-1)[k] = mid
    return (
        Property(prop.lower, lo_hi, prop.unsafe),
        Property(hi_lo, prop.upper, prop.unsafe),
    )


def branch_and_bound(
    network: Network,
    prop: Property,
    disjunct: Halfspaces,
    *,
    leaf: Leaf,
    leaf_size: int,
    deadline: float,
    root: Bounds | None = None,
    input_split_max: int = 16,
) -> Outcome:
    """Decide whether the box reaches `disjunct`, splitting until leaves are small.

    `leaf(sub_property, splits, bounds)` decides a small sub-problem exactly.
    """
    by_input = int(prop.free.sum()) <= input_split_max
    stack: list[tuple[Property, Splits]] = [(Property(prop.lower, prop.upper, (disjunct,)), {})]
    unknown = ""
    domains = 0
    while stack:
        if time.perf_counter() >= deadline:
            reason = "deadline reached in branch and bound"
            return Outcome(Answer.UNKNOWN, reason=reason, domains=domains)
        sub, splits = stack.pop()
        domains += 1
        try:
            bounds = (
                root
                if (root is not None and domains == 1)
                else compute_bounds(network, sub, splits=splits, deadline=deadline)
            )
        except DeadlineReached:
            return Outcome(Answer.UNKNOWN, reason="deadline reached in branch and bound")
        if bounds.infeasible:
            continue
        if float(property_lower_bounds(network, sub, bounds)[0].max()) > 0:
            continue
        if by_input:  # the sub-box's centre is a cheap witness candidate
            centre = ((sub.lower + sub.upper) / 2)[None]
            if float(sub.violation(network.forward(centre))[0]) > 0:
                return Outcome(Answer.SAT, centre[0].flatten().numpy(), domains=domains)
        unstable = _unstable(network, bounds, splits)
        if sum(int(m.sum()) for _, m in unstable) + _open_windows(bounds) <= leaf_size:
            out = leaf(sub, splits, bounds)
            if out.status == Answer.SAT:
                out.domains = domains
                return out
            if out.status == Answer.UNKNOWN:
                unknown = out.reason or "the exact engine gave up on a sub-problem"
            continue
        if by_input:
            stack.extend((child, splits) for child in _input_split(network, sub))
            continue
        j, k = _choose(bounds, unstable)
        for phase in (-1, 1):
            child = {key: value.clone() for key, value in splits.items()}
            child.setdefault(j, torch.zeros(bounds.lower[j].numel(), dtype=torch.int8))
            child[j][k] = phase
            stack.append((sub, child))
    if unknown:
        return Outcome(Answer.UNKNOWN, reason=unknown, domains=domains)
    return Outcome(Answer.UNSAT, domains=domains)
