"""SafeCV's search (Wicker et al., TACAS 2018, the released package), re-implemented on one image.

SafeCV minimises L0: it replaces pixels by the far extreme of the range (`max_manip`: 1 where
the pixel is below the middle, else 0; with τ ≥ hi − lo the game's ±τ move is exactly that
replacement) and counts manipulated pixels. Each simulation:

1. descends a tree whose nodes hold a probability vector p over keypoints (initially P_I)
   and visit counts, choosing keypoint i with probability ∝ `p_i + sqrt(ln N / n_i)`
   (renormalised; SafeCV's code has `log(n_i)/N`, which we do not port), and manipulating
   `visit_constant` new pixels sampled around the keypoint (`x ~ N(col, σ')`, `y ~ N(row, σ')`,
   `σ' = size + sigma_constant` in the enlarged SIFT image, rounded and clipped to the image);
2. at the first node not yet in the tree, adds it and runs a depth-first Monte-Carlo rollout
   (DFMCS): alternately exploit (keypoint ∼ q) and explore (∝ UCB of q) steps of
   `visit_constant` pixels; a step whose reward `r = F_c(start) − F_c(new)` is negative is
   reverted, and `q_i ← max(0, q_i + r/25)`, renormalised (q is kept across rollouts, as the
   package's shared array), until the image is adversarial; once a best severity s* exists,
   at most `s*/(1.5·visit_constant)` exploit/explore rounds;
3. backtracks an adversarial result: reverts manipulated pixels in clusters of
   `backtracking + 1`, keeping each revert that leaves the image adversarial;
4. backpropagates `p_k ← max(0, p_k + (F_c(α) − F_c(α_node))/level)` along the path.

The search stops after `simulations` new nodes, when as many simulations as there are
keypoints started from a path already as long as the best severity ("saturated"), or when
the oracle's budget is spent. Pixel draws try 5 times for a new, changeable pixel within
the game's distance budget — none by default (`SafeCV(max_distance=None)`: ∞, as the paper;
a number caps the search) — SafeCV retries the tree's draws 5 times and the rollout's forever.
"""

from __future__ import annotations

import math

import numpy as np

from bastion.attacks.feature_game import FeatureGame
from bastion.attacks.mcts import SearchResult

ATTEMPTS = 5
REWARD_SCALE = 25.0  # DFMCS's `reward / 25`


