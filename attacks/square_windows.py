"""The geometry of the Square Attack: per-sample square masks and the L2 window patterns.

The L2 pattern of side s (the authors' `eta`) is two stacked blocks, the top s//2 rows
positive and the rest negative; each block holds nested rectangles around its centre,
a pixel at Chebyshev distance d from it weighing Σ_{k=d}^{K−1} 1/(k+1)² (K the number of
rectangles); the whole pattern has unit L2 norm and is transposed with probability ½.
"""

from __future__ import annotations

import torch


def _rectangles(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """One block: nested rectangles centred at (rows//2, cols//2), rows × cols."""
    if rows == 0:
        return torch.zeros(0, cols, dtype=dtype)
    count = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / torch.arange(1, count + 1, dtype=torch.float64) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k ≥ d} weights[k]
    di = (torch.arange(rows) - rows // 2).abs().reshape(-1, 1)
    dj = (torch.arange(cols) - cols // 2).abs().reshape(1, -1)
    block = tail[torch.maximum(di, dj)]
    return (block / block.pow(2).sum().sqrt()).to(dtype)


def pattern(side: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The authors' L2 window of one side, untransposed, unit L2 norm."""
    half = side // 2
    p = torch.cat([_rectangles(half, side, dtype), -_rectangles(side - half, side, dtype)])
    return p / p.pow(2).sum().sqrt()


def window(side: int, transpose: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """n × side × side patterns, transposed where `transpose` (shape n) is True."""
    p = pattern(side, dtype).to(transpose.device)
    return torch.where(transpose.reshape(-1, 1, 1), p.T, p)


def window_grid(h: int, w: int, side: int) -> list[tuple[int, int]]:
    """The top-left corners of the L2 start's tiles: h//side × w//side tiles of `side`,
    offset by (h − 5·side)//2 as the authors do (tiles past the edge are clipped)."""
    start = (h - side * 5) // 2
    return [
        (start + i * side, start + j * side)
        for i in range(h // side)
        for j in range(w // side)
        if start + i * side < h and start + j * side < w
    ]


def corners(
    u_top: torch.Tensor, u_left: torch.Tensor, side: int, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample square corners from uniforms in [0, 1): ⌊u·(size − side)⌋ as the
    authors' `random_int(0, size − side)`."""
    return (u_top * (h - side)).long(), (u_left * (w - side)).long()


def square_mask(
    u_top: torch.Tensor, u_left: torch.Tensor, side: int, h: int, w: int
) -> torch.Tensor:
    """n × 1 × h × w masks, 1 on each sample's square of `side`."""
    top, left = corners(u_top, u_left, side, h, w)
    r = torch.arange(h, device=u_top.device).reshape(1, -1) - top.reshape(-1, 1)
    q = torch.arange(w, device=u_top.device).reshape(1, -1) - left.reshape(-1, 1)
    rows = (r >= 0) & (r < side)
    cols = (q >= 0) & (q < side)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def placed_window(
    u_top: torch.Tensor,
    u_left: torch.Tensor,
    side: int,
    h: int,
    w: int,
    transpose: torch.Tensor,
    *,
    dtype: torch.dtype,
) -> torch.Tensor:
    """n × 1 × h × w: each sample's window pattern at its square, zero elsewhere."""
    top, left = corners(u_top, u_left, side, h, w)
    r = torch.arange(h, device=u_top.device).reshape(1, -1) - top.reshape(-1, 1)
    q = torch.arange(w, device=u_top.device).reshape(1, -1) - left.reshape(-1, 1)
    inside = ((r >= 0) & (r < side))[:, :, None] & ((q >= 0) & (q < side))[:, None, :]
    flat = r.clamp(0, side - 1)[:, :, None] * side + q.clamp(0, side - 1)[:, None, :]
    p = window(side, transpose, dtype=dtype).flatten(1)
    values = p.gather(1, flat.flatten(1)).reshape(-1, h, w)
    return (values * inside)[:, None]
