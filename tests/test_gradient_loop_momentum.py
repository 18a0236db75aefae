"""The shared gradient loop's momentum and `ascend`: MI-FGSM as Dong et al. write it, and
DVERGE's feature distillation as the DVERGE code runs it, on the one loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bastion.attacks.gradient_descent import GradientDescentAttack
from bastion.attacks.losses import cross_entropy
from bastion.defenses import dverge
from bastion.defenses.model_families import SmallCNN, feature_layers, read_features
from bastion.errors import ConfigError


def _momentum_sign_steps(grad_of, x, *, eps, alpha, steps, momentum, sign):
    """The reference: g ← μ·g + ∇/‖∇‖₁; x ← clip(x + sign·α·sign(g)) into the ball and [0, 1]
    (DVERGE's `Linf_distillation` with sign −1, MI-FGSM with sign +1)."""
    z, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        grad = grad_of(z)
        g = momentum * g + grad / grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        z = z + sign * alpha * g.sign()
        z = torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)
    return z


def _model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(in_channels=3, width=8)


def _images(seed: int) -> torch.Tensor:
    return torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("momentum", [1.0, 0.5])
def test_distill_is_the_dverge_codes_momentum_sign_pgd(train: bool, momentum: float) -> None:
    model, x, xs = _model().train(train), _images(1), _images(2)
    reference = copy.deepcopy(model)
    point, ref_point = feature_layers(model)[2], feature_layers(reference)[2]
    target = read_features(reference, x, ref_point).detach()

    def grad_of(z: torch.Tensor) -> torch.Tensor:
        zg = z.detach().requires_grad_(True)
        loss = (read_features(reference, zg, ref_point) - target).pow(2).sum()
        return torch.autograd.grad(loss, zg)[0]

    want = _momentum_sign_steps(
        grad_of, xs, eps=0.07, alpha=0.007, steps=10, momentum=momentum, sign=-1
    )
    got = dverge.distill(model, x, xs, point, momentum=momentum)
    assert torch.equal(got, want)  # bit for bit, as before it ran on the shared loop
    # train mode: batch-norm statistics moved by the same forwards
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_momentum_on_the_loop_is_mi_fgsm() -> None:
    model, x = _model().eval(), _images(3)
    y = model(x).argmax(1)
    eps, steps = 0.1, 8

    def grad_of(z: torch.Tensor) -> torch.Tensor:
        zg = z.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(zg), y, reduction="sum"), zg)[0]

    want = _momentum_sign_steps(
        grad_of, x, eps=eps, alpha=eps / steps, steps=steps, momentum=1.0, sign=1
    )
    loop = GradientDescentAttack(
        eps=eps, norm="linf", steps=steps, rel_stepsize=1 / steps, random_start=False,
        early_stop=False, loss=cross_entropy, momentum=1.0,
    )  # fmt: skip
    torch.testing.assert_close(loop.ascend(model, x, y), want, rtol=0, atol=1e-7)
    plain = GradientDescentAttack(
        eps=eps, norm="linf", steps=steps, rel_stepsize=1 / steps, random_start=False,
        early_stop=False, loss=cross_entropy,
    )  # fmt: skip
    assert not torch.equal(plain.ascend(model, x, y), want)  # the momentum is what differs


def test_bad_momentum_and_ascend_without_a_loss_are_refused() -> None:
    with pytest.raises(ConfigError, match="momentum"):
        GradientDescentAttack(
            eps=0.1, norm="linf", steps=2, rel_stepsize=0.5, random_start=False, momentum=-1
        )
    no_loss = GradientDescentAttack(
        eps=0.1, norm="linf", steps=2, rel_stepsize=0.5, random_start=False, early_stop=False
    )
    with pytest.raises(ConfigError, match="ascend needs a loss"):
        no_loss.ascend(_model(), _images(1), torch.zeros(12, dtype=torch.long))
