"""DeepGame's Monte-Carlo tree search on the feature game (Wu et al., TCS 2020), one image.

The tree alternates Player I nodes (choose a feature) and Player II nodes (choose a ±τ move
on one pixel of the chosen feature). Each iteration, as DeepGame's `CooperativeMCTS`:

1. selection: from the root, while the node is expanded, sample a child with probability
   ∝ `U(c) = (N_c / cost_c)·d + √2·sqrt(ln N_n / N_c)`;
2. expansion: all children of the leaf (every feature; or every legal atomic move of the
   feature whose application changes the model's confidence by more than 1e-6);
3. simulation: `playouts` random playouts per new child (batched, `FeatureGame.simulate`),
   adversarial ends scrutinized; the child's value is the smallest distance found, d if none;
4. backpropagation: `cost += value`, `N += 1` on the child and its ancestors.

The best (smallest-distance) adversarial set seen anywhere is the anytime answer.
Player behaviours: `cooperative` (both players minimise: an upper bound of the maximum safe
radius), `competitive` (Player I maximises — it prefers the features whose best attack is
the most distant — while Player II minimises; 1 playout per node as DeepGame) and `random`
(Player II picks its move by the feature's Gaussian instead of by U). Every variant returns
the smallest adversarial example its search met. Subtrees whose every leaf is terminal are
not selected again; the search stops when the tree is exhausted or a budget is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from bastion.attacks.feature_game import FeatureGame

Game = Literal["cooperative", "competitive", "random"]
EXPLORATION = math.sqrt(2)


@dataclass(eq=False)
class _Node:
    m: np.ndarray  # the manipulation set (HW counts)
    feature: int  # −1: Player I to move; k: Player II to move inside feature k
    parent: _Node | None = None
    weight: float = 1.0  # Player II's probability of the move that led here
    cost: float = 0.0
    visits: int = 0
    children: list[_Node] = field(default_factory=list)
    expanded: bool = False
    done: bool = False  # terminal, or every child done


@dataclass
class SearchResult:
    """The best adversarial manipulation set found (None if none) and its distance."""

    best: np.ndarray | None
    distance: float
    iterations: int


def tree_search(
    game: FeatureGame, rng: np.random.Generator, *, player: Game, playouts: int
) -> SearchResult:
    """Run MCTS until the tree is exhausted or the oracle's budget is spent."""
    root = _Node(np.zeros(game.size, dtype=np.int16), -1)
    best: np.ndarray | None = None
    best_dist = math.inf
    iterations = 0
    while not root.done and game.oracle.remaining() > 0:
        iterations += 1
        leaf = _select(root, game.budget, player, rng)
        children, adversarial = _expand(leaf, game)
        if not children:
            leaf.done = True
            _backprop(leaf, game.budget)
            continue
        starts = np.stack([c.m for c in children])
        first = np.array([c.feature for c in children])
        values, found, dist = game.simulate(starts, first, adversarial, playouts, rng)
        if len(dist) and dist.min() < best_dist:
            best_dist = float(dist.min())
            best = found[int(dist.argmin())]
        for child, value, adv in zip(children, values, adversarial, strict=True):
            child.done = bool(adv)
            _backprop(child, float(value))
    return SearchResult(best, best_dist, iterations)


def _select(root: _Node, budget: float, player: Game, rng: np.random.Generator) -> _Node:
    node = root
    while node.expanded:
        live = [c for c in node.children if not c.done]
        if player == "random" and node.feature >= 0:
            weights = np.array([c.weight for c in live])
        else:
            maximise = player == "competitive" and node.feature < 0
            weights = np.array([_uct(c, node.visits, budget, maximise) for c in live])
        node = live[int(rng.choice(len(live), p=weights / weights.sum()))]
    return node


def _uct(child: _Node, parent_visits: int, budget: float, maximise: bool) -> float:
    mean = child.cost / child.visits
    exploit = mean / budget if maximise else budget / max(mean, 1e-12)
    return exploit + EXPLORATION * math.sqrt(math.log(max(parent_visits, 1)) / child.visits)


def _expand(leaf: _Node, game: FeatureGame) -> tuple[list[_Node], np.ndarray]:
    """All children of `leaf` and which are adversarial (terminal)."""
    leaf.expanded = True
    if leaf.feature < 0:
        kids = [_Node(leaf.m, k, leaf) for k in range(game.feats.count)]
        leaf.children = kids
        return kids, np.zeros(len(kids), dtype=bool)
    pix, sign = game.moves(leaf.m, leaf.feature)
    sets = game.apply(leaf.m, pix, sign)
    useful, adversarial = game.useful(leaf.m, sets)
    weight = game.feats.player_two.ravel()[pix] / 2
    kids = [_Node(sets[i], -1, leaf, float(weight[i])) for i in np.flatnonzero(useful)]
    leaf.children = kids
    return kids, adversarial[useful]


def _backprop(node: _Node | None, value: float) -> None:
    while node is not None:
        node.cost += value
        node.visits += 1
        if node.expanded and node.children and all(c.done for c in node.children):
            node.done = True
        node = node.parent
