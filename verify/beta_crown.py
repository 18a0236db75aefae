"""Batched branch and bound with split constraints in the bound: beta-CROWN (Wang et al.,
"Beta-CROWN", NeurIPS 2021).

A sub-problem (domain) fixes the phase of some ReLUs (h ≥ 0 or h ≤ 0). Its bound is the
CROWN bound with the split neurons' relaxations replaced by their phase (the layer
bounds clamped at 0) and each split enforced in the bound through a multiplier β ≥ 0
(`back_substitution.Relaxation`); α (the lower slopes, alpha-CROWN) and β are optimised
jointly per domain by Adam, many domains in one batch (`alpha_crown.optimise`), and the
bound that closes a domain is re-evaluated through the rigorous path, so every closed
domain is proved for the exact network. Domains inherit their parent's α and β (β of
the new split starts at 0); the ones with the lowest bound are split first.

Branching: FSB, filtered smart branching (De Palma et al., "Improved Branch and Bound for
Neural Network Verification via Lagrangian Decomposition", 2021), as alpha-beta-CROWN
runs it: the `candidates` neurons with the highest BaBSR score (Bunel et al., JMLR 2020:
|min(λ, 0)·(−l)·u/(u − l) + max(λ·b·(s − 1), λ·b·s)|, λ the bounded row's coefficient on
the neuron's output, b the bias of the layer before it, s = u/(u − l)) are each tried by
bounding both children once with the parent's α and β; the split whose worse child is
best is taken. Deviation: 32 candidates, not alpha-beta-CROWN's 3: on mnistfc 256×2
prop_3_0.03, disjunct 8, closing it took 11,545 domains (22 s CPU) with 6 candidates,
4,363 (10 s) with 10, 1,519 (5.7 s) with 20 and 541 (4.5 s) with 40 (BaBSR alone did not
close it in 5,349 domains); fewer where the candidates' bounds would not fit the budget.

Attack inside the search: each bounded domain's minimising input is evaluated on the
network in float32; a point inside the unsafe set ends the search (the caller replays it
on the model). A domain whose ReLUs are all fixed but whose bound does not close it
makes the answer UNKNOWN (the verifier then hands the disjunct to the exact MILP).

Defaults as alpha-beta-CROWN's 2021 configuration for BaB: 20 iterations per batch,
learning rates 0.01 (α) and 0.05 (β). Intermediate layers' bounds are the root's
(alpha-CROWN), clamped by each domain's splits: they are not recomputed per domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from bastion.verify.alpha_crown import initial_alpha, linear_pass, optimise, relu_layers
from bastion.verify.back_substitution import Relaxation, back_substitute
from bastion.verify.bounds import Bounds
from bastion.verify.network import Conv2d, Dense, Elementwise, Network
from bastion.verify.outcome import Answer, Outcome
from bastion.verify.rounding import down
from bastion.verify.spec import Halfspaces, Property

BATCH = 128  # domains split per round (each gives two children)
ITERATIONS = 20
LR_ALPHA, LR_BETA = 0.01, 0.05
CANDIDATES = 32  # FSB: neurons tried per domain (alpha-beta-CROWN: 3; measured below)
_FSB_BUDGET = 60_000_000  # per-row bound entries of all candidates' children at once


class _Late(Exception):
    """The deadline passed while a batch was bounded."""


@dataclass
class _Domains:
    """Open sub-problems, batched: phases `D × n_j` per ReLU layer, α and β `D·m × n_j`
    (m rows per domain), the rigorous lower bound per domain (max over its rows), and the
    chosen split (layer position in `layers`, neuron) per domain (−1: nothing to split)."""

    phase: list[torch.Tensor]
    alpha: list[torch.Tensor]
    beta: list[torch.Tensor]
    lower: torch.Tensor
    split_layer: torch.Tensor
    split_neuron: torch.Tensor

    def __len__(self) -> int:
        return len(self.lower)

    def take(self, idx: torch.Tensor, m: int) -> _Domains:
        rows = (idx[:, None] * m + torch.arange(m)).flatten()
        return _Domains(
            [t[idx] for t in self.phase], [t[rows] for t in self.alpha],
            [t[rows] for t in self.beta], self.lower[idx], self.split_layer[idx],
            self.split_neuron[idx],
        )  # fmt: skip

    def cat(self, other: _Domains) -> _Domains:
        def join(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]

        return _Domains(
            join(self.phase, other.phase), join(self.alpha, other.alpha),
            join(self.beta, other.beta), torch.cat([self.lower, other.lower]),
            torch.cat([self.split_layer, other.split_layer]),
            torch.cat([self.split_neuron, other.split_neuron]),
        )  # fmt: skip


class BetaCrown:
    """Branch and bound for one disjunct `A y ≤ b` over the property's box."""

    def __init__(
        self,
        network: Network,
        prop: Property,
        disjunct: Halfspaces,
        root: Bounds,
        *,
        batch: int = BATCH,
        iterations: int = ITERATIONS,
        candidates: int = CANDIDATES,
    ) -> None:
        self.network, self.prop, self.root = network, prop, root
        self.disjunct = disjunct
        n = len(network.layers)
        self.a = disjunct.a.double().view(-1, *network.shapes[n])
        self.b = disjunct.b.double()
        self.m = self.a.shape[0]
        self.layers = relu_layers(network, n)
        self.batch, self.iterations, self.candidates = batch, iterations, candidates
        self.biases = [_bias(network, j) for j in self.layers]
        self.domains = 0  # sub-problems made so far (reported also when time runs out)

    def _layer_bounds(self, phase: list[torch.Tensor]) -> tuple[list, list]:
        """Per-domain bounds (a leading domain axis at the ReLU layers), splits applied."""
        lo, hi = list(self.root.lower), list(self.root.upper)
        for j, p in zip(self.layers, phase, strict=True):
            shape = self.network.shapes[j]
            base_lo, base_hi = lo[j].flatten()[None], hi[j].flatten()[None]
            lo[j] = torch.where(p > 0, base_lo.clamp_min(0), base_lo).view(-1, *shape)
            hi[j] = torch.where(p < 0, base_hi.clamp_max(0), base_hi).view(-1, *shape)
        return lo, hi

    def _rows(self, lo: list, hi: list) -> tuple[list, list]:
        """Domain bounds repeated for each of the m rows of a domain."""
        rep = [t.repeat_interleave(self.m, 0) if j in self.layers else t for j, t in enumerate(lo)]
        rep_hi = [
            t.repeat_interleave(self.m, 0) if j in self.layers else t for j, t in enumerate(hi)
        ]
        return rep, rep_hi

    def bound(self, d: _Domains, deadline: float) -> tuple[_Domains, torch.Tensor, bool]:
        """Optimise and rigorously bound the domains; returns them with their new α, β,
        bound and split choice, the best attack candidate, and whether any domain is empty."""
        lo, hi = self._layer_bounds(d.phase)
        empty = torch.zeros(len(d), dtype=torch.bool)
        for j in self.layers:
            empty |= (lo[j] > hi[j]).flatten(1).any(1)
        lo_r, hi_r = self._rows(lo, hi)
        count = len(d) * self.m
        a = self.a.repeat(len(d), *([1] * (self.a.dim() - 1)))
        phase_r = {
            j: p.repeat_interleave(self.m, 0) for j, p in zip(self.layers, d.phase, strict=True)
        }
        relax = Relaxation(
            dict(zip(self.layers, d.alpha, strict=True)),
            dict(zip(self.layers, d.beta, strict=True)),
            phase_r,
        )
        n = len(self.network.layers)
        relax, result = optimise(
            self.network, lo_r, hi_r, a, n, relax, iterations=self.iterations,
            lr_alpha=LR_ALPHA, lr_beta=LR_BETA, offset=-self.b.repeat(len(d)),
            deadline=deadline,
        )  # fmt: skip
        if time.perf_counter() >= deadline:  # the optimiser stopped early: nothing to keep
            raise _Late
        sound = Relaxation(
            {j: t.double() for j, t in relax.alpha.items()},
            {j: t.double() for j, t in relax.beta.items()},
            phase_r,
        )
        rows = down(back_substitute(self.network, lo_r, hi_r, a, n, sound) - self.b.repeat(len(d)))
        lower = rows.view(len(d), self.m).max(1).values
        lower = torch.where(empty, torch.full_like(lower, float("inf")), lower)
        alpha = [relax.alpha[j].float() for j in self.layers]
        beta = [relax.beta[j].float() for j in self.layers]
        scores = self._scores(d, lo, hi, result.lambdas, rows.view(len(d), self.m))
        layer, neuron = self._branch(d, lo, hi, relax, scores)
        out = _Domains(d.phase, alpha, beta, lower, layer, neuron)
        return out, result.argmin.view(count, *self.network.input_shape), bool(empty.any())

    def _scores(
        self, d: _Domains, lo: list, hi: list, lambdas: dict, rows: torch.Tensor
    ) -> torch.Tensor:
        """BaBSR's score of every neuron per domain (−1: not splittable), all ReLU layers
        side by side, on each domain's row with the lowest bound (module docstring)."""
        pick = rows.argmin(1) + torch.arange(len(d)) * self.m
        out = []
        for pos, (j, bias) in enumerate(zip(self.layers, self.biases, strict=True)):
            l_, u_ = lo[j].flatten(1), hi[j].flatten(1)
            free = (l_ < 0) & (u_ > 0) & (d.phase[pos] == 0)
            lam = lambdas[j][pick].double()
            neg_l, pos_u = (-l_).clamp_min(0), u_.clamp_min(0)
            s = pos_u / (pos_u + neg_l).clamp_min(1e-30)
            intercept = lam.clamp_max(0) * neg_l * s
            bias_term = torch.maximum(lam * bias * (s - 1), lam * bias * s)
            score = (intercept + bias_term).abs()
            # a free neuron always outranks none; ties broken by the triangle's size
            out.append(torch.where(free, score + 1e-12 * neg_l * s, torch.full_like(score, -1.0)))
        return torch.cat(out, 1)

    def _branch(
        self, d: _Domains, lo: list, hi: list, relax: Relaxation, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FSB: the `candidates` best neurons by BaBSR, each tried by bounding both children
        once with the parent's α and β; the split whose worse child bound is highest."""
        sizes = [self.root.lower[j].numel() for j in self.layers]
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        per_try = 2 * len(d) * self.m * scores.shape[1]  # per-row bound entries per candidate
        k = max(1, min(self.candidates, scores.shape[1], _FSB_BUDGET // max(per_try, 1)))
        top, flat = scores.topk(k, 1)
        count = len(d)
        if k > 1:
            value = self._try_splits(d, lo, hi, relax, flat, offsets).view(count, k)
            value = torch.where(top < 0, torch.full_like(value, float("-inf")), value)
            choice = value.argmax(1)
        else:
            choice = torch.zeros(count, dtype=torch.long)
        best = flat[torch.arange(count), choice]
        ok = top[torch.arange(count), choice] >= 0
        layer = torch.searchsorted(offsets, best, right=True) - 1
        neuron = best - offsets[layer]
        return torch.where(ok, layer, -1), neuron

    def _try_splits(
        self, d: _Domains, lo: list, hi: list, relax: Relaxation, flat: torch.Tensor,
        offsets: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Per candidate split (domain-major, `flat` D × k): the lower of its two children's
        plain bounds, from one floating-point pass with the parent's α and β."""
        count, k = flat.shape
        tries = 2 * k  # children per domain: (candidate, phase +1), (candidate, phase −1)
        parent = torch.arange(count).repeat_interleave(tries)
        target = flat.repeat_interleave(2, 1).flatten()
        sign = torch.tensor([1, -1], dtype=torch.int8).repeat(count * k)
        n = len(self.network.layers)
        c_lo, c_hi = list(lo), list(hi)
        phase = {}
        for pos, j in enumerate(self.layers):
            mine = (target >= offsets[pos]) & (target < offsets[pos + 1])
            last = int(offsets[pos + 1] - offsets[pos]) - 1
            idx = (target - offsets[pos]).clamp(0, last)
            f_lo, f_hi = lo[j].flatten(1)[parent].clone(), hi[j].flatten(1)[parent].clone()
            rows = torch.arange(len(parent))
            up = mine & (sign > 0)
            down_ = mine & (sign < 0)
            f_lo[rows[up], idx[up]] = f_lo[rows[up], idx[up]].clamp_min(0)
            f_hi[rows[down_], idx[down_]] = f_hi[rows[down_], idx[down_]].clamp_max(0)
            c_lo[j] = f_lo.view(-1, *self.network.shapes[j]).repeat_interleave(self.m, 0)
            c_hi[j] = f_hi.view(-1, *self.network.shapes[j]).repeat_interleave(self.m, 0)
            p = d.phase[pos][parent].clone()
            p[rows[mine], idx[mine]] = sign[mine]
            phase[j] = p.repeat_interleave(self.m, 0)
        row_idx = (parent[:, None] * self.m + torch.arange(self.m)).flatten()
        trial = Relaxation(
            {j: t[row_idx] for j, t in relax.alpha.items()},
            {j: t[row_idx] for j, t in relax.beta.items()},
            phase,
        )
        a = self.a.repeat(len(parent), *([1] * (self.a.dim() - 1))).float()
        with torch.no_grad():
            value = linear_pass(self.network, c_lo, c_hi, a, n, trial).value.double()
        per_child = (value - self.b.repeat(len(parent))).view(len(parent), self.m).max(1).values
        return per_child.view(count * k, 2).min(1).values

    def _children(self, d: _Domains) -> _Domains:
        both = d.cat(d)
        count = len(d)
        for pos in range(len(self.layers)):
            both.phase[pos] = both.phase[pos].clone()
        idx = torch.arange(2 * count)
        sign = torch.cat([torch.ones(count), -torch.ones(count)]).to(torch.int8)
        for pos in range(len(self.layers)):
            mine = both.split_layer == pos
            both.phase[pos][idx[mine], both.split_neuron[mine]] = sign[mine]
        return both

    def run(self, deadline: float) -> Outcome:
        """UNSAT when every domain is closed, SAT with a candidate witness, or UNKNOWN
        (at once, nothing bounded, when `deadline` has passed)."""
        if time.perf_counter() >= deadline:
            return Outcome(Answer.UNKNOWN, reason="deadline reached before beta-CROWN started")
        root_alpha = initial_alpha(self.network, self.root.lower, self.root.upper,
                                   len(self.network.layers), self.m)  # fmt: skip
        d = _Domains(
            [torch.zeros(self.root.lower[j].numel(), dtype=torch.int8)[None] for j in self.layers],
            [root_alpha[j].float() for j in self.layers],
            [torch.zeros(self.m, self.root.lower[j].numel()) for j in self.layers],
            torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        )  # fmt: skip
        try:
            return self._search(d, deadline)
        except _Late:
            why = "deadline reached in beta-CROWN"
            return Outcome(Answer.UNKNOWN, reason=why, domains=self.domains)

    def _search(self, d: _Domains, deadline: float) -> Outcome:
        saved = self.iterations
        self.iterations = max(saved, 100)  # the root: alpha-CROWN's longer run
        d, candidates, _ = self.bound(d, deadline)
        self.iterations = saved
        self.domains, unknown = 1, ""
        while True:
            witness = self._attack(candidates)
            if witness is not None:
                return Outcome(Answer.SAT, witness, domains=self.domains)
            keep = d.lower <= 0
            stuck = keep & (d.split_layer < 0)
            if bool(stuck.any()):
                unknown = "a sub-problem with every ReLU fixed was not closed by its bound"
                keep &= ~stuck
            d = d.take(keep.nonzero().flatten(), self.m)
            if len(d) == 0:
                break
            if time.perf_counter() >= deadline:
                why = "deadline reached in beta-CROWN"
                return Outcome(Answer.UNKNOWN, reason=why, domains=self.domains)
            order = d.lower.argsort()
            now, later = order[: self.batch], order[self.batch :]
            head, rest = d.take(now, self.m), d.take(later, self.m)
            children = self._children(head)
            self.domains += len(children)
            bounded, candidates, _ = self.bound(children, deadline)
            d = rest.cat(bounded)
        if unknown:
            return Outcome(Answer.UNKNOWN, reason=unknown, domains=self.domains)
        return Outcome(Answer.UNSAT, domains=self.domains)

    def _attack(self, candidates: torch.Tensor) -> np.ndarray | None:
        """The candidate the float32 network puts deepest in the disjunct, if any is in."""
        x = torch.maximum(torch.minimum(candidates, self.prop.upper), self.prop.lower)
        with torch.no_grad():
            y = self.network.forward(x.float()).double()
        depth = (self.b - y @ self.disjunct.a.double().T).min(1).values
        k = int(depth.argmax())
        if float(depth[k]) > 0:
            return x[k].flatten().numpy()
        return None


def _bias(network: Network, j: int) -> torch.Tensor:
    """The bias of the layer feeding ReLU j, one value per neuron (zeros if none)."""
    shape = network.shapes[j]
    prev = network.layers[j - 1] if j > 0 else None
    if isinstance(prev, Dense):
        return prev.bias.double().flatten()
    if isinstance(prev, Conv2d):
        return prev.bias.double()[:, None, None].expand(shape).flatten()
    if isinstance(prev, Elementwise):
        return prev.shift.double().expand(shape).flatten()
    return torch.zeros(int(torch.Size(shape).numel()), dtype=torch.float64)
