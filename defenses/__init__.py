"""Defenses: model transforms (`RawISP().wrap(model)`), training recipes (`distill`,
`dverge.train`) and detectors; see docs/defenses.md."""

from bastion.defenses import dverge
from bastion.defenses.decamouflage import Decamouflage
from bastion.defenses.distillation import Distilled, TemperatureScaled, distill
from bastion.defenses.dverge import Ensemble
from bastion.defenses.raw_isp import RawISP
from bastion.defenses.scaling_defenses import (
    scaling_advice,
    scaling_audit,
    selective_median_filter,
    selective_random_filter,
)

__all__ = [
    "Decamouflage",
    "Distilled",
    "Ensemble",
    "RawISP",
    "TemperatureScaled",
    "distill",
    "dverge",
    "scaling_advice",
    "scaling_audit",
    "selective_median_filter",
    "selective_random_filter",
]