class _Search:
    def __init__(
        self,
        game: FeatureGame,
        rng: np.random.Generator,
        visit_constant: int,
        backtracking: int,
        sigma_constant: float,
        targeted: bool,
    ) -> None:
        self.game, self.rng = game, rng
        self.vc, self.bt = visit_constant, backtracking
        feats = game.feats
        self.sigma = feats.keypoints[:, 2] + sigma_constant / feats.scale
        self.h, self.w = feats.partition.shape
        mid = (game.lo + game.hi) / 2
        self.far = np.where(game.alpha.mean(0) < mid, 1, -1).astype(np.int16)
        # each pixel's distance share once replaced; 0 where the replacement changes nothing
        self.share = game.pixel_contributions(np.arange(game.size), self.far)
        self.sgn = -1.0 if targeted else 1.0
        (self.p_clean,), _ = game.oracle.evaluate(np.zeros((1, game.size), dtype=np.int16))
        self.q = feats.player_one.copy()  # DFMCS's keypoint distribution, shared by rollouts

    def reward(self, before: float, after: float) -> float:
        """Drop in the true-class probability (rise in the target's when targeted)."""
        return self.sgn * (before - after)

    def visit(self, m: np.ndarray, used: set[int], k: int) -> list[int]:
        """Manipulate up to visit_constant new pixels sampled around keypoint k (in place)."""
        game = self.game
        contrib = game.contributions(m[None])[0]
        draws = self.rng.normal(game.feats.keypoints[k, :2], self.sigma[k], (self.vc * ATTEMPTS, 2))
        cols = np.clip(np.rint(draws[:, 0]), 0, self.w - 1).astype(int)
        rows = np.clip(np.rint(draws[:, 1]), 0, self.h - 1).astype(int)
        added: list[int] = []
        slots = attempts = 0  # slots: pixels placed or given up after ATTEMPTS tries
        for p in (rows * self.w + cols).tolist():
            if slots == self.vc:
                break
            if p not in used and self.share[p] > 0 and game.fits(contrib, p, self.share[p]):
                m[p] = self.far[p]
                contrib[p] = self.share[p]
                used.add(p)
                added.append(p)
                slots, attempts = slots + 1, 0
            else:
                attempts += 1
                if attempts == ATTEMPTS:
                    slots, attempts = slots + 1, 0
        return added

    def rollout(self, m: np.ndarray, used: set[int], best: int | None) -> np.ndarray | None:
        """DFMCS from the state m: an adversarial set, or None (cut off or stuck)."""
        oracle, k_count = self.game.oracle, self.game.feats.count
        (start,), _ = oracle.evaluate(m[None])
        plays, total = np.ones(k_count), 1
        rounds = best // int(1.5 * self.vc) if best is not None else None
        step, idle = 0, 0
        while (rounds is None or step < 2 * rounds) and idle < k_count:
            if oracle.remaining() == 0:
                return None
            if step % 2 == 0:
                k = int(self.rng.choice(k_count, p=self.q))
            else:
                ucb = self.q + np.sqrt(math.log(total) / plays)
                k = int(self.rng.choice(k_count, p=ucb / ucb.sum()))
            step += 1
            added = self.visit(m, used, k)
            idle = 0 if added else idle + 1
            if not added:
                continue
            (score,), (adv,) = oracle.evaluate(m[None])
            if adv:
                return m
            r = self.reward(start, score)
            if r < 0:
                m[added] = 0
            self.q[k] = max(0.0, self.q[k] + r / REWARD_SCALE)
            total_q = self.q.sum()
            self.q = self.q / total_q if total_q > 0 else self.game.feats.player_one.copy()
            plays[k] += 1
            total += 1
        return None

    def backtrack(self, m: np.ndarray) -> np.ndarray:
        """Revert manipulated pixels in clusters of backtracking + 1, keeping the reverts
        that leave the image adversarial (in manipulation order: raster order here)."""
        m = m.copy()
        pixels = np.flatnonzero(m)
        size = self.bt + 1
        for start in range(0, len(pixels), size):
            if self.game.oracle.remaining() == 0:
                break
            cand = m.copy()
            cand[pixels[start : start + size]] = 0
            _, (adv,) = self.game.oracle.evaluate(cand[None])
            if adv:
                m = cand
        return m


def safecv_search(
    game: FeatureGame,
    rng: np.random.Generator,
    *,
    targeted: bool,
    visit_constant: int,
    simulations: int,
    backtracking: int,
    sigma_constant: float,
) -> SearchResult:
    """SafeCV's MCTS + DFMCS + backtracking; the best set minimises the pixel count (L0)."""
    s = _Search(game, rng, visit_constant, backtracking, sigma_constant, targeted)
    k_count, oracle = game.feats.count, game.oracle
    tree: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {
        (): (game.feats.player_one.copy(), np.ones(k_count))
    }
    best: np.ndarray | None = None
    best_l0: int | None = None
    sims = saturated = 0
    while sims < simulations and saturated < k_count and oracle.remaining() > 0:
        path: tuple[int, ...] = ()
        m = np.zeros(game.size, dtype=np.int16)
        used: set[int] = set()
        trail: list[tuple[tuple[int, ...], int]] = []
        while oracle.remaining() > 0:
            p, visits = tree[path]
            ucb = p + np.sqrt(math.log(visits.sum()) / visits)
            k = int(rng.choice(k_count, p=ucb / ucb.sum()))
            visits[k] += 1
            trail.append((path, k))
            path = (*path, k)
            s.visit(m, used, k)
            (score,), (adv,) = oracle.evaluate(m[None])
            new = path not in tree
            if not (adv or new):
                continue
            sims += 1
            if new:
                tree[path] = (game.feats.player_one.copy(), np.ones(k_count))
                prior = int(np.count_nonzero(m))
                if best_l0 is not None and prior >= best_l0:
                    saturated += 1
            found = m if adv else s.rollout(m.copy(), set(used), best_l0)
            if found is not None:
                found = s.backtrack(found)
                l0 = int(np.count_nonzero(found))
                if best_l0 is None or l0 < best_l0:
                    best, best_l0 = found, l0
            reward = s.reward(s.p_clean, score) / len(trail)
            for node, kk in trail:
                pv = tree[node][0]
                pv[kk] = max(0.0, pv[kk] + reward)
                pv[:] = pv / pv.sum() if pv.sum() > 0 else game.feats.player_one
            break
    dist = float(game.distance(best[None])[0]) if best is not None else math.inf
    return SearchResult(best, dist, sims)
