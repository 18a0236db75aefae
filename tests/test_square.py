"""Square Attack: the authors' schedule and window patterns, black-box (outputs only), and
as strong as the authors' code; it breaks a model whose gradients are masked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import APGD, PGD, Square
from bastion.attacks.square import p_schedule
from bastion.attacks.square_windows import pattern, window_grid
from bastion.errors import ConfigError


class _Quantised(nn.Module):
    """The demo model behind input quantisation to 1/8: its input gradient is zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 8) / 8)


class _OutputsOnly(nn.Module):
    """Refuses any input that carries autograd: a true black box."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not x.requires_grad and not torch.is_grad_enabled(), "asked for a gradient"
        return self.net(x)


def test_p_halves_at_the_authors_iterations() -> None:
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 201: 0.1, 501: 0.05, 1001: 0.025}
    expected |= {2001: 0.0125, 4001: 0.00625, 6001: 0.003125, 8001: 0.0015625}
    for it, p in expected.items():
        assert p_schedule(it, 0.8, 5000) == pytest.approx(p)
    # rescaled to the budget (the authors' option): iteration 1 of 100 is 100 of 10,000
    assert p_schedule(1, 0.8, 100, rescale=True) == pytest.approx(0.2)


def test_l2_window_is_unit_norm_positive_over_negative_and_the_authors() -> None:
    for side in (1, 2, 3, 5, 6, 11):
        p = pattern(side)
        assert float(p.pow(2).sum()) == pytest.approx(1.0, abs=1e-6)
        assert bool((p[: side // 2] >= 0).all()) and bool((p[side // 2 :] < 0).all())
    sq = pytest.importorskip("pyautoattack.square")
    ref = sq.SquareAttack(None, norm="L2", eps=1.0, device="cpu")
    for side in (3, 5, 7, 11):
        theirs = ref.eta(side)  # randomly transposed
        assert min(float((theirs - pattern(side)).abs().max()),
                   float((theirs - pattern(side).T).abs().max())) < 1e-6  # fmt: skip
    assert window_grid(28, 28, 5) == [(1 + 5 * i, 1 + 5 * j) for i in range(5) for j in range(5)]


def test_square_breaks_a_gradient_masked_model_that_pgd_cannot(demo, digits) -> None:
    x, y = digits.x[:100], digits.y[:100]
    masked = _Quantised(demo)
    clean_errors = float((masked(x).argmax(1) != y).float().mean())
    pgd = PGD(0.15, steps=20)(masked, x, y).success_rate
    apgd = APGD(0.15, n_iter=20)(masked, x, y).success_rate
    square = Square(0.15, n_queries=300)(masked, x, y)
    assert max(pgd, apgd) <= clean_errors + 0.05  # the gradient attacks are blind here
    assert square.success_rate >= clean_errors + 0.25
    assert float(square.distances["linf"].max()) <= 0.15 + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 0.8)])
def test_square_uses_only_outputs_and_counts_its_queries(demo, digits, norm, eps) -> None:
    x, y = digits.x[:40], digits.y[:40]
    result = Square(eps, norm=norm, n_queries=50)(_OutputsOnly(demo), x, y)
    attacked = result.pred_clean == y
    assert result.success[attacked].any()
    assert int(result.gradients.sum()) == 0
    # the clean pass, the start, at most 50 iterations, the re-prediction
    assert bool((result.queries[attacked] <= 53).all())
    assert bool((result.queries[attacked & ~result.success] == 53).all())
    assert float(result.distances[norm].max()) <= eps * (1 + 1e-5)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_robust_accuracy_agrees_with_the_authors_code(demo, digits, norm, eps) -> None:
    """Square is random: ours against the mean of the authors' code over two seeds, within
    4 points on 120 images (their two seeds alone differ by up to ~3 points here)."""
    sq = pytest.importorskip("pyautoattack.square")
    x, y = digits.x[:120], digits.y[:120]
    ours = 1 - Square(eps, norm=norm, n_queries=150)(demo, x, y).success_rate
    theirs = []
    for seed in (0, 1):
        name = {"linf": "Linf", "l2": "L2"}[norm]
        ref = sq.SquareAttack(
            demo, norm=name, eps=eps, n_queries=150, seed=seed, resc_schedule=False, device="cpu"
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            theirs.append(float((demo(ref.perturb(x, y)).argmax(1) == y).float().mean()))
    assert abs(ours - sum(theirs) / 2) <= 0.04


def test_bad_configurations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="norm"):
        Square(0.1, norm="l1")
    with pytest.raises(ConfigError, match="p_init"):
        Square(0.1, p_init=0.0)
    with pytest.raises(ConfigError, match="n_queries"):
        Square(0.1, n_queries=0)
