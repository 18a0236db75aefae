"""Defenses: model transforms (`RawISP().wrap(model)`), training recipes (`distill`,
`dverge.train`) and detectors; see docs/defenses.md."""

from bastion.defenses import dverge
from bastion.defenses.decamouflage import Decamouflage
from bastion.defenses.distillation import (
    Distilled,
    TemperatureScaled,
    distill,
    temperature_of,
    undo_temperature,
)
from bastion.defenses.dverge import Ensemble
from bastion.defenses.raw_isp import RawISP
from bastion.defenses.scaling_defenses import (
    scaling_advice,
    scaling_audit,
    selective_median_filter,
    selective_random_filter,
)
from bastion.defenses.training_check import TrainingFailedError

__all__ = [
    "Decamouflage",
    "Distilled",
    "Ensemble",
    "RawISP",
    "TemperatureScaled",
    "TrainingFailedError",
    "distill",
    "dverge",
    "scaling_advice",
    "scaling_audit",
    "selective_median_filter",
    "selective_random_filter",
    "temperature_of",
    "undo_temperature",
]
