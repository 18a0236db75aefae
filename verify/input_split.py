"""Batched input-splitting branch and bound, for regions with few free inputs (ACAS Xu).

With a handful of free inputs, halving the box shrinks every layer's bounds at once, so
the sub-boxes are bounded and split, many in one batch: each round takes the `batch`
open boxes with the lowest bound, halves each along one input, bounds all children
together (CROWN for every layer, per box, through the rigorous path with per-row bounds,
`back_substitution.py`), closes the ones whose bound clears the disjunct, and tries each
child's centre and its bound's minimising corner on the network as an attack (a point
inside the unsafe set ends the search; the caller replays it on the model).

Which input: the one with the largest |coefficient| × width in the linear lower bound of
the box's worst row, i.e. the input whose range costs that bound most (the gradient-based
"smart" input split of alpha-beta-CROWN, in the form of Wang et al.'s input-split
heuristic); the coefficients come from a plain floating-point pass and only steer.
Networks without max-pool and with at most `MAX_NEURONS` ReLUs only (each box bounds
every neuron): others keep the z3/MILP engines.
"""

from __future__ import annotations

import time

import torch

from bastion.verify.alpha_crown import linear_pass
from bastion.verify.back_substitution import Relaxation, back_substitute
from bastion.verify.layer_bounds import interval, interval_add
from bastion.verify.network import Add, MaxPool2d, Network, ReLU
from bastion.verify.outcome import Answer, Outcome
from bastion.verify.rounding import down
from bastion.verify.spec import Halfspaces, Property

BATCH = 256
MAX_NEURONS = 2000


def applicable(network: Network, prop: Property, max_free: int) -> bool:
    """Whether input splitting suits this network and region."""
    relus = sum(
        int(torch.Size(network.shapes[j]).numel())
        for j, layer in enumerate(network.layers)
        if isinstance(layer, ReLU)
    )
    no_pool = not any(isinstance(layer, MaxPool2d) for layer in network.layers)
    return no_pool and relus <= MAX_NEURONS and 0 < int(prop.free.sum()) <= max_free


