"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), L∞ and L2.

A score-based black-box attack: it reads only the model's outputs (no gradients) and
keeps a random square-shaped update of the current perturbation whenever it lowers the
margin loss z_y − max_{i≠y} z_i (targeted: the cross-entropy towards the target), until
the margin is ≤ 0 or `n_queries` iterations are spent. The square's side is
√(p·pixels), with p = `p_init` halved at iteration 10, 50, 200, 500, 1000, 2000, 4000,
6000 and 8000 (the authors' schedule; AutoAttack does not rescale it to `n_queries`).

L∞ starts from vertical stripes of ±eps and sets a square of every channel to x ± eps.
L2 starts from a grid of the authors' "window" patterns (nested rectangles of weights
1/(k+1)², a positive and a negative half) and moves the perturbation's mass from a second
square into the first, keeping the total L2 norm at eps.

Deviation from the authors' code, for per-sample determinism: each sample draws its own
square position (and L2 window orientation) from (seed, sample index, iteration), where
their code draws one position per iteration for the whole batch. Each iteration is
still a uniform draw of the same distribution per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bastion import rng
from bastion.attacks.base import Attack, Batch, Candidates, check_eps, per_sample
from bastion.attacks.gradient_descent import _flat_norm
from bastion.attacks.square_windows import placed_window, square_mask, window, window_grid
from bastion.errors import ConfigError, InvalidInputError
from bastion.results import Norm

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_BLOCK = 128  # iterations whose random numbers are drawn in one call


def p_schedule(iteration: int, p_init: float, n_queries: int, rescale: bool = False) -> float:
    """The fraction of pixels the square covers at `iteration` (0-based)."""
    it = int(iteration / n_queries * 10000) if rescale else iteration
    return p_init / 2 ** sum(it > point for point in _SCHEDULE)


