"""Per-channel normalisation inside the model, so that attacks always see [0, 1] pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bastion.errors import ConfigError, InvalidInputError


def _channel_values(name: str, value: float | Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (int, float)):
        return [float(value)]
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a number or a sequence of numbers, one per channel, got {value!r}"
        ) from None
    if not values:
        raise ConfigError(f"{name} is empty; give one value per channel, e.g. (0.5, 0.5, 0.5)")
    return values


class Normalized(nn.Module):
    """Wrap `model` so that it takes [0, 1] pixels: computes `model((x - mean) / std)`.

    `mean` and `std` are numbers (applied to every channel) or sequences with one value per
    channel; they are stored as buffers of shape 1×C×1×1, so they follow `.to(device)` and are
    part of the state dict. Every `std` must be positive and finite.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: float | Sequence[float] | torch.Tensor,
        std: float | Sequence[float] | torch.Tensor,
    ) -> None:
        super().__init__()
        means = _channel_values("mean", mean)
        stds = _channel_values("std", std)
        if len(means) != len(stds) and 1 not in (len(means), len(stds)):
            raise ConfigError(
                f"mean has {len(means)} values but std has {len(stds)}; "
                "give one value per channel for both"
            )
        if not all(math.isfinite(m) for m in means):
            raise ConfigError(f"mean must be finite, got {means}; check the normalisation values")
        if not all(math.isfinite(s) and s > 0 for s in stds):
            raise ConfigError(
                f"std must be positive and finite, got {stds}; check the normalisation values"
            )
        channels = max(len(means), len(stds))
        if len(means) == 1:
            means = means * channels
        if len(stds) == 1:
            stds = stds * channels
        self.model = model
        self.register_buffer("mean", torch.tensor(means).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(stds).view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[1]
        if x.dim() != 4 or (channels > 1 and x.shape[1] != channels):
            raise InvalidInputError(
                f"Normalized expects images of shape N×{channels}×H×W, got "
                f"{tuple(x.shape)}; pass images with {channels} channel(s)"
            )
        out: torch.Tensor = self.model((x - self.mean) / self.std)
        return out

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
