"""The feature game, its MCTS and SafeCV's search, on the embedded demo CNN (digits, 8×8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bastion.attacks import FeatureGameMCTS, SafeCV
from bastion.attacks.black_box import BlackBoxQueries
from bastion.attacks.feature_game import FeatureGame, Oracle
from bastion.attacks.saliency import features
from bastion.errors import ConfigError, InvalidInputError


class Recorder(torch.nn.Module):
    """The model, remembering every image it is asked about."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def _game(model, x, y, *, tau=1.0, norm="l2", budget=10.0, max_queries=2000):  # type: ignore[no-untyped-def]
    oracle = Oracle(
        model, x, int(y), targeted=False, tau=tau, bounds=(0.0, 1.0),
        max_queries=max_queries, deadline=None,
    )  # fmt: skip
    return FeatureGame(oracle, features(x), norm=norm, budget=budget)


def test_moves_add_tau_and_clip_to_the_box(demo, digits) -> None:  # type: ignore[no-untyped-def]
    # regression for DeepGame's np.clip(x, max, min), which sends every touched pixel to the
    # image minimum whatever τ: here +τ and −τ move a pixel by τ, clipped to [0, 1]
    x = digits.x[0]
    game = _game(demo, x, digits.y[0], tau=0.25)
    flat = x.flatten()
    mid = int(((flat > 0.3) & (flat < 0.7)).nonzero()[0])
    m = np.zeros(game.size, dtype=np.int16)
    up, down = game.apply(m, np.array([mid, mid]), np.array([1, -1]))
    img = game.oracle.images(np.stack([up, down])).flatten(1)
    assert float(img[0, mid]) == pytest.approx(float(flat[mid]) + 0.25)
    assert float(img[1, mid]) == pytest.approx(float(flat[mid]) - 0.25)
    bright = int(flat.argmax())
    m[bright] = 3
    assert float(game.oracle.images(m[None]).flatten()[bright]) == 1.0


@pytest.mark.parametrize("norm,budget", [("l2", 1.5), ("l0", 3.0), ("l1", 2.0), ("linf", 0.6)])
def test_every_queried_state_is_in_bounds_and_budget(demo, digits, norm, budget) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x[:3], digits.y[:3]
    model = Recorder(demo)
    tau = 0.6 if norm == "linf" else 1.0
    attack = FeatureGameMCTS(norm=norm, max_distance=budget, tau=tau, max_queries=300)
    result = attack(model, x, y)
    seen = torch.cat(model.seen)
    assert float(seen.min()) >= 0.0 and float(seen.max()) <= 1.0
    # every image sent was some sample's manipulation within the budget
    diffs = torch.stack([(seen - xi).flatten(1) for xi in x])  # 3 × Q × D
    dist = {
        "l2": diffs.norm(dim=2),
        "l0": (diffs != 0).sum(2).double(),
        "l1": diffs.abs().sum(2),
        "linf": diffs.abs().amax(2),
    }[norm]
    assert bool((dist.amin(0) <= budget + 1e-5).all())
    assert bool((result.distances[norm][result.success] <= budget + 1e-5).all())


def test_scrutiny_never_increases_the_distance_and_keeps_the_label_changed(demo, digits) -> None:  # type: ignore[no-untyped-def]
    game = _game(demo, digits.x[1], digits.y[1])
    rng = np.random.default_rng(0)
    starts = np.zeros((12, game.size), dtype=np.int16)
    ends, _ = game._playouts(starts, np.full(12, -1), rng)
    assert len(ends) >= 6
    scrutinized = game.scrutinize(ends)
    before, after = game.distance(ends), game.distance(scrutinized)
    assert bool((after <= before + 1e-12).all()) and bool((after < before).any())
    _, adv = game.oracle.evaluate(scrutinized)
    assert adv.all()
    # nothing left can be removed: dropping any remaining manipulation restores the label
    for m in scrutinized[:3]:
        for p in np.flatnonzero(m):
            less = m.copy()
            less[p] = 0
            assert not game.oracle.evaluate(less[None])[1][0]


