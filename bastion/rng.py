"""Counter-based random numbers keyed by (seed, sample index).

Attacks draw per-sample noise from a hash of (seed, sample index, element position), so a
sample gets the same noise whether it is attacked alone or in any batch, on any device,
without a per-sample Python loop or a global generator.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK
    return h ^ (h >> 16)


def _bits(seed: int, indices: torch.Tensor, numel: int, stream: int) -> torch.Tensor:
    """Hash words of shape len(indices) × numel, each a uniform integer in [0, 2^32)."""
    device = indices.device
    key = _mix(torch.tensor([(seed * 0x9E3779B9 + stream) & _MASK], device=device))
    rows = _mix((indices.long().reshape(-1, 1) & _MASK) ^ key)
    cols = torch.arange(numel, device=device, dtype=torch.long).reshape(1, -1)
    return _mix(rows ^ _mix((cols * 0x85EBCA6B) & _MASK))


def uniform(
    seed: int,
    indices: torch.Tensor,
    shape: tuple[int, ...],
    *,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform numbers in [0, 1) of shape (len(indices), *shape), one stream per sample."""
    numel = math.prod(shape)
    u = (_bits(seed, indices, numel, stream) >> 8).to(torch.float64) / float(1 << 24)
    return u.to(dtype).reshape(len(indices), *shape)


def normal(
    seed: int,
    indices: torch.Tensor,
    shape: tuple[int, ...],
    *,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal numbers via Box–Muller on two independent uniform streams."""
    u1 = uniform(seed, indices, shape, stream=2 * stream + 1, dtype=torch.float64)
    u2 = uniform(seed, indices, shape, stream=2 * stream + 2, dtype=torch.float64)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)
