"""Bastion: adversarial robustness and safety testing for PyTorch image classifiers.

Attributes are imported lazily (PEP 562) so that `import bastion` (for example by the
pytest plugin at collection time) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BastionError": "bastion.errors",
    "InvalidInputError": "bastion.errors",
    "ModelLoadError": "bastion.errors",
    "UntrustedModelError": "bastion.errors",
    "ModelOutputError": "bastion.errors",
    "DataError": "bastion.errors",
    "ConfigError": "bastion.errors",
    "AttackResult": "bastion.results",
    "ThreatModel": "bastion.threats",
    "Normalized": "bastion.normalized",
    "load_model": "bastion.model_io",
    "save_model": "bastion.model_io",
    "load_data": "bastion.data",
    "Dataset": "bastion.data",
    "run_suite": "bastion.suites.runner",
    "Report": "bastion.suites.report",
}
_SUBMODULES = ("zoo", "attacks", "defenses", "verify", "suites")

if TYPE_CHECKING:  # pragma: no cover
    from bastion import attacks, defenses, suites, verify, zoo
    from bastion.data import Dataset, load_data
    from bastion.errors import (
        BastionError,
        ConfigError,
        DataError,
        InvalidInputError,
        ModelLoadError,
        ModelOutputError,
        UntrustedModelError,
    )
    from bastion.model_io import load_model, save_model
    from bastion.normalized import Normalized
    from bastion.results import AttackResult
    from bastion.suites.report import Report
    from bastion.suites.runner import run_suite
    from bastion.threats import ThreatModel

__all__ = [
    "AttackResult",
    "BastionError",
    "ConfigError",
    "DataError",
    "Dataset",
    "InvalidInputError",
    "ModelLoadError",
    "ModelOutputError",
    "Normalized",
    "Report",
    "ThreatModel",
    "UntrustedModelError",
    "__version__",
    "attacks",
    "defenses",
    "load_data",
    "load_model",
    "run_suite",
    "save_model",
    "suites",
    "verify",
    "zoo",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bastion.{name}")
    else:
        raise AttributeError(f"module 'bastion' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
