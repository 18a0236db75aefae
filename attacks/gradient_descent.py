"""The one gradient loop behind FGSM, BIM and PGD, in L∞ and L2.

Each step moves along the gradient of a loss on the logits (sign of it for L∞, its
direction for L2), then projects back onto the eps-ball around the clean image and the
pixel box. FGSM is one step of size eps from the clean image; BIM is several smaller steps;
PGD (Madry et al., ICLR 2018) adds a uniform random start inside the ball.

The loss is the cross-entropy unless the caller passes its own `Loss` (as Foolbox's
`get_loss_fn`): a callable `(logits, y, target) -> per-sample loss` that the loop ascends,
so other code can reuse the loop with another objective (DLR, a margin, a property's
violation) instead of writing its own sign-step loop.

`momentum` (default 0: none) accumulates the per-sample L1-normalised gradient,
g ← μ·g + ∇/‖∇‖₁, and steps along g (MI-FGSM, Dong et al., CVPR 2018). `ascend` runs the
loop alone on any differentiable function and per-sample reference, without the attack's
harness: DVERGE's feature distillation is this loop with a feature-distance loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from bastion import rng
from bastion.attacks.base import (
    Attack,
    Batch,
    Candidates,
    Model,
    Queries,
    check_eps,
    is_adversarial,
    per_sample,
)
from bastion.errors import ConfigError, InvalidInputError
from bastion.results import Norm

Loss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""`loss(logits, y, target) -> per-sample loss` (shape N) that an attack ascends; `target`
is None for an untargeted attack. A targeted loss must rise as the target gets closer."""


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def accumulate_momentum(g: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """Dong et al.'s momentum: `momentum·g + grad / ‖grad‖₁`, the L1 norm per sample."""
    l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12)
    return momentum * g + grad / l1.view(-1, *[1] * (grad.dim() - 1))


