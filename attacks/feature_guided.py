"""Feature-guided black-box attacks: DeepGame's MCTS on the SIFT feature game, and SafeCV.

Wicker, Huang & Kwiatkowska, "Feature-Guided Black-Box Safety Testing of Deep Neural
Networks" (TACAS 2018; the SafeCV package) and Wu, Wicker, Ruan, Huang & Kwiatkowska, "A
Game-Based Approximate Verification of Deep Neural Networks with Provable Guarantees"
(DeepGame, TCS 2020). Only `model(x)` is read; every image sent is counted.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from bastion.attacks.base import Attack, Batch, Candidates, Queries
from bastion.attacks.feature_game import FeatureGame, Norm, Oracle
from bastion.attacks.mcts import Game, tree_search
from bastion.attacks.safecv import safecv_search
from bastion.attacks.saliency import Features, features
from bastion.errors import ConfigError
from bastion.results import NORMS
from bastion.validation import check_images

MODES = ("mcts", "safecv")
PLAYERS = ("cooperative", "competitive", "random")


class FeatureGameMCTS(Attack):
    """SIFT-guided two-player game searched by MCTS (DeepGame), or SafeCV's search.

    `mode="mcts"` (DeepGame's cooperative MCTS): Player I picks a SIFT feature, Player II a
    ±`tau` change of one pixel in it (all channels); UCT with √2, all children expanded,
    `playouts` random playouts per new node (default 3; 1 for `player="competitive"`),
    scrutiny of every adversarial playout, anytime best. Every state stays in the bounds and
    within `max_distance` in `norm` (default L2 10 with τ = 1, DeepGame's README example).
    `mode="safecv"`: SafeCV's L0 search (value replacement by the far extreme,
    `visit_constant` pixels per move, `simulations` new nodes, backtracking in clusters of
    `backtracking + 1`; defaults from the package's MNIST example: 6, 100, 10). SafeCV has
    no distance budget: `max_distance` defaults to none (∞) there; a number caps its search.

    Budgets, per image: `max_queries` images sent (default 2,000, and `time_limit` None: a
    few seconds per image on a small CNN, so `bastion attack mcts --n 10` on the demo model
    takes well under a minute; results then depend only on (seed, sample index)) and
    `time_limit` seconds (`FeatureGameMCTS.paper()`: DeepGame's 300 s and no query cap; a
    search cut by the clock is not reproducible). The search stops early when its tree is
    exhausted. `sift_scale` enlarges images before SIFT (default ×15 below 50 px).
    `explain(x)` gives each image's keypoints, saliency map and partition.
    """

    def __init__(
        self,
        *,
        mode: str = "mcts",
        player: str = "cooperative",
        norm: str = "l2",
        max_distance: float | None = None,
        tau: float = 1.0,
        playouts: int | None = None,
        max_queries: int | None = 2000,
        time_limit: float | None = None,
        visit_constant: int = 6,
        simulations: int = 100,
        backtracking: int = 10,
        sigma_constant: float = 15.0,
        sift_scale: int | None = None,
        seed: int = 0,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        _choice("mode", mode, MODES)
        _choice("player", player, PLAYERS)
        _choice("norm", norm, NORMS)
        if max_distance is None:
            max_distance = math.inf if mode == "safecv" else 10.0
        if not max_distance > 0 or (mode != "safecv" and max_distance == math.inf):
            raise ConfigError("max_distance must be a number > 0, finite for mode 'mcts'")
        if not (0 < tau < math.inf):
            raise ConfigError("tau must be a finite number > 0")
        if max_queries is None and time_limit is None:
            raise ConfigError("give max_queries or time_limit (or both): the search needs a budget")
        for name, value in (
            ("playouts", playouts if playouts is not None else 1),
            ("max_queries", max_queries if max_queries is not None else 1),
            ("visit_constant", visit_constant),
            ("simulations", simulations),
            ("sift_scale", sift_scale if sift_scale is not None else 1),
        ):
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value}")
        if time_limit is not None and not time_limit > 0:
            raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit}")
        if backtracking < 0 or sigma_constant < 0:
            raise ConfigError("backtracking and sigma_constant must be >= 0")
        self.mode = mode
        self.player: Game = player  # type: ignore[assignment]
        self.norm: Norm = norm  # type: ignore[assignment]
        self.max_distance = float(max_distance)
        self.tau = float(tau)
        self.playouts = playouts if playouts is not None else (1 if player == "competitive" else 3)
        self.max_queries = max_queries
        self.time_limit = time_limit
        self.visit_constant = visit_constant
        self.simulations = simulations
        self.backtracking = backtracking
        self.sigma_constant = sigma_constant
        self.sift_scale = sift_scale
        self.seed = seed
        self.bounds = bounds

    @classmethod
    def paper(cls, **kwargs: Any) -> FeatureGameMCTS:
        """DeepGame's budget: 300 s per image, no query cap."""
        params: dict[str, Any] = {"time_limit": 300.0, "max_queries": None, **kwargs}
        return cls(**params)

    def explain(self, x: torch.Tensor) -> list[Features]:
        """The SIFT features (keypoints, saliency map, partition) of each image of `x`."""
        check_images(x, self.bounds)
        return [features(img, self.sift_scale) for img in x]

    def _clean_pass(
        self, queries: Queries, x: torch.Tensor, goal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, _ = super()._clean_pass(queries, x, goal)
        return logits, logits  # the search starts from the clean probabilities, not a query

    def _perturb(self, batch: Batch) -> Candidates:
        x, n = batch.x, len(batch.x)
        x_adv = x.clone()
        forward = torch.zeros(n, dtype=torch.long, device=x.device)
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        targeted = batch.target is not None
        for j in range(n):
            deadline = time.perf_counter() + self.time_limit if self.time_limit else None
            oracle = Oracle(
                batch.queries.model,
                x[j],
                int(batch.goal[j]),
                targeted=targeted,
                tau=self.tau,
                bounds=self.bounds,
                max_queries=self.max_queries,
                deadline=deadline,
            )
            game = FeatureGame(
                oracle, features(x[j], self.sift_scale), norm=self.norm, budget=self.max_distance
            )
            if batch.reusable is not None:
                clean = batch.reusable[j].float().softmax(0).cpu()
                oracle.remember(np.zeros(game.size, dtype=np.int16), clean)
            rng = np.random.default_rng([self.seed, int(batch.indices[j])])
            if self.mode == "mcts":
                found = tree_search(game, rng, player=self.player, playouts=self.playouts)
            else:
                found = safecv_search(
                    game,
                    rng,
                    targeted=targeted,
                    visit_constant=self.visit_constant,
                    simulations=self.simulations,
                    backtracking=self.backtracking,
                    sigma_constant=self.sigma_constant,
                )
            if found.best is not None:
                x_adv[j] = oracle.images(found.best[None])[0]
            forward[j] = oracle.count
            iterations[j] = found.iterations
            if batch.progress is not None:
                batch.progress(j + 1, n)
        batch.queries.count(batch.rows, forward=forward, backward=torch.zeros_like(forward))
        return Candidates(x_adv=x_adv, iterations=iterations)


class SafeCV(FeatureGameMCTS):
    """`FeatureGameMCTS(mode="safecv")`: SafeCV's L0 search, under its own name for suites."""

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("mode", "safecv")
        super().__init__(seed=seed, **kwargs)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
