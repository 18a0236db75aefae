"""Optimised linear bounds: alpha-CROWN (Xu et al., "Fast and Complete", ICLR 2021).

CROWN bounds a row `a·z_k` by one linear relaxation per ReLU; the lower line z ≥ α·h is
valid for every α ∈ [0, 1], and CROWN's choice (1 where u > −l, else 0) is one guess. Here
α is a variable per row and per unstable neuron, optimised by projected gradient ascent
(Adam) on the bound itself, starting from CROWN's choice, all rows of a batch at once.
The optimiser creates its tensors on the rows' device; the verifier's callers keep
everything on the CPU, and only the CPU is tested.
The split multipliers of branch and bound (β, `beta_crown.py`) are optimised the same way
when splits are given.

The optimisation runs in plain floating point (`dtype`, float32 by default) without error
terms; it only chooses α and β. The bound that is reported comes from re-evaluating
those choices through the rigorous path (`back_substitution.back_substitute`), which
holds for any α ∈ [0, 1] and β ≥ 0 (clamped there), so no rounding of the optimiser can
make a bound unsound.

Defaults as alpha-beta-CROWN's (2021 configuration): Adam, learning rate 0.1 for α at the
root (100 iterations), decay 0.98 per iteration; the best value per row seen during the
run is kept. Deviation: intermediate layers' bounds are each optimised for themselves
(one neuron at a time, in order of the layers), not jointly for the final objective; the
caller gives them a deadline of their own (the verifier: a third of the time left), after
which the layers left keep CROWN's bounds (on one thread here: 30–60 s for ResNet-2B's five
intermediate ReLU layers, 85–110 s for ResNet-4B's nine, with the load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bastion.verify.back_substitution import (
    Relaxation,
    back_maxpool,
    back_substitute,
    per_row,
)
from bastion.verify.layer_bounds import back_linear
from bastion.verify.network import Add, MaxPool2d, Network, ReLU, apply_layer

ROOT_ITERATIONS = 100
ROOT_LR = 0.1
LR_DECAY = 0.98
_BUDGET = 40_000_000  # α entries optimised at once (rows × neurons), to bound memory


@dataclass
class Pass:
    """One differentiable back-substitution: the bound per row, and per ReLU layer the
    rows' coefficients on its output (λ, for branching), and the minimising input."""

    value: torch.Tensor
    lambdas: dict[int, torch.Tensor]
    argmin: torch.Tensor
    coeff: torch.Tensor | None = None  # the rows' coefficients on the input


