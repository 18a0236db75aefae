"""Transfer attacks for DVERGE's evaluation: M-PGD, M-DI²-FGSM and SGM with CE and CW
losses, crafted on a surrogate and scored on a target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks.transfer import (
    TransferAttack,
    diverse_input,
    paper_attacks,
    skip_gradient,
    transfer_accuracy,
)
from bastion.data import load_data
from bastion.defenses.model_families import _BasicBlock
from bastion.errors import ConfigError
from bastion.zoo import demo_model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    test = load_data("digits", split="test", n=96)
    return test.x, test.y


def test_attacks_stay_in_the_ball_and_break_the_surrogate_itself(digits) -> None:  # type: ignore[no-untyped-def]
    """Crafted on the target itself (white-box), every attack breaks most samples; each
    example lies in the eps-ball and in [0, 1]; "all" is at most every attack's row."""
    x, y = digits
    model = demo_model()
    attacks = paper_attacks(0.2, steps=20, restarts=2, sgm=False)
    assert [a.name for a in attacks] == [
        "M-PGD-CE", "M-DI2-FGSM-CE", "M-PGD-CW", "M-DI2-FGSM-CW",
    ]  # fmt: skip
    for attack in attacks:
        outs = attack(model, x, y)
        assert len(outs) == attack.restarts
        for adv in outs:
            assert float((adv - x).abs().max()) <= 0.2 + 1e-6
            assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    acc = transfer_accuracy(model, model, x, y, attacks)
    assert acc["clean"] > 0.95
    assert all(v < 0.3 for k, v in acc.items() if k != "clean"), acc
    assert acc["all"] <= min(v for k, v in acc.items() if k != "clean")


def test_paper_attacks_include_sgm_for_a_resnet_surrogate() -> None:
    names = [a.name for a in paper_attacks(0.03)]
    assert names == ["M-PGD-CE", "M-DI2-FGSM-CE", "SGM-CE", "M-PGD-CW", "M-DI2-FGSM-CW", "SGM-CW"]
    assert all(a.steps == 100 for a in paper_attacks(0.03))
    assert paper_attacks(0.03)[0].restarts == 3


def _input_gradient(model: nn.Module, x: torch.Tensor, gamma: float | None) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, 3 * 4 * 4).view(1, 3, 4, 4)
    ctx = skip_gradient(model, gamma) if gamma is not None else torch.enable_grad()
    with ctx:
        (grad,) = torch.autograd.grad((model(x) * weights).sum(), x)
    return grad


def test_sgm_scales_the_residual_branch_gradient_only() -> None:
    """One residual block: the input gradient is skip + γ·branch, so it is linear in γ
    (g(γ) = (1 − γ)·g(0) + γ·g(1)), γ = 1 changes nothing, and the hooks are removed."""
    torch.manual_seed(0)
    block = _BasicBlock(3, 3, 1).eval()
    x = torch.rand(2, 3, 4, 4)
    plain = _input_gradient(block, x, None)
    g0, g1, g = (_input_gradient(block, x, v) for v in (0.0, 1.0, 0.2))
    assert torch.allclose(g1, plain, atol=1e-6)
    assert torch.allclose(g, 0.8 * g0 + 0.2 * g1, atol=1e-5)
    assert not torch.allclose(g0, g1, atol=1e-3)
    assert torch.allclose(_input_gradient(block, x, None), plain)
    assert not block.bn2._forward_hooks


def test_sgm_refuses_a_surrogate_without_residual_blocks(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    with pytest.raises(ConfigError, match="SGM needs a ResNet surrogate"):
        TransferAttack(0.1, steps=2, sgm_gamma=0.2)(demo_model(), x[:4], y[:4])


def test_diverse_input_keeps_the_size_and_only_moves_or_pads_pixels() -> None:
    x = torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = diverse_input(x, gen)
        assert out.shape == x.shape
        values = set(x.unique().tolist()) | {0.0}
        assert set(out.unique().tolist()) <= values


def test_bad_parameters_are_refused() -> None:
    for kwargs in ({"eps": 0}, {"eps": 0.1, "steps": 0}, {"eps": 0.1, "loss": "dlr"},
                   {"eps": 0.1, "diversity": 2}, {"eps": 0.1, "sgm_gamma": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            TransferAttack(**kwargs)  # type: ignore[arg-type]
