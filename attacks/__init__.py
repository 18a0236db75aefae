"""Attacks: each a small class configured at construction and called on a batch.

`attack(model, x, y, *, target=None) -> AttackResult`; see `bastion.attacks.base`.
"""

from bastion.attacks.apgd import APGD, APGDT
from bastion.attacks.base import Attack
from bastion.attacks.carlini_wagner import CarliniWagnerL2
from bastion.attacks.fab import FAB
from bastion.attacks.feature_guided import FeatureGameMCTS, SafeCV
from bastion.attacks.fgsm import FGSM
from bastion.attacks.fooling import FoolingEvolution, FoolingResult
from bastion.attacks.fooling_ascent import FoolingGradientAscent
from bastion.attacks.gradient_descent import GradientDescentAttack, Loss
from bastion.attacks.pgd import BIM, PGD
from bastion.attacks.scaling import PenaltyScalingAttack, ScalingAttack, ScalingAttackResult
from bastion.attacks.square import Square

__all__ = [
    "APGD",
    "APGDT",
    "Attack",
    "BIM",
    "CarliniWagnerL2",
    "FAB",
    "FGSM",
    "FeatureGameMCTS",
    "FoolingEvolution",
    "FoolingGradientAscent",
    "FoolingResult",
    "GradientDescentAttack",
    "Loss",
    "PGD",
    "PenaltyScalingAttack",
    "SafeCV",
    "Square",
    "ScalingAttack",
    "ScalingAttackResult",
]