def _rows(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t if per_row(t, shape) else t.unsqueeze(0)


def relu_layers(network: Network, k: int) -> list[int]:
    """Indices of the ReLU layers before activation k."""
    return [j for j in range(k) if isinstance(network.layers[j], ReLU)]


def linear_pass(
    network: Network,
    lower: list[torch.Tensor],
    upper: list[torch.Tensor],
    a: torch.Tensor,
    k: int,
    relax: Relaxation,
) -> Pass:
    """The bound of rows `a` on activation k for the relaxation `relax`, differentiable in
    its α and β, in a's dtype and device, without error terms (for optimising only)."""
    shapes = network.shapes
    coeff, const = a, a.new_zeros(a.shape[0])
    lambdas: dict[int, torch.Tensor] = {}
    pending: dict[int, torch.Tensor] = {}  # coefficients on earlier activations (Add)
    for j in range(k - 1, -1, -1):
        layer = network.layers[j]
        if j + 1 in pending:
            coeff = coeff + pending.pop(j + 1)
        if isinstance(layer, Add):
            side = coeff
            for step in reversed(layer.shortcut):
                side, c = back_linear(step, side, _input_shape(network, layer, step))
                const = const + c
            pending[layer.skip] = pending[layer.skip] + side if layer.skip in pending else side
        elif isinstance(layer, ReLU):
            lo = _rows(lower[j], shapes[j]).to(a)
            hi = _rows(upper[j], shapes[j]).to(a)
            lambdas[j] = coeff.flatten(1)
            unstable = (lo < 0) & (hi > 0)
            active = (lo >= 0).to(a.dtype)
            slope = hi / (hi - lo).clamp_min(1e-30)
            slope_up = torch.where(unstable, slope, active)
            alpha = relax.alpha.get(j)
            low = (hi > -lo).to(a.dtype) if alpha is None else alpha.view(coeff.shape)
            slope_low = torch.where(unstable, low, active)
            pos, neg = coeff.clamp_min(0), coeff.clamp_max(0)
            const = const + (neg * torch.where(unstable, -slope_up * lo, 0.0)).flatten(1).sum(1)
            coeff = pos * slope_low + neg * slope_up
            if j in relax.beta:
                phase = relax.phase[j].to(a.device)
                sign = phase.view(-1, coeff[0].numel()) if phase.dim() > 1 else phase[None]
                beta = relax.beta[j].view(coeff.shape[0], -1)
                coeff = (coeff.flatten(1) - beta * sign.to(a.dtype)).view(coeff.shape)
        elif isinstance(layer, MaxPool2d):
            coeff, c, _ = back_maxpool(layer, coeff, lower[j].to(a), upper[j].to(a))
            const = const + c
        else:
            coeff, c = back_linear(layer, coeff, shapes[j])
            const = const + c
    if 0 in pending:
        coeff = coeff + pending.pop(0)
    lo0, hi0 = _rows(lower[0], shapes[0]).to(a), _rows(upper[0], shapes[0]).to(a)
    value = (coeff.clamp_min(0) * lo0 + coeff.clamp_max(0) * hi0).flatten(1).sum(1) + const
    argmin = torch.where(coeff >= 0, lo0, hi0).detach()
    return Pass(value, lambdas, argmin, coeff.detach())


def _input_shape(network: Network, layer: Add, step: object) -> tuple[int, ...]:
    """The shape of the activation entering `step` of a residual shortcut."""
    z = torch.zeros((1, *network.shapes[layer.skip]))
    for s in layer.shortcut:
        if s is step:
            return tuple(z.shape[1:])
        z = apply_layer(s, z)
    raise ValueError("the step is not part of this shortcut")


def initial_alpha(
    network: Network, lower: list[torch.Tensor], upper: list[torch.Tensor], k: int, rows: int
) -> dict[int, torch.Tensor]:
    """CROWN's lower slopes (1 where u > −l, else 0), one copy per row."""
    out = {}
    for j in relu_layers(network, k):
        lo, hi = _rows(lower[j], network.shapes[j]), _rows(upper[j], network.shapes[j])
        start = (hi > -lo).flatten(1).to(torch.float64)
        out[j] = start.expand(rows, -1).clone() if start.shape[0] == 1 else start.clone()
    return out


def optimise(
    network: Network,
    lower: list[torch.Tensor],
    upper: list[torch.Tensor],
    a: torch.Tensor,
    k: int,
    relax: Relaxation,
    *,
    iterations: int,
    lr_alpha: float,
    lr_beta: float = 0.05,
    offset: torch.Tensor | None = None,
    deadline: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Relaxation, Pass]:
    """Adam ascent on Σ rows' bounds (plus `offset`) over α ∈ [0, 1] and β ≥ 0 of `relax`
    (β only for the layers it holds); returns the best relaxation per row and its pass."""
    rows, device = a.shape[0], a.device
    lower = [t.to(device, dtype) for t in lower]
    upper = [t.to(device, dtype) for t in upper]
    if not relax.alpha and not relax.beta:
        iterations = 0
    alpha = {j: t.to(device, dtype).clone().requires_grad_(True) for j, t in relax.alpha.items()}
    beta = {j: t.to(device, dtype).clone().requires_grad_(True) for j, t in relax.beta.items()}
    params = [{"params": list(alpha.values()), "lr": lr_alpha}]
    if beta:
        params.append({"params": list(beta.values()), "lr": lr_beta})
    opt = torch.optim.Adam(params) if iterations > 0 else None
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, LR_DECAY) if opt else None
    a_t = a.to(dtype)
    best_value = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
    best = Relaxation(
        {j: t.detach().clone() for j, t in alpha.items()},
        {j: t.detach().clone() for j, t in beta.items()},
        relax.phase,
    )
    best_pass: Pass | None = None
    for step in range(iterations + 1):
        current = Relaxation(alpha, beta, relax.phase)
        result = linear_pass(network, lower, upper, a_t, k, current)
        value = result.value.detach()
        better = value > best_value
        if bool(better.any()):
            best_value = torch.where(better, value, best_value)
            for j, t in alpha.items():
                best.alpha[j][better] = t.detach()[better]
            for j, t in beta.items():
                best.beta[j][better] = t.detach()[better]
            if best_pass is None:
                best_pass = Pass(value.clone(), dict(result.lambdas), result.argmin.clone())
            else:
                best_pass.value[better] = value[better]
                best_pass.argmin[better] = result.argmin[better]
                for j, lam in result.lambdas.items():
                    best_pass.lambdas[j] = torch.where(
                        better[:, None], lam.detach(), best_pass.lambdas[j]
                    )
        late = deadline is not None and time.perf_counter() >= deadline
        if step == iterations or late or opt is None or sched is None:
            break
        total = result.value if offset is None else result.value + offset.to(device, dtype)
        opt.zero_grad()
        (-total.sum()).backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for t in alpha.values():
                t.clamp_(0, 1)
            for t in beta.values():
                t.clamp_min_(0)
    assert best_pass is not None
    best_pass.lambdas = {j: lam.detach() for j, lam in best_pass.lambdas.items()}
    return best, best_pass