def random_search(model, x, y, budget: float, max_queries: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Baseline without features or tree: random walks of ±1 single-pixel saturations from
    the clean image, restarted when adversarial or over budget; the smallest L2 found."""
    gen = torch.Generator().manual_seed(seed)
    queries = BlackBoxQueries(model)
    best, cur = float("inf"), x.clone()
    while queries.count < max_queries:
        nxt = cur.clone()
        nxt.view(-1)[torch.randint(0, x.numel(), (1,), generator=gen)] = float(
            torch.randint(0, 2, (1,), generator=gen)
        )
        dist = float((nxt - x).norm())
        if dist > budget or torch.equal(nxt, cur):
            cur = x.clone()
            continue
        cur = nxt
        if int(queries.logits(cur[None]).argmax()) != int(y):
            best, cur = min(best, dist), x.clone()
    return best


def test_mcts_beats_random_search_with_the_same_queries(demo, digits) -> None:  # type: ignore[no-untyped-def]
    n, queries, budget = 12, 300, 10.0
    x, y = digits.x[:n], digits.y[:n]
    result = FeatureGameMCTS(max_distance=budget, max_queries=queries)(demo, x, y)
    # the attack's own count: clean pass + search + final check
    assert bool((result.queries <= queries + 2).all())
    mcts = torch.where(result.success, result.distances["l2"], torch.tensor(budget)).tolist()
    rand = [min(random_search(demo, x[i], y[i], budget, queries, i), budget) for i in range(n)]
    assert sum(result.success.tolist()) >= sum(r < budget for r in rand)
    assert np.mean(mcts) < np.mean(rand)
    assert sum(a < b for a, b in zip(mcts, rand, strict=True)) > n // 2


def test_mcts_l2_is_not_above_safecv_l2(demo, digits) -> None:  # type: ignore[no-untyped-def]
    # DeepGame's relative claim: its MCTS (L2) is below SafeCV's L0 search, measured in L2
    x, y = digits.x[:8], digits.y[:8]
    mcts = FeatureGameMCTS(max_queries=500)(demo, x, y)
    safecv = SafeCV(max_queries=500)(demo, x, y)
    both = mcts.success & safecv.success
    assert int(both.sum()) >= 6
    assert float(mcts.distances["l2"][both].mean()) <= float(safecv.distances["l2"][both].mean())


def test_safecv_finds_sparse_examples(demo, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x[:8], digits.y[:8]
    result = SafeCV()(demo, x, y)
    assert result.success_rate >= 0.75
    l0 = result.distances["l0"][result.success]
    assert float(l0.max()) <= 20 and float(l0.mean()) <= 10  # of 64 pixels
    assert SafeCV().mode == "safecv"


def test_safecv_has_no_distance_budget_unless_given_one(demo, digits) -> None:  # type: ignore[no-untyped-def]
    """SafeCV's paper has no distance budget: by default it finds every example, several
    beyond L2 1.5; with max_distance=1.5 every example stays within it and fewer succeed."""
    x, y = digits.x[:12], digits.y[:12]
    free = SafeCV()(demo, x, y)
    capped = SafeCV(max_distance=1.5)(demo, x, y)
    assert SafeCV().max_distance == math.inf and FeatureGameMCTS().max_distance == 10.0
    assert free.success_rate == 1.0
    assert int((free.distances["l2"] > 1.5).sum()) >= 3
    assert float(capped.distances["l2"][capped.success].max()) <= 1.5 + 1e-6
    assert capped.success_rate < free.success_rate
    with pytest.raises(ConfigError, match="finite for mode 'mcts'"):
        FeatureGameMCTS(max_distance=math.inf)


def test_deterministic_per_sample_and_inputs_untouched(demo, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x[:4].clone(), digits.y[:4].clone()
    keep = x.clone()
    for attack in (FeatureGameMCTS(max_queries=200, seed=3), SafeCV(max_queries=200, seed=3)):
        a = attack(demo, x, y)
        b = attack(demo, x, y)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        alone = attack(demo, x[2:3], y[2:3], indices=torch.tensor([2]))
        assert torch.equal(alone.x_adv[0], a.x_adv[2])
    assert torch.equal(x, keep)


def test_targeted_and_other_players(demo, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.x[:3], digits.y[:3]
    target = (y + 1) % 10
    result = FeatureGameMCTS(max_queries=400)(demo, x, y, target=target)
    assert bool((result.pred_adv[result.success] == target[result.success]).all())
    assert result.success.any()
    for player in ("random", "competitive"):
        r = FeatureGameMCTS(player=player, max_queries=300)(demo, x, y)
        assert r.success_rate > 0.5


def test_explain_gives_the_features(digits) -> None:  # type: ignore[no-untyped-def]
    feats = FeatureGameMCTS().explain(digits.x[:2])
    assert len(feats) == 2 and feats[0].saliency.shape == (8, 8)


def test_bad_configuration_and_input_are_refused(demo, digits) -> None:  # type: ignore[no-untyped-def]
    for kwargs in (
        {"mode": "dlv"},
        {"player": "greedy"},
        {"norm": "l3"},
        {"max_distance": 0},
        {"tau": -1},
        {"max_queries": None, "time_limit": None},
        {"max_queries": 0},
        {"playouts": 1.5},
        {"time_limit": -2},
        {"backtracking": -1},
    ):
        with pytest.raises(ConfigError):
            FeatureGameMCTS(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        FeatureGameMCTS()(demo, digits.x[:2] * 2, digits.y[:2])
    with pytest.raises(InvalidInputError):
        FeatureGameMCTS().explain(digits.x[0])


def test_registered_for_suites_and_cli(demo, digits) -> None:  # type: ignore[no-untyped-def]
    from bastion.suites.runner import run_suite
    from bastion.suites.suite import Check, Suite, attack_name

    assert attack_name("mcts") == "FeatureGameMCTS" and attack_name("safecv") == "SafeCV"
    suite = Suite(
        "bb",
        (
            Check("mcts", "FeatureGameMCTS", (1.0, 2.0), "l2", {"max_queries": 150}, n=4),
            Check("safecv", "SafeCV", (1.0, 2.0), "l2", {}, n=4),
        ),
    )
    report = run_suite(demo, digits.subset(4), suite, gallery=0, threats=["l2:2"])
    assert report.robust_accuracy("l2:2") < 1.0
    assert FeatureGameMCTS.paper().time_limit == 300
