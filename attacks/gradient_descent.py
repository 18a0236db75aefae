"""The one gradient loop behind FGSM, BIM and PGD, in L∞ and L2.

Each step moves along the gradient of the cross-entropy on the logits (sign of it for L∞,
its direction for L2), then projects back onto the eps-ball around the clean image and the
pixel box. FGSM is one step of size eps from the clean image; BIM is several smaller steps;
PGD (Madry et al., ICLR 2018) adds a uniform random start inside the ball.
"""

from __future__ import annotations

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


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def _project(moved: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The point of the eps-ball around x nearest to `moved` (L∞ clamps against x ± eps
    directly, so one FGSM step equals `x + eps·sign(g)` to the last bit)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(moved, x - eps), x + eps)
    delta = moved - x
    return x + delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _loss_gradient(
    model: Model, x: torch.Tensor, goal: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at x and the gradient of the summed cross-entropy towards `goal` (the true
    class, to be raised; or the target, to be lowered), in one forward-backward pass."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        loss = F.cross_entropy(logits, goal, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    return logits.detach(), grad


class GradientDescentAttack(Attack):
    """Projected gradient steps on the cross-entropy loss (the shared loop).

    `rel_stepsize` is the step as a fraction of eps; `abs_stepsize` overrides it. With
    `early_stop` a sample stops as soon as an iterate is adversarial, which saves its
    remaining gradient passes without changing whether the attack succeeds on it.
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
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ConfigError(f"{type(self).__name__} supports norm 'linf' or 'l2', got {norm!r}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
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
        lo, hi = self.bounds
        x_adv = x.clone()
        if self.random_start:
            x_adv = (x + self._random_start(x, eps, batch.indices)).clamp(lo, hi)
        sign = -1.0 if batch.target is not None else 1.0
        model = batch.queries.model
        # the active samples' state, kept compact: samples that turn adversarial are written
        # out and dropped, and passes are counted in bulk when the active set changes
        passes = torch.zeros(len(x), dtype=torch.long, device=x.device)
        iterations = torch.zeros_like(passes)
        pos = torch.arange(len(x), device=x.device)
        xa, x0, e, al, goal, y = x_adv[pos], x, eps, alpha, batch.goal, batch.y
        target = batch.target
        since_pass = since_step = 0
        for step in range(self.steps):
            if step == 0 and batch.reusable is not None:
                grad = batch.reusable  # taken at x by the clean pass, where none is adversarial
            else:
                logits, grad = _loss_gradient(model, xa, goal)
                since_pass += 1
                done = is_adversarial(logits.argmax(1), y, target) if self.early_stop else None
                if done is not None and bool(done.any()):
                    passes[pos] += since_pass
                    iterations[pos] += since_step
                    since_pass = since_step = 0
                    x_adv[pos[done]] = xa[done]
                    keep = ~done
                    pos, xa, x0, e, al, goal, y, grad = (
                        t[keep] for t in (pos, xa, x0, e, al, goal, y, grad)
                    )
                    target = target[keep] if target is not None else None
                    if not len(pos):
                        break
            xa = _project(xa + sign * al * _direction(grad, self.norm), x0, e, self.norm)
            xa = xa.clamp(lo, hi)
            since_step += 1
            if batch.progress is not None:
                batch.progress(step + 1, self.steps)
        x_adv[pos] = xa
        passes[pos] += since_pass
        iterations[pos] += since_step
        batch.queries.count(batch.rows, forward=passes, backward=passes)
        return Candidates(x_adv=x_adv, iterations=iterations)