def _ball(
    x: torch.Tensor, eps: torch.Tensor, norm: Norm, bounds: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What projecting onto (eps-ball around x) ∩ box needs, per sample: for L∞ the lower
    and upper pixel limits (one clamp per step), for L2 the centre and the radius."""
    if norm == "linf":
        lo, hi = bounds
        return (x - eps).clamp_(min=lo), (x + eps).clamp_(max=hi)
    return x, eps


def _project(
    moved: torch.Tensor,
    ball: tuple[torch.Tensor, torch.Tensor],
    norm: Norm,
    bounds: tuple[float, float],
) -> torch.Tensor:
    """The point of the ball ∩ box nearest to `moved`. For L∞ that is clamping into
    [max(x − eps, lo), min(x + eps, hi)], so one FGSM step equals
    `clip(x + eps·sign(g), lo, hi)` to the last bit; for L2 the radial projection, then the box."""
    if norm == "linf":
        return torch.clamp(moved, *ball)
    x, eps = ball
    delta = moved - x
    return (x + delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)).clamp(*bounds)


def _loss_gradient(
    model: Model,
    x: torch.Tensor,
    goal: torch.Tensor,
    loss: Loss | None = None,
    y: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at x and a loss gradient, in one forward-backward pass. Without `loss`: the
    summed cross-entropy towards `goal` (the true class, to be raised; or the target, to be
    lowered: the caller steps against it). With `loss`: its sum, to be ascended."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        if loss is None:
            total = F.cross_entropy(logits, goal, reduction="sum")
        else:
            total = loss(logits, goal if y is None else y, target).sum()
        (grad,) = torch.autograd.grad(total, xg)
    return logits.detach(), grad


class GradientDescentAttack(Attack):
    """Projected gradient steps on a loss, by default the cross-entropy (the shared loop).

    `loss` (default None: cross-entropy, descended towards a target) is a `Loss` the loop
    ascends instead, for untargeted and targeted calls alike.
    `rel_stepsize` is the step as a fraction of eps; `abs_stepsize` overrides it. With
    `early_stop` a sample stops as soon as an iterate is adversarial, which saves its
    remaining gradient passes without changing whether the attack succeeds on it.
    `momentum` > 0 steps along the accumulated normalised gradient (see the module).
    """

    def __init__(
        self,
        *,
        eps: float | torch.Tensor,
        norm: Norm,
        steps: int,
        rel_stepsize: float,
        abs_stepsize: float | None = None,
        random_start: bool,
        early_stop: bool = True,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
        loss: Loss | None = None,
        momentum: float = 0.0,
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ConfigError(f"{type(self).__name__} supports norm 'linf' or 'l2', got {norm!r}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if momentum < 0:
            raise ConfigError(f"momentum must be >= 0, got {momentum}")
        check_eps(eps, norm)
        self.eps = eps
        self.norm: Norm = norm
        self.steps = steps
        self.rel_stepsize = rel_stepsize
        self.abs_stepsize = abs_stepsize
        self.random_start = random_start
        self.early_stop = early_stop
        self.seed = seed
        self.bounds = bounds
        self.loss = loss
        self.momentum = momentum

    def ascend(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loop alone: `self.steps` steps from `x` ascending `loss(model(·), y, None)`,
        projected onto the eps-ball around `x` and the bounds; returns the last iterate.

        `model` may be any differentiable function of the images (a feature extractor) and
        `y` any per-sample tensor the loss reads (reference features). No input checks, no
        change of the model's mode, no clean pass and no success check: the caller owns
        those. Needs a `loss` and `early_stop=False` (there are no classes to stop at)."""
        if self.loss is None or self.early_stop:
            raise ConfigError("ascend needs a loss and early_stop=False")
        n = len(x)
        rows = torch.arange(n, device=x.device)
        batch = Batch(Queries(model, n, x.device), x, y, None, rows, rows, None, None)
        return self._perturb(batch).x_adv

    def _random_start(
        self, x: torch.Tensor, eps: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        shape = tuple(x.shape[1:])
        if self.norm == "linf":
            u = rng.uniform(self.seed, indices, shape, dtype=x.dtype).to(x.device)
            return (2 * u - 1) * eps
        # uniform in the L2 ball: a normal direction, radius eps * u^(1/d)
        z = rng.normal(self.seed, indices, shape, dtype=x.dtype).to(x.device)
        r = rng.uniform(self.seed, indices, (1,), stream=7, dtype=torch.float64).to(x.device)
        radius = r.pow(1.0 / x[0].numel()).to(x.dtype).reshape(-1, *([1] * len(shape)))
        return z / _flat_norm(z).clamp_min(1e-12) * radius * eps

    def _clean_pass(
        self, queries: Queries, x: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.random_start:  # the first gradient is taken elsewhere than at x
            return super()._clean_pass(queries, x, goal)
        rows = torch.arange(len(x), device=x.device)
        # `goal` is the target when there is one; a custom loss is told which it is in
        # `_perturb`, so it gets no reusable gradient (one extra pass, same result)
        if self.loss is not None:
            return super()._clean_pass(queries, x, goal)
        logits, grad = _loss_gradient(lambda t: queries.logits(t, rows), x, goal)
        queries.count_backward(rows)
        return logits, grad

    def _perturb(self, batch: Batch) -> Candidates:
        x, n_call = batch.x, batch.queries.forward.shape[0]
        if isinstance(self.eps, torch.Tensor) and self.eps.dim() and self.eps.shape[0] != n_call:
            raise InvalidInputError(
                f"a per-sample eps needs one value per image: got "
                f"{self.eps.shape[0]} for {n_call} images"
            )
        eps = per_sample(self.eps, batch.rows, x)
        alpha = (
            torch.full_like(eps, self.abs_stepsize)
            if self.abs_stepsize is not None
            else eps * self.rel_stepsize
        )
        xa = x
        if self.random_start:
            xa = (x + self._random_start(x, eps, batch.indices)).clamp(*self.bounds)
        step = -alpha if batch.target is not None and self.loss is None else alpha
        model = batch.queries.model
        # the active samples' state, kept compact: samples that turn adversarial are written
        # out and dropped, and passes are counted in bulk when the active set changes
        passes = torch.zeros(len(x), dtype=torch.long, device=x.device)
        iterations = torch.zeros_like(passes)
        pos = torch.arange(len(x), device=x.device)
        x_adv: torch.Tensor | None = None  # the output, allocated when a sample stops early
        # the ball's limits, subset with the active samples; a first step of α ≤ ε from the
        # clean image cannot leave the ball, so FGSM and BIM skip it (only the box clamps)
        inside = xa is x and bool((alpha <= eps).all())
        b0, b1 = (x, eps) if inside else _ball(x, eps, self.norm, self.bounds)
        goal, y, target = batch.goal, batch.y, batch.target
        since_pass = since_step = 0
        g = torch.zeros_like(x) if self.momentum else None  # the momentum's accumulator
        for it in range(self.steps):
            if it == 0 and batch.reusable is not None:
                grad = batch.reusable  # taken at x by the clean pass, where none is adversarial
            else:
                logits, grad = _loss_gradient(model, xa, goal, self.loss, y, target)
                since_pass += 1
                done = is_adversarial(logits.argmax(1), y, target) if self.early_stop else None
                if done is not None and bool(done.any()):
                    passes[pos] += since_pass
                    iterations[pos] += since_step
                    since_pass = since_step = 0
                    if x_adv is None:
                        x_adv = torch.empty_like(x)
                    x_adv[pos[done]] = xa[done]
                    keep = ~done
                    pos, xa, b0, b1, step, goal, y, grad = (
                        t[keep] for t in (pos, xa, b0, b1, step, goal, y, grad)
                    )
                    target = target[keep] if target is not None else None
                    g = g[keep] if g is not None else None
                    if not len(pos):
                        break
            if g is not None:
                g = accumulate_momentum(g, grad, self.momentum)
            moved = torch.addcmul(xa, step, _direction(grad if g is None else g, self.norm))
            if inside:
                xa, inside = moved.clamp(*self.bounds), False
                if it + 1 < self.steps:
                    b0, b1 = _ball(b0, b1, self.norm, self.bounds)
            else:
                xa = _project(moved, (b0, b1), self.norm, self.bounds)
            since_step += 1
            if batch.progress is not None:
                batch.progress(it + 1, self.steps)
        if x_adv is None:
            x_adv = xa  # no sample stopped early: every row is still active, in order
        else:
            x_adv[pos] = xa
        passes[pos] += since_pass
        iterations[pos] += since_step
        batch.queries.count(batch.rows, forward=passes, backward=passes)
        return Candidates(x_adv=x_adv, iterations=iterations)
