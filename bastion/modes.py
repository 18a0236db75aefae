"""Evaluating a model without changing it: eval mode for a while, then every submodule's
own train/eval flag back as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Run in eval mode and restore each submodule's flag afterwards (mixed states too)."""
    if not isinstance(model, nn.Module):
        yield
        return
    training = [m for m in model.modules() if m.training]
    if not training:  # in eval mode throughout already: nothing to set or restore
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True
