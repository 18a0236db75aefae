"""The two-player feature game of DeepGame (Wu et al., TCS 2020) on one image, black-box.

A state is a manipulation set M: an integer count per pixel, the image being
`α_M = clip(α + τ·M, lo, hi)` on every channel of the pixel. Player I picks a feature k (see
`bastion.attacks.saliency`), Player II an atomic manipulation `±τ` on one pixel of k. A move
is legal when it changes the image and keeps `‖α_M − α‖_k ≤ d`, so every state of the game
lies in the box and in the budget (clip is `clip(x, lo, hi)`: DeepGame's swapped bounds, which
send every touched pixel to the image minimum, are not reproduced). A state is terminal when
`α_M` is adversarial, or when no legal move is left (value d).

`FeatureGame` gives what the tree search needs: the legal moves inside a feature, batched
random playouts (an expansion's playouts advance in waves of WAVE, one forward pass per
step) and `scrutinize`, DeepGame's greedy removal of unnecessary manipulations, batched
across the playouts' results. `Oracle` wraps `BlackBoxQueries` with a cache keyed by the
manipulation set, a query budget and a deadline.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Literal

import numpy as np
import torch

from bastion.attacks.base import Model
from bastion.attacks.black_box import BlackBoxQueries
from bastion.attacks.saliency import Features

Norm = Literal["l0", "l1", "l2", "linf"]
USEFUL = 1e-6  # DeepGame's `usefulAction` threshold (its code's `10 ^ -6` is XOR, i.e. -16)
DRAWS = 12  # draws a random player makes to find a legal move (DeepGame)
WAVE = 16  # playouts advancing together (one forward pass of up to WAVE images per step)


class Oracle:
    """Counted, cached, budgeted queries about one image's manipulated versions.

    `evaluate(M)` returns, per manipulation set, the goal-class probability and whether the
    image is adversarial; known sets come from the cache, the rest go to the model in one
    batch. `remaining()` is how many images may still be sent (0 once the deadline passed).
    """

    def __init__(
        self,
        model: Model,
        x: torch.Tensor,
        goal: int,
        *,
        targeted: bool,
        tau: float,
        bounds: tuple[float, float],
        max_queries: int | None,
        deadline: float | None,
    ) -> None:
        self.queries = BlackBoxQueries(model)
        self.x = x
        self.goal = goal
        self.targeted = targeted
        self.tau = tau
        self.bounds = bounds
        self.max_queries = max_queries
        self.deadline = deadline
        self.cache: dict[bytes, tuple[float, bool]] = {}

    @property
    def count(self) -> int:
        return self.queries.count

    def remaining(self) -> int:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return 0
        if self.max_queries is None:
            return 1 << 62
        return max(self.max_queries - self.queries.count, 0)

    def images(self, m: np.ndarray) -> torch.Tensor:
        """The images α_M (P×C×H×W) of manipulation sets `m` (P×HW)."""
        shape = (len(m), 1, *self.x.shape[1:])
        delta = torch.as_tensor(m, device=self.x.device).to(self.x.dtype).reshape(shape)
        return (self.x.unsqueeze(0) + self.tau * delta).clamp(*self.bounds)

    def remember(self, m: np.ndarray, probs: torch.Tensor) -> None:
        """Put already-known probabilities (the clean pass) into the cache."""
        self.cache[_key(m)] = self._verdict(probs)

    def _verdict(self, p: torch.Tensor) -> tuple[float, bool]:
        pred = int(p.argmax())
        adv = pred == self.goal if self.targeted else pred != self.goal
        return float(p[self.goal]), adv

    def evaluate(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Goal-class probabilities and adversarial flags of the sets `m` (P×HW)."""
        keys = [_key(row) for row in m]
        new = sorted({k: i for i, k in enumerate(keys) if k not in self.cache}.values())
        if new:
            probs = self.queries.probabilities(self.images(m[new])).cpu()
            for i, p in zip(new, probs, strict=True):
                self.cache[keys[i]] = self._verdict(p)
        out = [self.cache[k] for k in keys]
        return np.array([o[0] for o in out]), np.array([o[1] for o in out], dtype=bool)


def _key(m: np.ndarray) -> bytes:
    """The cache key of a manipulation set: a 128-bit digest, not the set itself, so that
    long searches on large images keep a small cache."""
    return hashlib.blake2b(m.tobytes(), digest_size=16).digest()