def _margin_and_loss(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, loss), both to be lowered; the margin is ≤ 0 once the goal is reached."""
    goal = target if target is not None else y
    mine = logits.gather(1, goal.reshape(-1, 1)).squeeze(1)
    other = logits.scatter(1, goal.reshape(-1, 1), float("-inf")).amax(1)
    if target is None:
        return mine - other, mine - other
    return other - mine, F.cross_entropy(logits, target, reduction="none")


class Square(Attack):
    """Square Attack under an L∞ or L2 budget `eps`, `n_queries` iterations (one forward
    pass each, plus one for the start) per restart, `p_init` the initial square fraction.

    Defaults are AutoAttack's: `n_queries=5000`, `p_init=0.8`, one restart, margin loss.
    """

    def __init__(
        self,
        eps: float | torch.Tensor = 8 / 255,
        *,
        norm: Norm = "linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        n_restarts: int = 1,
        rescale_schedule: bool = False,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ConfigError(f"Square supports norm 'linf' or 'l2', got {norm!r}")
        if n_queries < 1 or n_restarts < 1:
            raise ConfigError(
                f"n_queries and n_restarts must be >= 1, got {n_queries}, {n_restarts}"
            )
        if not 0 < p_init <= 1:
            raise ConfigError(f"p_init must lie in (0, 1], got {p_init}")
        check_eps(eps, norm)
        self.eps = eps
        self.norm: Norm = norm
        self.n_queries = n_queries
        self.p_init = p_init
        self.n_restarts = n_restarts
        self.rescale_schedule = rescale_schedule
        self.seed = seed
        self.bounds = bounds

    def _perturb(self, batch: Batch) -> Candidates:
        x, n_call = batch.x, batch.queries.forward.shape[0]
        if x.dim() != 4:
            raise InvalidInputError(f"Square needs images N×C×H×W, got shape {tuple(x.shape)}")
        if isinstance(self.eps, torch.Tensor) and self.eps.dim() and self.eps.shape[0] != n_call:
            raise InvalidInputError(
                f"a per-sample eps needs one value per image: got "
                f"{self.eps.shape[0]} for {n_call} images"
            )
        eps = per_sample(self.eps, batch.rows, x)
        out = x.clone()
        robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
        passes = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for restart in range(self.n_restarts):
            todo = robust.nonzero().flatten()
            if not len(todo):
                break
            adv, hit, used = self._run(batch, todo, eps[todo], restart)
            passes[todo] += used
            out[todo] = adv
            robust[todo[hit]] = False
        batch.queries.count(batch.rows, forward=passes, backward=torch.zeros_like(passes))
        return Candidates(x_adv=out, iterations=passes)

    def _draw(
        self, idx: torch.Tensor, block: int, restart: int, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Uniforms for the samples `idx`: block 0 is the start, block b ≥ 1 holds the
        draws of iterations (b − 1)·_BLOCK … b·_BLOCK − 1 (one row per iteration)."""
        stream = restart * (self.n_queries // _BLOCK + 2) + block
        return rng.uniform(self.seed, idx, shape, stream=stream, dtype=torch.float64)

    def _signs(self, u: torch.Tensor) -> torch.Tensor:
        return torch.where(u < 0.5, -1.0, 1.0)

    def _run(
        self, batch: Batch, todo: torch.Tensor, eps: torch.Tensor, restart: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One restart on the samples `todo`: (best images, broken, forward passes)."""
        model, dev = batch.queries.model, batch.x.device
        x, y, idx = batch.x[todo], batch.y[todo], batch.indices[todo]
        target = batch.target[todo] if batch.target is not None else None
        n, c, h, w = x.shape
        lo, hi = self.bounds
        if self.norm == "linf":
            u = self._draw(idx, 0, restart, (c * w,)).to(dev)
            stripes = self._signs(u).to(x.dtype).reshape(n, c, 1, w)
            best = (x + eps * stripes).clamp(lo, hi)
        else:
            s0 = max(h // 5, 1)
            tiles = window_grid(h, w, s0)
            u = self._draw(idx, 0, restart, ((c + 1) * len(tiles),)).to(dev)
            delta = torch.zeros_like(x)
            for t, (top, left) in enumerate(tiles):
                sign = self._signs(u[:, t * (c + 1) : t * (c + 1) + c]).to(x.dtype)
                pattern = window(s0, u[:, t * (c + 1) + c] < 0.5, dtype=x.dtype)
                hh, ww = min(s0, h - top), min(s0, w - left)
                delta[:, :, top : top + hh, left : left + ww] += (
                    pattern[:, None, :hh, :ww] * sign[:, :, None, None]
                )
            best = (x + delta / (_flat_norm(delta) + 1e-12) * eps).clamp(lo, hi)
        with torch.no_grad():
            margin, loss = _margin_and_loss(model(best), y, target)
        passes = torch.ones(n, dtype=torch.long, device=dev)
        pixels = c * h * w
        k = 2 + c if self.norm == "linf" else 5 + c  # uniforms per sample and iteration
        # The samples still above the margin, kept compact (their images, budget, box and
        # state) and written back only as they break: no gather or scatter of whole
        # images per iteration. `low`/`high` are the ball within the box.
        pos = (margin > 0).nonzero().flatten()
        xs, bs, ea, ms, ls = x[pos], best[pos], eps[pos], margin[pos], loss[pos]
        ys, ts = y[pos], target[pos] if target is not None else None
        low, high = (xs - ea).clamp(lo, hi), (xs + ea).clamp(lo, hi)
        for it in range(self.n_queries):
            if not len(pos):
                break
            if it % _BLOCK == 0:  # draws for a block of iterations at once, for every sample
                drawn = self._draw(idx, it // _BLOCK + 1, restart, (_BLOCK, k)).to(dev)
            u = drawn[pos, it % _BLOCK]
            p = p_schedule(it, self.p_init, self.n_queries, self.rescale_schedule)
            side = max(int(round(math.sqrt(p * pixels / c))), 1)
            if self.norm == "linf":
                side = min(side, h, w)
                mask = square_mask(u[:, 0], u[:, 1], side, h, w).to(x.dtype)
                sign = self._signs(u[:, 2:]).to(x.dtype)[:, :, None, None]
                # clipping to the ball, then to the box, is clipping to their intersection;
                # in place, as allocating whole batches of images costs more than the math
                cand = mask * (2 * ea * sign)
                cand.add_(bs)
                torch.maximum(cand, low, out=cand)
                torch.minimum(cand, high, out=cand)
            else:
                side = max(side, 3)
                side = min(side + (side % 2 == 0), h, w)
                cand = self._l2_step(xs, bs, ea, u, side, c)
            with torch.no_grad():
                m_new, l_new = _margin_and_loss(model(cand), ys, ts)
            passes[pos] += 1
            improved = l_new < ls
            ls = torch.where(improved, l_new, ls)
            accept = improved | (m_new <= 0)
            ms = torch.where(accept, m_new, ms)
            bs[accept] = cand[accept]
            done = ms <= 0
            if bool(done.any()):
                best[pos[done]], margin[pos[done]] = bs[done], ms[done]
                keep = ~done
                pos, xs, bs, ea, ms, ls, ys = (t[keep] for t in (pos, xs, bs, ea, ms, ls, ys))
                low, high = low[keep], high[keep]
                ts = ts[keep] if ts is not None else None
        best[pos] = bs
        return best, margin <= 0, passes

    def _l2_step(
        self,
        x: torch.Tensor,
        best: torch.Tensor,
        eps: torch.Tensor,
        u: torch.Tensor,
        side: int,
        c: int,
    ) -> torch.Tensor:
        """Move the perturbation's mass from square 2 into square 1 (with a fresh window
        pattern), keeping the total L2 norm at eps."""
        h, w = x.shape[2:]
        lo, hi = self.bounds
        delta = best - x
        m1 = square_mask(u[:, 0], u[:, 1], side, h, w).to(x.dtype)
        m2 = square_mask(u[:, 2], u[:, 3], side, h, w).to(x.dtype)
        norm_image = _flat_norm(delta)
        in1 = delta * m1
        norm_w1 = in1.pow(2).sum((2, 3), keepdim=True).sqrt()
        norm_both = (delta * torch.maximum(m1, m2)).pow(2).sum((2, 3), keepdim=True).sqrt()
        sign = self._signs(u[:, 5:]).to(x.dtype)[:, :, None, None]
        fresh = placed_window(u[:, 0], u[:, 1], side, h, w, u[:, 4] < 0.5, dtype=x.dtype)
        new = fresh * sign + in1 / (norm_w1 + 1e-12)
        room = ((eps**2 - norm_image**2).clamp_min(0) / c + norm_both**2).sqrt()
        new = new / (new.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12) * room
        delta = delta * (1 - torch.maximum(m1, m2)) + new * m1
        return (x + delta / (_flat_norm(delta) + 1e-12) * eps).clamp(lo, hi)
