"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L∞ and L2.

A minimum-norm attack. Each iteration linearises the decision boundary at the current
point x — for FAB-T the boundary between the true class y and a target t, z_t − z_y = 0;
untargeted, the nearest of the K − 1 boundaries in the linearisation — projects both x
and the clean image x0 onto that hyperplane inside the pixel box (steps d and d0), and
moves to the box-clipped `(1 − α)(x + η·d) + α(x0 + η·d0)`, α = min(‖d‖/(‖d‖ + ‖d0‖),
α_max): the extrapolation that keeps the iterate near x0. Once the iterate is
misclassified it is recorded if it is the smallest so far and pulled back towards x0,
x ← x0 + β(x − x0). Defaults are the authors': 100 iterations, α_max 0.1, η 1.05,
β 0.9; FAB-T (the default here, as in AutoAttack) tries the 9 highest-scoring non-true
classes of the clean image in turn, one run each, on the samples not yet broken.

Given `eps`, FAB serves as AutoAttack uses it: a sample counts as broken only by an
adversarial example within eps (others are returned clean), and a sample stops once it
has one. Without `eps` it is a pure minimum-norm attack and returns the smallest
adversarial example it found. `final_search` binary-search steps on the segment from x0
to that example (FAB paper, Sec. 3; AutoAttack's FAB code has none: pass 0 to match it)
shrink the norm further.
"""

from __future__ import annotations

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
)
from bastion.attacks.boundary_projection import project_onto_hyperplane
from bastion.errors import ConfigError
from bastion.results import Norm

_RESTART_RADIUS = {"linf": 0.3, "l2": 1.0}  # the authors' default eps for random restarts


def _norm(t: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _boundary(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    norm: Norm,
    *,
    to_argmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(f, ∇f) of the boundary to cross at x — z_t − z_y towards the target, or the
    z_k − z_y (k ≠ y) nearest in the linearisation — and the backward passes spent.
    `to_argmax` (a caller's target, which must become the top class) puts in place of y
    the highest class other than the target at x."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        rows = torch.arange(len(x), device=x.device)
        if target is not None:
            if to_argmax:
                y = logits.detach().scatter(1, target[:, None], float("-inf")).argmax(1)
            f = logits[rows, target] - logits[rows, y]
            (g,) = torch.autograd.grad(f.sum(), xg)
            return f.detach(), g, 1
        k = logits.shape[1]
        grads = []
        for cls in range(k):
            (gc,) = torch.autograd.grad(logits[:, cls].sum(), xg, retain_graph=cls < k - 1)
            grads.append(gc)
    jac = torch.stack(grads, 1)  # N × K × input
    z = logits.detach()
    f_all = z - z[rows, y][:, None]
    g_all = jac - jac[rows, y][:, None]
    dual = g_all.flatten(2).abs().sum(2) if norm == "linf" else g_all.flatten(2).norm(dim=2)
    dist = f_all.abs() / (dual + 1e-12)
    dist[rows, y] = torch.inf
    nearest = dist.argmin(1)
    return f_all[rows, nearest], g_all[rows, nearest], k


class FAB(Attack):
    """FAB (default FAB-T: `targeted=True`, `n_target_classes=9`), L∞ or L2.

    `eps=None` gives a minimum-norm attack; a number makes it AutoAttack's success check
    at that budget. A caller's `target=` restricts it to that class (success = predicting
    it). Random restarts (after the first run of a target) start at half the restart
    radius (eps, or the authors' 0.3 L∞ / 1.0 L2), drawn per (seed, sample, run).
    """

    def __init__(
        self,
        eps: float | None = 8 / 255,
        *,
        norm: Norm = "linf",
        targeted: bool = True,
        n_target_classes: int = 9,
        n_iter: int = 100,
        n_restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        final_search: int = 3,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ConfigError(f"FAB supports norm 'linf' or 'l2', got {norm!r}")
        if n_iter < 1 or n_restarts < 1 or n_target_classes < 1 or final_search < 0:
            raise ConfigError(
                "n_iter, n_restarts and n_target_classes must be >= 1 and final_search "
                f">= 0, got {n_iter}, {n_restarts}, {n_target_classes}, {final_search}"
            )
        if not (0 <= alpha_max <= 1 and eta >= 1 and 0 < beta < 1):
            raise ConfigError(
                f"FAB needs 0 <= alpha_max <= 1, eta >= 1, 0 < beta < 1; got "
                f"{alpha_max}, {eta}, {beta}"
            )
        if eps is not None:
            check_eps(eps, norm)
        self.eps = eps
        self.norm: Norm = norm
        self.targeted = targeted
        self.n_target_classes = n_target_classes
        self.n_iter = n_iter
        self.n_restarts = n_restarts
        self.alpha_max = alpha_max
        self.eta = eta
        self.beta = beta
        self.final_search = final_search
        self.seed = seed
        self.bounds = bounds

    def _clean_pass(
        self, queries: Queries, x: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, _ = super()._clean_pass(queries, x, goal)
        return logits, logits  # FAB-T picks its targets from the clean logits

    def _runs(self, batch: Batch) -> list[tuple[torch.Tensor | None, int]]:
        """(target, restart) of each run, in order."""
        if batch.target is not None:
            targets: list[torch.Tensor | None] = [batch.target]
        elif not self.targeted:
            targets = [None]
        else:
            assert batch.reusable is not None
            ranked = batch.reusable.argsort(dim=1, descending=True, stable=True)
            n = min(self.n_target_classes, ranked.shape[1] - 1)
            targets = [ranked[:, r] for r in range(1, n + 1)]
        return [(t, r) for t in targets for r in range(self.n_restarts)]

    def _perturb(self, batch: Batch) -> Candidates:
        x = batch.x
        best = x.clone()
        size = torch.full((len(x),), torch.inf, dtype=torch.float64, device=x.device)
        fwd = torch.zeros(len(x), dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        runs = self._runs(batch)
        for run, (target, restart) in enumerate(runs):
            open_ = size > (self.eps if self.eps is not None else 1e300)
            todo = open_.nonzero().flatten()
            if not len(todo):
                break
            adv, found, f, b = self._run(batch, todo, target, restart, run)
            fwd[todo] += f
            bwd[todo] += b
            better = found < size[todo]
            best[todo[better]] = adv[better]
            size[todo[better]] = found[better]
            if batch.progress is not None:
                batch.progress(run + 1, len(runs))
        if self.final_search and bool(size.isfinite().any()):
            self._final_search(batch, best, size, fwd)
        if self.eps is not None:  # beyond the budget counts as no adversarial example
            best[size > self.eps] = x[size > self.eps]
        batch.queries.count(batch.rows, forward=fwd, backward=bwd)
        return Candidates(x_adv=best, iterations=fwd)

    def _run(
        self,
        batch: Batch,
        todo: torch.Tensor,
        target: torch.Tensor | None,
        restart: int,
        run: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One FAB run on `todo`: (smallest adversarial found, its norm or inf, passes)."""
        model = batch.queries.model
        x0, y = batch.x[todo], batch.y[todo]
        tgt = target[todo] if target is not None else None
        goal_t = batch.target[todo] if batch.target is not None else None
        n, lo, hi = len(x0), *self.bounds
        xi = x0.clone()
        if restart > 0:
            radius = self.eps if self.eps is not None else _RESTART_RADIUS[self.norm]
            shape = tuple(x0.shape[1:])
            if self.norm == "linf":
                t = 2 * rng.uniform(self.seed, batch.indices[todo], shape, stream=run).to(x0) - 1
            else:
                t = rng.normal(self.seed, batch.indices[todo], shape, stream=run).to(x0)
            scale = _norm(t, self.norm).clamp_min(1e-12).reshape(-1, *([1] * (x0.dim() - 1)))
            xi = (x0 + 0.5 * radius * t / scale).clamp(lo, hi)
        adv = x0.clone()
        found = torch.full((n,), torch.inf, dtype=torch.float64, device=x0.device)
        fwd = torch.zeros(n, dtype=torch.long, device=x0.device)
        bwd = torch.zeros_like(fwd)
        pos = torch.arange(n, device=x0.device)  # the samples still iterating
        flat0 = x0.flatten(1)
        shape1 = (-1, *([1] * (x0.dim() - 1)))
        budget = self.eps if self.eps is not None else -1.0
        for _ in range(self.n_iter):
            xs, ys = xi[pos], y[pos]
            f, g, backs = _boundary(
                model,
                xs,
                ys,
                tgt[pos] if tgt is not None else None,
                self.norm,
                to_argmax=goal_t is not None,
            )
            w = g.flatten(1)
            b = (w * xs.flatten(1)).sum(1) - f
            d = project_onto_hyperplane(
                torch.cat([xs.flatten(1), flat0[pos]]),
                torch.cat([w, w]),
                torch.cat([b, b]),
                self.norm,
                self.bounds,
            )
            d1, d0 = d[: len(pos)].reshape(xs.shape), d[len(pos) :].reshape(xs.shape)
            a1 = _norm(d1, self.norm).clamp_min(1e-8)
            a0 = _norm(d0, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a0)).clamp(0, self.alpha_max).reshape(shape1)
            moved = ((xs + self.eta * d1) * (1 - alpha) + (x0[pos] + self.eta * d0) * alpha).clamp(
                lo, hi
            )
            with torch.no_grad():
                pred = model(moved).argmax(1)
            fwd[pos] += 2
            bwd[pos] += backs
            hit = is_adversarial(pred, ys, goal_t[pos] if goal_t is not None else None)
            dist = _norm(moved - x0[pos], self.norm).double()
            smaller = hit & (dist < found[pos])
            adv[pos[smaller]] = moved[smaller]
            found[pos[smaller]] = dist[smaller]
            pull = hit.reshape(shape1)
            xi[pos] = torch.where(pull, x0[pos] + (moved - x0[pos]) * self.beta, moved)
            pos = pos[found[pos] > budget]  # at a budget: a sample stops once within it
            if not len(pos):
                break
        return adv, found, fwd, bwd

    def _final_search(
        self, batch: Batch, best: torch.Tensor, size: torch.Tensor, fwd: torch.Tensor
    ) -> None:
        """Bisect the segment from x0 to each found example for the smallest misclassified
        point on it (`final_search` forward passes), updating `best` and `size` in place."""
        idx = size.isfinite().nonzero().flatten()
        x0, delta = batch.x[idx], best[idx] - batch.x[idx]
        goal = batch.target[idx] if batch.target is not None else None
        lo_s = torch.zeros(len(idx), device=x0.device, dtype=x0.dtype)
        hi_s = torch.ones_like(lo_s)
        shape1 = (-1, *([1] * (x0.dim() - 1)))
        for _ in range(self.final_search):
            mid = (lo_s + hi_s) / 2
            with torch.no_grad():
                pred = batch.queries.model(x0 + delta * mid.reshape(shape1)).argmax(1)
            ok = is_adversarial(pred, batch.y[idx], goal)
            hi_s, lo_s = torch.where(ok, mid, hi_s), torch.where(ok, lo_s, mid)
        fwd[idx] += self.final_search
        moved = hi_s < 1  # elsewhere the found example stays as it is, bit for bit
        shrunk = x0[moved] + delta[moved] * hi_s[moved].reshape(shape1)
        best[idx[moved]] = shrunk
        size[idx[moved]] = _norm(shrunk - x0[moved], self.norm).double()