def optimised_rows(
    network: Network,
    lower: list[torch.Tensor],
    upper: list[torch.Tensor],
    a: torch.Tensor,
    k: int,
    *,
    iterations: int = ROOT_ITERATIONS,
    deadline: float | None = None,
) -> tuple[torch.Tensor, Relaxation]:
    """Rigorous lower bounds of rows `a` on activation k with alpha-CROWN slopes (never
    below CROWN's: its slopes are the start and the best per row is kept), and the slopes.
    With `deadline` passed, CROWN's bound and slopes (no optimisation, no second pass)."""
    crown = Relaxation(initial_alpha(network, lower, upper, k, a.shape[0]))
    base = back_substitute(network, lower, upper, a, k, crown)
    late = deadline is not None and time.perf_counter() >= deadline
    if not crown.alpha or iterations <= 0 or late:
        return base, crown
    relax, _ = optimise(
        network, lower, upper, a, k, crown,
        iterations=iterations, lr_alpha=ROOT_LR, deadline=deadline,
    )  # fmt: skip
    relax.alpha = {j: t.double() for j, t in relax.alpha.items()}
    tuned = back_substitute(network, lower, upper, a, k, relax)
    # the optimiser compares slopes in low precision: keep CROWN's where it is better
    worse = tuned < base
    for j, t in relax.alpha.items():
        t[worse] = crown.alpha[j][worse]
    return torch.maximum(base, tuned), relax


def tighten_layer(
    network: Network,
    lower: list[torch.Tensor],
    upper: list[torch.Tensor],
    i: int,
    *,
    iterations: int = ROOT_ITERATIONS,
    deadline: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha-CROWN bounds of the unstable neurons entering ReLU layer i (others unchanged);
    skipped where no unstable ReLU precedes them, the slopes would not fit the budget or
    `deadline` has passed (the optimiser also stops at it, keeping its best slopes)."""
    if deadline is not None and time.perf_counter() >= deadline:
        return lower[i], upper[i]
    lo, hi = lower[i].flatten().clone(), upper[i].flatten().clone()
    todo = ((lo < 0) & (hi > 0)).nonzero().flatten()
    before = relu_layers(network, i)
    width = sum(int(((lower[j] < 0) & (upper[j] > 0)).sum()) for j in before)
    total = sum(lower[j].numel() for j in before)
    if len(todo) == 0 or width == 0 or 2 * len(todo) * total > _BUDGET:
        return lower[i], upper[i]
    eye = torch.zeros(len(todo), lo.numel(), dtype=torch.float64)
    eye[torch.arange(len(todo)), todo] = 1.0
    a = torch.cat([eye, -eye]).view(-1, *lower[i].shape)
    low, _ = optimised_rows(network, lower, upper, a, i, iterations=iterations, deadline=deadline)
    m = len(todo)
    lo[todo] = torch.maximum(lo[todo], low[:m])
    hi[todo] = torch.minimum(hi[todo], -low[m:])
    return lo.view(lower[i].shape), hi.view(upper[i].shape)
