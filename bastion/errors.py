"""Errors a user can cause. Each carries one sentence: what is wrong, what to do.

The CLI prints the message of any `BastionError` on one line and exits with code 2.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base class of every error a user can cause (bad input, bad file, bad option)."""


class InvalidInputError(BastionError):
    """Images or labels that cannot be evaluated: wrong shape or dtype, NaN, out of range."""


class ModelLoadError(BastionError):
    """A model file that is missing, corrupt, truncated or of an unknown format."""


class UntrustedModelError(ModelLoadError):
    """A pickled model file, which can run arbitrary code, loaded without trust_pickle."""


class ModelOutputError(BastionError):
    """A model whose outputs cannot be attacked as logits (NaN, probabilities, wrong shape)."""


class DataError(BastionError):
    """An unknown data spec, a missing dataset or a corrupt data file."""


class ConfigError(BastionError):
    """An unknown suite, attack or option, or a parameter out of its range."""


class BastionWarning(UserWarning):
    """Something Bastion accepted but the user should know (the CLI prints one line per warning)."""
