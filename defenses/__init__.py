"""Defenses: model transforms (`RawISP().wrap(model)`), training recipes (`distill`) and
detectors; see docs/defenses.md."""

from bastion.defenses.distillation import Distilled, TemperatureScaled, distill
from bastion.defenses.raw_isp import RawISP

__all__ = ["Distilled", "RawISP", "TemperatureScaled", "distill"]
