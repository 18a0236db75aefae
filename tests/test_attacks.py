"""FGSM, PGD and BIM: faithful to their definitions, in the ball and the box, per-sample
deterministic, never mutating inputs or the model's mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks import BIM, FGSM, PGD, CarliniWagnerL2
from bastion.errors import ConfigError, InvalidInputError, ModelOutputError


def test_fgsm_equals_the_three_line_reference_bit_for_bit(demo, digits) -> None:
    x, y, eps = digits.x[:128], digits.y[:128], 0.1
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(demo(xr), y), xr)[0]
    reference = (x + eps * grad.sign()).clamp(0, 1)

    result = FGSM(eps)(demo, x, y)
    # samples the model already misclassifies are returned as they are
    stepped = result.success & (result.pred_clean == y)
    expected = torch.where(stepped.reshape(-1, 1, 1, 1), reference, x)
    assert result.success.any() and not result.success.all()
    assert torch.equal(result.x_adv, expected)


def test_targeted_fgsm_steps_against_the_target_gradient(demo, digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    target = (y + 1) % 10
    xr = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(demo(xr), target), xr)[0]
    reference = (x - 0.2 * grad.sign()).clamp(0, 1)
    result = FGSM(0.2)(demo, x, y, target=target)
    assert result.success.any()
    assert torch.equal(result.x_adv[result.success], reference[result.success])
    assert torch.equal(result.pred_adv[result.success], target[result.success])


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_pgd_stays_in_the_eps_ball_and_the_box(demo, digits, norm, eps) -> None:
    x, y = digits.x[:128], digits.y[:128]
    result = PGD(eps, norm=norm, steps=10, early_stop=False)(demo, x, y)
    dist = result.distances[norm]
    assert float(dist.max()) <= eps * (1 + 1e-5)
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert result.success.any()


def test_iterative_attacks_beat_fgsm(demo, digits) -> None:
    x, y = digits.x[:200], digits.y[:200]
    fgsm = FGSM(0.2)(demo, x, y).success_rate
    bim = BIM(0.2, steps=10)(demo, x, y).success_rate
    pgd = PGD(0.2, steps=40)(demo, x, y).success_rate
    assert bim > fgsm + 0.05 and pgd > fgsm + 0.05


def test_targeted_pgd_reaches_the_target(demo, digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    target = (y + 3) % 10
    result = PGD(0.3, steps=40)(demo, x, y, target=target)
    assert result.success_rate > 0.9
    assert torch.equal(result.pred_adv[result.success], target[result.success])


@pytest.mark.parametrize("attack", [FGSM(0.0), PGD(0.0), PGD(0.0, norm="l2")])
def test_eps_zero_returns_the_clean_input(demo, digits, attack) -> None:
    x, y = digits.x[:64], digits.y[:64]
    result = attack(demo, x, y)
    assert torch.equal(result.x_adv, x)
    assert torch.equal(result.success, result.pred_clean != y)


@pytest.mark.parametrize(
    "attack",
    [FGSM(0.1), PGD(0.1, steps=5), CarliniWagnerL2(binary_search_steps=2, max_iterations=20)],
)
def test_inputs_are_not_mutated_and_the_mode_is_restored(demo, digits, attack) -> None:
    x, y = digits.x[:32].clone(), digits.y[:32].clone()
    x0, y0 = x.clone(), y.clone()
    demo.train()
    demo.features[0].eval()  # a mixed state must come back as it was
    try:
        attack(demo, x, y)
        assert demo.training and not demo.features[0].training and demo.features[1].training
    finally:
        demo.eval()
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(0.1),
        PGD(0.1, steps=10),
        PGD(1.0, norm="l2", steps=10),
        CarliniWagnerL2(binary_search_steps=3, max_iterations=50),
    ],
)
def test_success_equals_a_reprediction_and_failures_return_the_clean_input(
    demo, digits, attack
) -> None:
    x, y = digits.x[:64], digits.y[:64]
    result = attack(demo, x, y)
    with torch.no_grad():
        pred = demo(result.x_adv).argmax(1)
    assert torch.equal(pred, result.pred_adv)
    assert torch.equal(result.success, pred != y)
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


def test_misclassified_samples_are_returned_unchanged(demo, digits) -> None:
    x = digits.x[:32]
    wrong = (demo(x).argmax(1) + 1) % 10  # labels the model now "misclassifies"
    result = PGD(0.1)(demo, x, wrong)
    assert result.success.all()
    assert torch.equal(result.x_adv, x)
    assert int(result.iterations.sum()) == 0


def test_pgd_sample_alone_equals_sample_in_a_batch(demo, digits) -> None:
    x, y = digits.x[:48], digits.y[:48]
    attack = PGD(0.1, steps=10, seed=3)
    batch = attack(demo, x, y)
    for i in (0, 17, 47):
        alone = attack(demo, x[i : i + 1], y[i : i + 1], indices=torch.tensor([i]))
        assert torch.allclose(alone.x_adv[0], batch.x_adv[i], atol=1e-6)
        assert bool(alone.success[0]) == bool(batch.success[i])


def test_same_seed_same_result_other_seed_other_start(demo, digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    a = PGD(0.3, steps=2, seed=1, early_stop=False)(demo, x, y)
    b = PGD(0.3, steps=2, seed=1, early_stop=False)(demo, x, y)
    c = PGD(0.3, steps=2, seed=2, early_stop=False)(demo, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    both = a.success & c.success & (a.pred_clean == y)
    assert both.sum() > 10
    assert not torch.equal(a.x_adv[both], c.x_adv[both])


def test_per_sample_eps_tensor_bounds_each_sample(demo, digits) -> None:
    x, y = digits.x[:64], digits.y[:64]
    eps = torch.linspace(0.0, 0.3, 64)
    result = PGD(eps, steps=10)(demo, x, y)
    assert bool((result.distances["linf"] <= eps.double() + 1e-6).all())
    assert not result.success[0] or bool(result.pred_clean[0] != y[0])
    with pytest.raises(InvalidInputError, match="one value per image"):
        PGD(eps[:10])(demo, x, y)


def test_query_and_gradient_counts(demo, digits) -> None:
    x, y = digits.x[:16], digits.y[:16]
    result = FGSM(0.1)(demo, x, y)
    attacked = result.pred_clean == y
    # one forward+backward at x gives the clean prediction and the gradient; one re-prediction
    assert torch.equal(result.queries[attacked], torch.full((int(attacked.sum()),), 2))
    assert torch.equal(
        result.gradients[attacked], torch.ones(int(attacked.sum()), dtype=torch.long)
    )
    pgd = PGD(0.1, steps=5, early_stop=False)(demo, x, y)
    # a clean forward, 5 forward+backward steps from the random start, one re-prediction
    assert torch.equal(pgd.queries[attacked], torch.full((int(attacked.sum()),), 7))
    assert torch.equal(pgd.gradients[attacked], torch.full((int(attacked.sum()),), 5))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.zeros(2, 8, 8), "N×C×H×W"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "float"),
    ],
)
def test_bad_images_are_refused_with_one_sentence(demo, bad, match) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        FGSM(0.1)(demo, bad, torch.zeros(2, dtype=torch.long))
    assert "\n" not in str(info.value)


def test_bad_eps_and_norms_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="finite number"):
        PGD(-0.1)
    with pytest.raises(ConfigError, match="8/255"):
        FGSM(8)
    with pytest.raises(ConfigError, match="norm"):
        PGD(0.1, norm="l1")


def test_nan_model_outputs_are_refused(digits) -> None:
    class NaNModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 10), float("nan"))

    with pytest.raises(ModelOutputError, match="NaN"):
        FGSM(0.1)(NaNModel(), digits.x[:4], digits.y[:4])