class FeatureGame:
    """The game on one image: its features, its distance and its moves."""

    def __init__(
        self,
        oracle: Oracle,
        feats: Features,
        *,
        norm: Norm,
        budget: float,
    ) -> None:
        self.oracle = oracle
        self.feats = feats
        self.norm = norm
        self.budget = budget
        self.alpha = oracle.x.detach().double().cpu().flatten(1).numpy()  # C×HW
        self.tau = oracle.tau
        self.lo, self.hi = oracle.bounds
        self.size = self.alpha.shape[1]
        part = feats.partition.ravel()
        # pixels grouped by feature; `cum` holds k + the within-feature cumulative
        # probability, so a draw u ∈ [0, 1) in feature k is searchsorted(cum, k + u)
        self.order = np.argsort(part, kind="stable")
        prob = feats.player_two.ravel()[self.order]
        grouped = part[self.order]
        cum = np.zeros(len(prob))
        for k in range(feats.count):
            seg = grouped == k
            cum[seg] = k + np.cumsum(prob[seg])
            cum[np.flatnonzero(seg)[-1]] = k + 1.0
        self.cum = cum
        self.ends = np.cumsum(np.bincount(grouped, minlength=feats.count))

    # ----- distance -------------------------------------------------------------------------
    def _changes(self, pix: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Changes α_M − α (…×C) of pixels `pix` under counts `m` (same shape)."""
        base = self.alpha[:, pix]  # C×…
        return np.moveaxis(np.clip(base + self.tau * m[None], self.lo, self.hi) - base, 0, -1)

    def _contrib(self, diff: np.ndarray) -> np.ndarray:
        """Per-pixel share of the distance, from the channel differences (…×C)."""
        a = np.abs(diff)
        if self.norm == "l0":
            return (a > 0).sum(-1).astype(np.float64)
        if self.norm == "l1":
            return a.sum(-1)
        if self.norm == "l2":
            return (a**2).sum(-1)
        return a.max(-1)

    def _total(self, contrib: np.ndarray) -> np.ndarray:
        if self.norm == "linf":
            return contrib.max(-1) if contrib.shape[-1] else np.zeros(contrib.shape[:-1])
        s = contrib.sum(-1)
        return np.sqrt(s) if self.norm == "l2" else s

    def pixel_contributions(self, pix: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Distance shares of pixels `pix` when they carry the counts `counts`."""
        return self._contrib(self._changes(pix, counts))

    def contributions(self, m: np.ndarray) -> np.ndarray:
        """Per-pixel distance shares (P×HW) of the sets `m` (P×HW)."""
        pix = np.broadcast_to(np.arange(self.size), m.shape)
        return self._contrib(self._changes(pix, m))

    def distance(self, m: np.ndarray) -> np.ndarray:
        """‖α_M − α‖ in the game's norm (pixels on the [lo, hi] scale) for sets `m` (P×HW)."""
        return self._total(self.contributions(m))

    def fits(self, contrib: np.ndarray, pix: int, share: float) -> bool:
        """Whether the set with per-pixel shares `contrib` (HW) stays in budget when pixel
        `pix` takes the share `share`."""
        if self.norm == "linf":
            rest = np.delete(contrib, pix)
            total = max(float(rest.max()) if len(rest) else 0.0, share)
        else:
            total = float(contrib.sum() - contrib[pix] + share)
            total = math.sqrt(max(total, 0.0)) if self.norm == "l2" else total
        return total <= self.budget + 1e-9

    def legal(
        self, m: np.ndarray, contrib: np.ndarray, pix: np.ndarray, sign: np.ndarray
    ) -> np.ndarray:
        """Which moves (pixel `pix`, direction `sign`; Q×D) are legal from the sets `m` (Q×HW,
        with per-pixel distance shares `contrib`): they change the image and stay in budget."""
        rows = np.arange(len(m))[:, None]
        old = m[rows, pix]
        before, after = self._changes(pix, old), self._changes(pix, old + sign)
        changes = (np.abs(after - before) > 0).any(-1)
        newc = self._contrib(after)
        if self.norm == "linf":
            c = np.repeat(contrib[:, None, :], pix.shape[1], axis=1)
            np.put_along_axis(c, pix[..., None], newc[..., None], axis=2)
            dist = c.max(-1)
        else:
            s = contrib.sum(1, keepdims=True) - contrib[rows, pix] + newc
            dist = np.sqrt(np.maximum(s, 0)) if self.norm == "l2" else s
        return changes & (dist <= self.budget + 1e-9)

    # ----- moves ---------------------------------------------------------------------------
    def moves(self, m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Player II's legal atomic moves in feature k from the set `m` (HW): pixels, signs."""
        pix = self.feats.pixels(k)
        pix2, sign = np.repeat(pix, 2), np.tile(np.array([1, -1]), len(pix))
        ok = self.legal(m[None], self.contributions(m[None]), pix2[None], sign[None])[0]
        return pix2[ok], sign[ok]

    def apply(self, m: np.ndarray, pix: np.ndarray, sign: np.ndarray) -> np.ndarray:
        """Copies of the set `m` (HW) each with one move applied (P×HW)."""
        out = np.repeat(m[None], len(pix), axis=0)
        out[np.arange(len(pix)), pix] += sign
        return out

    def _draw(self, rng: np.random.Generator, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DRAWS random (feature, pixel, sign) moves per row: Player I by P_I unless the row's
        feature is fixed (`first` ≥ 0), Player II by the feature's Gaussian, sign ± evenly."""
        q = len(first)
        k = rng.choice(self.feats.count, size=(q, DRAWS), p=self.feats.player_one)
        k = np.where(first[:, None] >= 0, first[:, None], k)
        idx = np.searchsorted(self.cum, k + rng.random((q, DRAWS)), side="right")
        idx = np.minimum(idx, self.ends[k] - 1)
        sign = np.where(rng.random((q, DRAWS)) < 0.5, 1, -1)
        return self.order[idx], sign

    # ----- playouts and scrutiny -------------------------------------------------------------
    def simulate(
        self,
        starts: np.ndarray,
        first: np.ndarray,
        adversarial: np.ndarray,
        repeats: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values of the new nodes `starts` (S×HW; `first` their fixed feature or −1, flags
        whether already adversarial): the minimum over `repeats` random playouts of the
        scrutinized adversarial distance, d where a playout ends without one. Also returns
        every scrutinized adversarial set found and its distance (for the best result)."""
        todo = np.repeat(np.flatnonzero(~adversarial), repeats)
        ends, owner = self._playouts(starts[todo], first[todo], rng)
        owner = np.concatenate([np.flatnonzero(adversarial), todo[owner]])
        found = np.concatenate([starts[adversarial], ends])
        found = self.scrutinize(found)
        dist = self.distance(found)
        values = np.full(len(starts), self.budget)
        np.minimum.at(values, owner, dist)
        return values, found, dist

    def _playouts(
        self, m: np.ndarray, first: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random playouts from the sets `m`, up to WAVE at a time advancing one round (Player
        I then Player II) per step, one batched query per step; a finished playout makes room
        for the next. Returns the adversarial end states and the row each came from;
        playouts with no legal move, or cut by the query budget, end without one."""
        m = m.copy()
        contrib = self.contributions(m)
        active = np.zeros(0, dtype=np.int64)
        started = 0
        found, owner = [], []
        while (started < len(m) or len(active)) and self.oracle.remaining() > 0:
            take = min(WAVE - len(active), len(m) - started)
            active = np.concatenate([active, np.arange(started, started + take)])
            started += take
            pix, sign = self._draw(rng, first[active])
            ok = self.legal(m[active], contrib[active], pix, sign)
            has = ok.any(1)
            pick = ok.argmax(1)[has]
            active, pix, sign = active[has], pix[has, pick], sign[has, pick]
            active, pix, sign = (a[: self.oracle.remaining()] for a in (active, pix, sign))
            m[active, pix] += sign
            contrib[active, pix] = self.pixel_contributions(pix, m[active, pix])
            first[active] = -1
            _, adv = self.oracle.evaluate(m[active])
            found.append(m[active[adv]])
            owner.append(active[adv])
            active = active[~adv]
        if not found:
            return np.zeros((0, self.size), dtype=m.dtype), np.zeros(0, dtype=np.int64)
        return np.concatenate(found), np.concatenate(owner)

    def scrutinize(self, m: np.ndarray) -> np.ndarray:
        """DeepGame's `scrutinizePath` for adversarial sets `m` (P×HW), in lockstep: try
        removing each manipulated pixel in turn (raster order), keep a removal when the image
        stays adversarial, repeat until a pass removes nothing. Never increases a distance;
        stops early (keeping what it has) when the query budget runs out."""
        m = m.copy()
        live = np.arange(len(m))
        while len(live):
            pixels = [np.flatnonzero(m[i]) for i in live]
            dropped = np.zeros(len(live), dtype=bool)
            for step in range(max((len(p) for p in pixels), default=0)):
                rows = np.array([j for j, p in enumerate(pixels) if len(p) > step], dtype=int)
                rows = rows[: self.oracle.remaining()]
                if not len(rows):
                    return m
                pix = np.array([pixels[j][step] for j in rows])
                cand = m[live[rows]].copy()
                cand[np.arange(len(rows)), pix] = 0
                _, adv = self.oracle.evaluate(cand)
                m[live[rows[adv]]] = cand[adv]
                dropped[rows[adv]] = True
            live = live[dropped]
        return m

    def useful(self, parent: np.ndarray, children: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DeepGame's `usefulAction` for child sets (P×HW) of `parent` (HW): the model's
        goal-class confidence moves by more than 1e-6. Also the children's adversarial flags.
        Queries only what the budget allows; the rest count as not useful."""
        n = min(len(children), self.oracle.remaining())
        (p0,), _ = self.oracle.evaluate(parent[None])
        score, adv = self.oracle.evaluate(children[:n])
        useful = np.zeros(len(children), dtype=bool)
        useful[:n] = np.abs(score - p0) > USEFUL
        flags = np.zeros(len(children), dtype=bool)
        flags[:n] = adv
        return useful, flags
