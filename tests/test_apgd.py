"""APGD and the gradient loop's loss hook: faithful to Croce & Hein (ICML 2020), stronger
than PGD with cross-entropy where the paper says it is, per-sample deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import APGD, APGDT, FAB, PGD, Square
from bastion.attacks.apgd import checkpoints
from bastion.attacks.losses import cross_entropy, dlr, margin
from bastion.errors import ConfigError


def test_the_loss_hook_with_cross_entropy_reproduces_the_default_bit_for_bit(demo, digits) -> None:
    x, y = digits.x[:96], digits.y[:96]
    default = PGD(0.15, steps=10, seed=3)(demo, x, y)
    hooked = PGD(0.15, steps=10, seed=3, loss=cross_entropy)(demo, x, y)
    assert torch.equal(default.x_adv, hooked.x_adv)
    assert torch.equal(default.success, hooked.success)
    target = (y + 3) % 10
    default = PGD(0.2, steps=10, seed=3)(demo, x, y, target=target)
    hooked = PGD(0.2, steps=10, seed=3, loss=cross_entropy)(demo, x, y, target=target)
    assert default.success.any() and torch.equal(default.x_adv, hooked.x_adv)


def test_the_loss_hook_ascends_the_given_loss(demo, digits) -> None:
    """Where the attack moved a sample, the loss it was given is higher than at the clean image."""
    x, y = digits.x[:96], digits.y[:96]
    for loss in (dlr, margin):
        clean = loss(demo(x), y, None)
        result = PGD(0.1, steps=10, early_stop=False, loss=loss)(demo, x, y)
        moved = result.success & (result.pred_clean == y)  # where the attack moved x
        assert moved.any()
        after = loss(demo(result.x_adv), y, None)
        assert bool((after[moved] > clean[moved]).all())


class _Scaled(nn.Module):
    """The demo model with its logits multiplied by a large factor: softmax saturates in
    float32, so cross-entropy's gradient vanishes (as after defensive distillation)."""

    def __init__(self, net: nn.Module, factor: float) -> None:
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.factor


def test_checkpoints_follow_the_authors_schedule() -> None:
    # windows 0.22·n, shrinking by 0.03·n, floor 0.06·n (Croce & Hein, Sec. 3.2)
    assert checkpoints(100) == {22: 22, 41: 19, 57: 16, 70: 13, 80: 10, 87: 7, 93: 6, 99: 6}
    assert list(checkpoints(10)) == list(range(2, 11))


def test_apgd_dlr_breaks_a_logit_scaled_model_where_pgd_with_ce_fails(demo, digits) -> None:
    x, y = digits.x[:150], digits.y[:150]
    scaled = _Scaled(demo, 1e4)
    pgd = PGD(0.1, steps=20)(scaled, x, y).success_rate
    apgd_ce = APGD(0.1, loss="ce", n_iter=20)(scaled, x, y).success_rate
    apgd_dlr = APGD(0.1, loss="dlr", n_iter=20)(scaled, x, y).success_rate
    unscaled = APGD(0.1, loss="dlr", n_iter=20)(demo, x, y).success_rate
    assert apgd_dlr > pgd + 0.25 and apgd_dlr > apgd_ce + 0.25
    # DLR is scale invariant: the scaled model is exactly as breakable as the original
    assert abs(apgd_dlr - unscaled) <= 2 / len(x)


def test_apgd_is_at_least_as_strong_as_pgd_20(demo, digits) -> None:
    x, y = digits.x[:200], digits.y[:200]
    pgd = PGD(0.1, steps=20, seed=0)(demo, x, y)
    apgd = APGD(0.1, n_iter=100)(demo, x, y)
    apgdt = APGDT(0.1, n_target_classes=3, n_iter=50)(demo, x, y)
    assert apgd.success_rate >= pgd.success_rate
    assert (apgd.success | apgdt.success).float().mean() > pgd.success_rate


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.6)])
def test_apgd_stays_in_the_ball_and_the_box(demo, digits, norm, eps) -> None:
    x, y = digits.x[:100], digits.y[:100]
    result = APGD(eps, norm=norm, loss="dlr", n_iter=20)(demo, x, y)
    assert result.success.any()
    assert float(result.distances[norm].max()) <= eps * (1 + 1e-5)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