def box_bounds(
    network: Network, lo0: torch.Tensor, hi0: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rigorous CROWN bounds of every activation for a batch of boxes (leading axis)."""
    lo, hi = [lo0], [hi0]
    for i, layer in enumerate(network.layers):
        if isinstance(layer, ReLU) and i > 0:
            shape = network.shapes[i]
            flat_lo, flat_hi = lo[i].flatten(1), hi[i].flatten(1)
            box, neuron = ((flat_lo < 0) & (flat_hi > 0)).nonzero(as_tuple=True)
            n = len(box)
            if n:  # each box's unstable neurons, in both directions
                eye = torch.zeros(n, flat_lo.shape[1], dtype=torch.float64)
                eye[torch.arange(n), neuron] = 1.0
                rows = torch.cat([eye, -eye]).view(-1, *shape)
                owner = torch.cat([box, box])
                low = back_substitute(
                    network, [t[owner] for t in lo], [t[owner] for t in hi], rows, i
                )
                flat_lo, flat_hi = flat_lo.clone(), flat_hi.clone()
                flat_lo[box, neuron] = torch.maximum(flat_lo[box, neuron], low[:n])
                flat_hi[box, neuron] = torch.minimum(flat_hi[box, neuron], -low[n:])
                lo[i], hi[i] = flat_lo.view(lo[i].shape), flat_hi.view(hi[i].shape)
        if isinstance(layer, Add):
            l_next, h_next = interval_add(layer, lo[i], hi[i], lo[layer.skip], hi[layer.skip])
        else:
            l_next, h_next = interval(layer, lo[i], hi[i])
        lo.append(l_next)
        hi.append(h_next)
    return lo, hi


class InputSplit:
    """Branch and bound on the input box for one disjunct `A y ≤ b`."""

    def __init__(
        self, network: Network, prop: Property, disjunct: Halfspaces, *, batch: int = BATCH
    ) -> None:
        self.network, self.prop, self.disjunct, self.batch = network, prop, disjunct, batch
        n = len(network.layers)
        self.a = disjunct.a.double().view(-1, *network.shapes[n])
        self.b = disjunct.b.double()
        self.m = self.a.shape[0]

    def _bound(
        self, lo0: torch.Tensor, hi0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per box: the rigorous lower bound of the disjunct (max over rows), the input to
        split next, and attack candidates (centres and minimising corners)."""
        boxes, n = lo0.shape[0], len(self.network.layers)
        lo, hi = box_bounds(self.network, lo0, hi0)
        rep_lo = [t.repeat_interleave(self.m, 0) for t in lo]
        rep_hi = [t.repeat_interleave(self.m, 0) for t in hi]
        a = self.a.repeat(boxes, *([1] * (self.a.dim() - 1)))
        b = self.b.repeat(boxes)
        rows = down(back_substitute(self.network, rep_lo, rep_hi, a, n) - b).view(boxes, self.m)
        with torch.no_grad():
            guide = linear_pass(self.network, rep_lo, rep_hi, a, n, Relaxation())
        assert guide.coeff is not None
        worst = rows.argmin(1) + torch.arange(boxes) * self.m
        width = (hi0 - lo0).flatten(1)
        score = guide.coeff[worst].flatten(1).abs() * width
        score = torch.where(width > 0, score + 1e-30 * width, torch.full_like(score, -1.0))
        centres = (lo0 + hi0) / 2
        candidates = torch.cat([centres, guide.argmin.view(-1, *lo0.shape[1:])])
        return rows.max(1).values, score.argmax(1), candidates

    def _attack(self, candidates: torch.Tensor) -> torch.Tensor | None:
        x = torch.maximum(torch.minimum(candidates, self.prop.upper), self.prop.lower)
        with torch.no_grad():
            y = self.network.forward(x.float()).double()
        depth = (self.b - y @ self.disjunct.a.double().T).min(1).values
        k = int(depth.argmax())
        return x[k] if float(depth[k]) > 0 else None

    def run(self, deadline: float) -> Outcome:
        """UNSAT when every sub-box is closed, SAT with a candidate witness, or UNKNOWN."""
        lo0, hi0 = self.prop.lower[None].clone(), self.prop.upper[None].clone()
        lower, split, candidates = self._bound(lo0, hi0)
        domains = 1
        while True:
            witness = self._attack(candidates)
            if witness is not None:
                return Outcome(Answer.SAT, witness.flatten().numpy(), domains=domains)
            keep = (lower <= 0).nonzero().flatten()
            lo0, hi0, lower, split = lo0[keep], hi0[keep], lower[keep], split[keep]
            if len(lower) == 0:
                return Outcome(Answer.UNSAT, domains=domains)
            if time.perf_counter() >= deadline:
                why = "deadline reached in input-split branch and bound"
                return Outcome(Answer.UNKNOWN, reason=why, domains=domains)
            order = lower.argsort()
            now, later = order[: self.batch], order[self.batch :]
            c_lo, c_hi = _halves(lo0[now], hi0[now], split[now])
            domains += len(c_lo)
            c_lower, c_split, candidates = self._bound(c_lo, c_hi)
            lo0 = torch.cat([lo0[later], c_lo])
            hi0 = torch.cat([hi0[later], c_hi])
            lower = torch.cat([lower[later], c_lower])
            split = torch.cat([split[later], c_split])


def _halves(
    lo: torch.Tensor, hi: torch.Tensor, dim: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box halved along its input `dim`: the lower halves, then the upper halves."""
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    rows = torch.arange(len(dim))
    mid = (flat_lo[rows, dim] + flat_hi[rows, dim]) / 2
    low_hi, high_lo = flat_hi.clone(), flat_lo.clone()
    low_hi[rows, dim] = mid
    high_lo[rows, dim] = mid
    new_lo = torch.cat([flat_lo, high_lo]).view(-1, *lo.shape[1:])
    new_hi = torch.cat([low_hi, flat_hi]).view(-1, *lo.shape[1:])
    return new_lo, new_hi
