"""APGD and the gradient loop's loss hook: faithful to Croce & Hein (ICML 2020), stronger
than PGD with cross-entropy where the paper says it is, per-sample deterministic."""

from __future__ import annotations

import torch

from bastion.attacks import PGD
from bastion.attacks.losses import cross_entropy, dlr, margin


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