def test_targeted_apgd_reaches_the_target(demo, digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    target = (y + 3) % 10
    for loss in ("ce", "dlr"):
        result = APGD(0.3, loss=loss, n_iter=30)(demo, x, y, target=target)
        assert result.success_rate > 0.9
        assert torch.equal(result.pred_adv[result.success], target[result.success])


def test_query_counts_are_those_of_the_passes_made(demo, digits) -> None:
    x, y = digits.x[:32], digits.y[:32]
    result = APGD(0.0, n_iter=7)(demo, x, y)  # eps 0: nothing breaks, every pass is made
    attacked = result.pred_clean == y
    # a clean pass, the start and 7 steps (forward+backward each), the re-prediction
    assert torch.equal(result.queries[attacked], torch.full((int(attacked.sum()),), 10))
    assert torch.equal(result.gradients[attacked], torch.full((int(attacked.sum()),), 8))


def test_bad_configurations_are_config_errors(demo, digits) -> None:
    with pytest.raises(ConfigError, match="norm"):
        APGD(0.1, norm="l1")
    with pytest.raises(ConfigError, match="loss"):
        APGD(0.1, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rho"):
        APGD(0.1, rho=0)
    with pytest.raises(ConfigError, match="classes"):
        APGDT(0.1)(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), digits.x[:4], digits.y[:4] % 3)


@pytest.mark.parametrize(
    "ours,loss,norm,eps",
    [
        ("apgd", "ce", "linf", 0.1),
        ("apgd", "dlr", "linf", 0.1),
        ("apgd", "ce", "l2", 0.5),
        ("apgdt", None, "linf", 0.1),
    ],
)
def test_robust_accuracy_agrees_with_the_authors_code(demo, digits, ours, loss, norm, eps) -> None:
    aa = pytest.importorskip("pyautoattack.autopgd_base")
    x, y = digits.x[:150], digits.y[:150]
    name = {"linf": "Linf", "l2": "L2"}[norm]
    if ours == "apgd":
        mine = APGD(eps, norm=norm, loss=loss)(demo, x, y)
        ref = aa.APGDAttack(demo, norm=name, eps=eps, loss=loss, seed=0, device="cpu")
    else:
        mine = APGDT(eps, norm=norm, n_target_classes=3)(demo, x, y)
        ref = aa.APGDAttack_targeted(
            demo, norm=name, eps=eps, n_target_classes=3, seed=0, device="cpu"
        )
    with torch.no_grad():
        ref_robust = int((demo(ref.perturb(x, y)).argmax(1) == y).sum())
    assert abs(int((~mine.success).sum()) - ref_robust) <= 2


# The attack contract, for every AutoAttack attack (APGD, APGD-T, FAB-T, Square)
CONTRACT = [
    pytest.param(lambda: APGD(0.1, n_iter=10, seed=3), id="apgd"),
    pytest.param(lambda: APGD(0.6, norm="l2", loss="dlr", n_iter=10, seed=3), id="apgd-l2"),
    pytest.param(lambda: APGDT(0.1, n_iter=10, n_target_classes=2, seed=3), id="apgdt"),
    pytest.param(lambda: FAB(0.1, n_iter=10, n_target_classes=2, n_restarts=2, seed=3), id="fab"),
    pytest.param(lambda: Square(0.1, n_queries=60, seed=3), id="square"),
    pytest.param(lambda: Square(0.6, norm="l2", n_queries=60, seed=3), id="square-l2"),
]


@pytest.mark.parametrize("make", CONTRACT)
def test_contract_success_is_a_reprediction_and_failures_return_the_clean_input(
    demo, digits, make
) -> None:
    x, y = digits.x[:48].clone(), digits.y[:48].clone()
    x0, y0 = x.clone(), y.clone()
    result = make()(demo, x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    with torch.no_grad():
        pred = demo(result.x_adv).argmax(1)
    assert torch.equal(result.success, pred != y) and result.success.any()
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@pytest.mark.parametrize("make", CONTRACT)
def test_contract_a_sample_alone_gets_what_it_gets_in_a_batch(demo, digits, make) -> None:
    x, y = digits.x[:24], digits.y[:24]
    attack = make()
    batch = attack(demo, x, y)
    again = attack(demo, x, y)
    assert torch.equal(batch.x_adv, again.x_adv)  # deterministic
    for i in (0, 11, 23):
        alone = attack(demo, x[i : i + 1], y[i : i + 1], indices=torch.tensor([i]))
        assert torch.allclose(alone.x_adv[0], batch.x_adv[i], atol=1e-6)
        assert bool(alone.success[0]) == bool(batch.success[i])


def test_early_stop_saves_passes_without_changing_success(demo, digits) -> None:
    x, y = digits.x[:100], digits.y[:100]
    stop = APGD(0.1, loss="dlr", n_iter=30)(demo, x, y)
    full = APGD(0.1, loss="dlr", n_iter=30, early_stop=False)(demo, x, y)
    assert torch.equal(stop.success, full.success) and stop.success.any()
    assert int(stop.gradients.sum()) < int(full.gradients.sum())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_sample_stuck_on_a_zero_gradient_stops_with_the_same_result(demo, digits, norm) -> None:
    """Logits ×1e4 saturate cross-entropy: most points have an exactly zero gradient, so
    every iterate would equal the start; stopping them changes no bit of the outcome."""
    x, y = digits.x[:120], digits.y[:120]
    scaled = _Scaled(demo, 1e4)
    eps = 0.1 if norm == "linf" else 1.0
    stop = APGD(eps, norm=norm, n_iter=40, n_restarts=2)(scaled, x, y)
    full = APGD(eps, norm=norm, n_iter=40, n_restarts=2, stop_when_stuck=False)(scaled, x, y)
    assert torch.equal(stop.x_adv, full.x_adv) and torch.equal(stop.success, full.success)
    assert int(stop.gradients.sum()) < int(full.gradients.sum()) / 4
    # a model whose gradient is never zero runs exactly as before
    plain = APGD(eps, norm=norm, n_iter=40)(demo, x, y)
    assert torch.equal(
        plain.gradients,
        APGD(eps, norm=norm, n_iter=40, stop_when_stuck=False)(demo, x, y).gradients,
    )


def test_behind_a_randomised_defense_the_harness_keeps_stuck_samples_iterating() -> None:
    from bastion.suites.suite import load_suite

    def params(defense: str) -> dict[str, dict[str, object]]:
        suite = load_suite("quick").with_defense(defense)
        return {c.id: c.params for c in suite.checks if c.attack in ("APGD", "APGDT")}

    assert all(p["stop_when_stuck"] is False for p in params("raw_isp:random").values())
    assert all("stop_when_stuck" not in p for p in params("raw_isp").values())
