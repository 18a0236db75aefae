"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, in L∞ and L2.

One run, per sample: a random start on the eps-sphere, step size η = 2·eps, then
`n_iter` momentum steps `z = P(x + η·dir(∇))`, `x' = P(x + 0.75·(z − x) + 0.25·(x − x_prev))`
(the first step without momentum). At checkpoints — after 0.22·n_iter iterations, then
windows 0.03·n_iter shorter each time, never below 0.06·n_iter — a sample's step is halved
and it restarts from its best (highest-loss) point if (1) its loss rose in at most
rho = 0.75 of the window's steps, or (2) its step was not halved at the previous checkpoint
and its best loss has not improved since. A sample stops at its first adversarial iterate.
Restarts run only on the samples still robust. `APGDT` is APGD on the targeted DLR loss
towards each of the top `n_target_classes` non-true classes in turn, as AutoAttack's APGD-T.

As in the authors' code, the start lies on the sphere (not inside the ball), the count of
rises in the first window compares the first step's loss with 0 (their loss history starts
at zero), and condition (1) fires at `rises ≤ rho·window`. Unlike their code, a broken
sample stops iterating (the same success, fewer passes), and so does a sample stuck at a
fixed point of the iteration — its iterate equal to the previous one and to its best point,
with an exactly zero gradient there (a saturated loss: defensive distillation leaves 478 of
500 MNIST points so at the start): a deterministic model would return the same loss and
gradient at every later step, so the result is the same with fewer passes. A randomised
model may not: pass `stop_when_stuck=False` (the harness does for `raw_isp:random`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

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
from bastion.attacks.gradient_descent import Loss, _ball, _direction, _flat_norm, _project
from bastion.attacks.losses import LOSSES
from bastion.errors import ConfigError, InvalidInputError
from bastion.results import Norm

LossName = Literal["ce", "dlr"]


def checkpoints(n_iter: int) -> dict[int, int]:
    """{iteration count after which APGD checks its step size: the window's length}: windows
    of max(⌊0.22·n⌋, 1), each ⌊0.03·n⌋ (≥ 1) shorter than the last, at least ⌊0.06·n⌋ (≥ 1)."""
    first, shrink, floor = (max(int(f * n_iter), 1) for f in (0.22, 0.03, 0.06))
    points, k, at = {}, first, first
    while at <= n_iter:
        points[at] = k
        k = max(k - shrink, floor)
        at += k
    return points


def _loss_and_grad(
    model: Model, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: Loss
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        value = loss(logits, y, target)
        (grad,) = torch.autograd.grad(value.sum(), xg)
    return logits.detach(), value.detach(), grad


def _start(
    x: torch.Tensor, eps: torch.Tensor, norm: Norm, seed: int, indices: torch.Tensor, stream: int
) -> torch.Tensor:
    """The authors' random start: a point on the eps-sphere of the norm (L∞: uniform noise
    scaled so its largest entry is eps; L2: a Gaussian direction of length eps)."""
    shape = tuple(x.shape[1:])
    if norm == "linf":
        t = 2 * rng.uniform(seed, indices, shape, stream=stream, dtype=x.dtype).to(x.device) - 1
        t = t / (t.flatten(1).abs().amax(1).reshape(-1, *([1] * len(shape))) + 1e-12)
    else:
        t = rng.normal(seed, indices, shape, stream=stream, dtype=x.dtype).to(x.device)
        t = t / (_flat_norm(t) + 1e-12)
    return x + eps * t


def apgd_run(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    eps: torch.Tensor,
    *,
    norm: Norm,
    loss: Loss,
    n_iter: int,
    rho: float,
    start: torch.Tensor,
    bounds: tuple[float, float],
    early_stop: bool = True,
    stop_when_stuck: bool = True,
    on_iteration: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from `start` on every sample of `x`: (the adversarial iterate found, or
    the best-loss point where none was; which samples were broken; passes per sample)."""
    n = len(x)
    lo, hi = _ball(x, eps, norm, bounds)
    xa = _project(start, (lo, hi), norm, bounds) if norm == "linf" else start.clamp(*bounds)
    logits, value, grad = _loss_and_grad(model, xa, y, target, loss)
    out = xa.clone()
    broken = is_adversarial(logits.argmax(1), y, target)
    passes = torch.ones(n, dtype=torch.long, device=x.device)
    s = {  # per-sample state, compacted as samples break
        "pos": torch.arange(n, device=x.device),
        "x": xa,
        "prev": xa,
        "grad": grad,
        "best_x": xa,
        "best_grad": grad,
        "best": value,
        "last": torch.zeros_like(value),  # the authors compare the first loss with 0
        "best_at_check": value,
        "reduced": torch.ones(n, dtype=torch.bool, device=x.device),
        "rises": torch.zeros(n, dtype=torch.long, device=x.device),
        "step": 2 * eps,
        "lo": lo,
        "hi": hi,
        "y": y,
    }
    if target is not None:
        s["target"] = target

    def drop(done: torch.Tensor) -> None:
        out[s["pos"][done]] = s["x"][done]
        keep = ~done
        for key, t in s.items():
            s[key] = t[keep]

    def stuck() -> torch.Tensor:
        """Samples at a fixed point: x = previous x = best x, gradient exactly zero."""
        if not stop_when_stuck:
            return torch.zeros(len(s["pos"]), dtype=torch.bool, device=x.device)
        same = (s["x"] == s["prev"]) & (s["x"] == s["best_x"]) & (s["grad"] == 0)
        return same.flatten(1).all(1)

    first = (broken if early_stop else torch.zeros_like(broken)) | stuck()
    if bool(first.any()):
        drop(first)
    windows = checkpoints(n_iter)
    for i in range(n_iter):
        if not len(s["pos"]):
            break
        a = 0.75 if i > 0 else 1.0
        ball = (s["lo"], s["hi"])
        xa = s["x"]
        z = _project(xa + s["step"] * _direction(s["grad"], norm), ball, norm, bounds)
        moved = _project(xa + a * (z - xa) + (1 - a) * (xa - s["prev"]), ball, norm, bounds)
        s["prev"] = xa
        tgt = s.get("target")
        logits, value, grad = _loss_and_grad(model, moved, s["y"], tgt, loss)
        passes[s["pos"]] += 1
        s["x"], s["grad"] = moved, grad
        hit = is_adversarial(logits.argmax(1), s["y"], tgt)
        broken[s["pos"][hit]] = True
        if not early_stop:
            out[s["pos"][hit]] = moved[hit]
        s["rises"] = s["rises"] + (value > s["last"]).long()
        s["last"] = value
        better = value > s["best"]
        s["best"] = torch.where(better, value, s["best"])
        b = better.reshape(-1, *([1] * (x.dim() - 1)))
        s["best_x"] = torch.where(b, moved, s["best_x"])
        s["best_grad"] = torch.where(b, grad, s["best_grad"])
        if i + 1 in windows:
            stalled = (s["rises"] <= windows[i + 1] * rho) | (
                ~s["reduced"] & (s["best_at_check"] >= s["best"])
            )
            s["reduced"], s["best_at_check"] = stalled, s["best"]
            s["rises"] = torch.zeros_like(s["rises"])
            st = stalled.reshape(-1, *([1] * (x.dim() - 1)))
            s["step"] = torch.where(st, s["step"] / 2, s["step"])
            s["x"] = torch.where(st, s["best_x"], s["x"])
            s["grad"] = torch.where(st, s["best_grad"], s["grad"])
        if on_iteration is not None:
            on_iteration()
        done = (hit if early_stop else torch.zeros_like(hit)) | stuck()
        if bool(done.any()):
            drop(done)
    robust = ~broken[s["pos"]]  # still robust: the best-loss point (the base returns x)
    out[s["pos"][robust]] = s["best_x"][robust]
    return out, broken, passes


def _loss_fn(loss: str | Loss) -> Loss:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ConfigError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


class APGD(Attack):
    """Auto-PGD on cross-entropy (`loss="ce"`, AutoAttack's APGD-CE) or DLR (`"dlr"`,
    APGD-DLR), untargeted or, given `target=`, targeted (−CE or targeted DLR towards it).

    Defaults are the authors': `n_iter=100`, `n_restarts=1`, `rho=0.75`, momentum 0.75,
    initial step 2·eps. Each restart starts from a fresh random point of the eps-sphere,
    drawn per sample from (seed, sample index, restart).
    """

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        loss: LossName | Loss = "ce",
        n_iter: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = True,
        stop_when_stuck: bool = True,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ConfigError(f"{type(self).__name__} supports norm 'linf' or 'l2', got {norm!r}")
        if n_iter < 1 or n_restarts < 1:
            raise ConfigError(f"n_iter and n_restarts must be >= 1, got {n_iter}, {n_restarts}")
        if not 0 < rho <= 1:
            raise ConfigError(f"rho must lie in (0, 1], got {rho}")
        check_eps(eps, norm)
        self.eps = eps
        self.norm: Norm = norm
        self.loss = loss
        self._loss = _loss_fn(loss)
        self.n_iter = n_iter
        self.n_restarts = n_restarts
        self.rho = rho
        self.early_stop = early_stop
        self.stop_when_stuck = stop_when_stuck
        self.seed = seed
        self.bounds = bounds

    def _clean_pass(
        self, queries: Queries, x: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, _ = super()._clean_pass(queries, x, goal)
        return logits, logits  # APGD-T picks its targets from the clean logits

    def _check_model(self, clean_logits: torch.Tensor) -> None:
        needed = 4 if self._loss is LOSSES["dlr-targeted"] else 3 if self.loss == "dlr" else 2
        if clean_logits.shape[1] < needed:
            raise ConfigError(
                f"{type(self).__name__} with loss {self.loss!r} needs at least {needed} "
                f"classes, the model has {clean_logits.shape[1]}; use loss='ce'"
            )

    def _runs(self, batch: Batch) -> list[tuple[torch.Tensor | None, Loss]]:
        """(target, loss) of each run in order; each run attacks the samples still robust."""
        return [(batch.target, self._loss)] * self.n_restarts

    def _perturb(self, batch: Batch) -> Candidates:
        x, n_call = batch.x, batch.queries.forward.shape[0]
        if isinstance(self.eps, torch.Tensor) and self.eps.dim() and self.eps.shape[0] != n_call:
            raise InvalidInputError(
                f"a per-sample eps needs one value per image: got "
                f"{self.eps.shape[0]} for {n_call} images"
            )
        eps = per_sample(self.eps, batch.rows, x)
        runs = self._runs(batch)
        out = x.clone()
        robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
        passes = torch.zeros(len(x), dtype=torch.long, device=x.device)
        done, total = 0, len(runs) * self.n_iter

        def tick() -> None:
            nonlocal done
            done += 1
            if batch.progress is not None:
                batch.progress(done, total)

        for stream, (target, loss) in enumerate(runs):
            todo = robust.nonzero().flatten()
            if not len(todo):
                break
            xs, idx = x[todo], batch.indices[todo]
            start = _start(xs, eps[todo], self.norm, self.seed, idx, stream)
            adv, hit, used = apgd_run(
                batch.queries.model,
                xs,
                batch.y[todo],
                target[todo] if target is not None else None,
                eps[todo],
                norm=self.norm,
                loss=loss,
                n_iter=self.n_iter,
                rho=self.rho,
                start=start,
                bounds=self.bounds,
                early_stop=self.early_stop,
                stop_when_stuck=self.stop_when_stuck,
                on_iteration=tick,
            )
            passes[todo] += used
            out[todo[hit]] = adv[hit]
            robust[todo[hit]] = False
            if stream == len(runs) - 1:
                out[todo[~hit]] = adv[~hit]
        batch.queries.count(batch.rows, forward=passes, backward=passes)
        return Candidates(x_adv=out, iterations=passes)


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, towards each of the `n_target_classes`
    highest-scoring non-true classes of the clean image in turn (`n_restarts` runs each),
    on the samples still robust. Success is misclassification, as in AutoAttack; given
    `target=`, only that class is tried and success is predicting it.
    """

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        n_target_classes: int = 9,
        n_iter: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        early_stop: bool = True,
        stop_when_stuck: bool = True,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if n_target_classes < 1:
            raise ConfigError(f"n_target_classes must be >= 1, got {n_target_classes}")
        super().__init__(
            eps,
            norm=norm,
            loss="dlr",
            n_iter=n_iter,
            n_restarts=n_restarts,
            rho=rho,
            early_stop=early_stop,
            stop_when_stuck=stop_when_stuck,
            seed=seed,
            bounds=bounds,
        )
        self.n_target_classes = n_target_classes
        self._loss = LOSSES["dlr-targeted"]

    def _runs(self, batch: Batch) -> list[tuple[torch.Tensor | None, Loss]]:
        if batch.target is not None:
            return [(batch.target, self._loss)] * self.n_restarts
        assert batch.reusable is not None  # the clean logits
        ranked = batch.reusable.argsort(dim=1, descending=True, stable=True)
        n_targets = min(self.n_target_classes, ranked.shape[1] - 1)
        # the i-th highest class other than the first (robust samples predict y first)
        return [
            (ranked[:, rank], self._loss)
            for rank in range(1, n_targets + 1)
            for _ in range(self.n_restarts)
        ]
