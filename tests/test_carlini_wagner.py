"""Carlini–Wagner L2: the minimal distortion on a model with a closed-form answer, the
confidence margin at the solution, and per-sample behaviour independent of the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import FGSM, CarliniWagnerL2
from bastion.errors import ModelOutputError


def _linear_problem(
    n: int = 16, d: int = 64
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A two-class linear model and points whose nearest boundary point lies inside the box:
    the minimal L2 perturbation is |margin| / ‖w₁ − w₀‖ exactly."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, d, generator=gen))
        model.bias.zero_()
    x = 0.35 + 0.3 * torch.rand(n, d, generator=gen)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = (model.weight[1] - model.weight[0]).detach()
    distance = (z[:, 1] - z[:, 0]).abs() / w.norm()
    step = (z[:, 1] - z[:, 0]).reshape(-1, 1) / w.norm() ** 2 * w
    nearest = x - step  # the nearest point on the boundary
    assert float(nearest.min()) > 0 and float(nearest.max()) < 1
    net = nn.Sequential(nn.Flatten(), model)
    return net, x.reshape(n, 1, 8, 8), y, distance.detach()


def test_cw_finds_the_closed_form_minimum_on_a_linear_model() -> None:
    model, x, y, minimum = _linear_problem()
    result = CarliniWagnerL2(max_iterations=1000)(model, x, y)
    assert result.success.all()
    l2 = result.distances["l2"].float()
    assert bool((l2 >= minimum * (1 - 1e-3)).all())  # never below the true minimum
    assert bool((l2 <= minimum * 1.05).all()), (l2 / minimum).max()


def test_cw_margin_at_the_solution_is_the_confidence() -> None:
    model, x, y, _ = _linear_problem(n=8)
    kappa = 2.0
    result = CarliniWagnerL2(max_iterations=1000, confidence=kappa)(model, x, y)
    assert result.success.all()
    with torch.no_grad():
        z = model(result.x_adv)
    other = z.gather(1, (1 - y).reshape(-1, 1)).flatten()
    real = z.gather(1, y.reshape(-1, 1)).flatten()
    margin = other - real
    assert bool((margin >= kappa - 1e-4).all())
    assert bool((margin <= kappa * 1.05).all()), margin


def test_cw_beats_fgsm_distortion_on_the_demo_model(demo, digits) -> None:
    x, y = digits.x[:20], digits.y[:20]
    cw = CarliniWagnerL2(binary_search_steps=5, max_iterations=300)(demo, x, y)
    fgsm = FGSM(0.2)(demo, x, y)
    assert cw.success_rate == 1.0
    both = cw.success & fgsm.success & (cw.pred_clean == y)
    assert both.sum() > 8
    assert float(cw.distances["l2"][both].mean()) < 0.6 * float(fgsm.distances["l2"][both].mean())


def test_targeted_cw_reaches_the_target(demo, digits) -> None:
    x, y = digits.x[:16], digits.y[:16]
    target = (y + 5) % 10
    result = CarliniWagnerL2(binary_search_steps=5, max_iterations=300)(demo, x, y, target=target)
    assert result.success.all()
    assert torch.equal(result.pred_adv, target)


def test_cw_sample_alone_equals_sample_in_a_batch(demo, digits) -> None:
    x, y = digits.x[:24], digits.y[:24]
    attack = CarliniWagnerL2(binary_search_steps=3, max_iterations=200)
    batch = attack(demo, x, y)
    for i in (0, 11, 23):
        alone = attack(demo, x[i : i + 1], y[i : i + 1], indices=torch.tensor([i]))
        assert bool(alone.success[0]) == bool(batch.success[i])
        assert float(alone.distances["l2"][0]) == pytest.approx(
            float(batch.distances["l2"][i]), rel=1e-3, abs=1e-5
        )
        assert int(alone.iterations[0]) == int(batch.iterations[i])


def test_cw_abort_early_saves_work_without_losing_successes(demo, digits) -> None:
    x, y = digits.x[:16], digits.y[:16]
    full = CarliniWagnerL2(binary_search_steps=3, max_iterations=300, abort_early=False)(demo, x, y)
    early = CarliniWagnerL2(binary_search_steps=3, max_iterations=300)(demo, x, y)
    assert early.success_rate == full.success_rate
    assert int(early.gradients.sum()) < int(full.gradients.sum())


def test_cw_refuses_a_softmax_model(demo, digits) -> None:
    softmax = nn.Sequential(demo, nn.Softmax(dim=1))
    with pytest.raises(ModelOutputError, match="logits"):
        CarliniWagnerL2.fast()(softmax, digits.x[:4], digits.y[:4])


@pytest.mark.slow
def test_cw_with_the_reference_budget_is_within_one_percent_of_the_minimum() -> None:
    model, x, y, minimum = _linear_problem(n=6)
    result = CarliniWagnerL2()(model, x, y)  # 9 binary steps × 10,000 iterations
    assert result.success.all()
    ratio = result.distances["l2"].float() / minimum
    assert bool((ratio >= 1 - 1e-3).all()) and bool((ratio <= 1.01).all()), ratio
