"""The RGGB Bayer colour filter array: mosaicing and demosaicing, in torch and OpenCV.

A Bayer image is one plane `N×1×H×W` (H, W even) whose 2×2 tiles read
`R G / G B` (RGGB). Demosaicing algorithms map it back to `N×3×H×W` RGB:

- `malvar` — Malvar, He & Cutler (ICASSP 2004): bilinear plus a gradient correction,
  four fixed 5×5 kernels (/8); the default (sharpest, 28.8 dB round trip in the spec).
- `bilinear` — what Brooks et al. (CVPR 2019) use.
- `opencv` / `opencv-ea` — `cv2.demosaicing` (bilinear / edge-aware) on a uint16 copy: faster
  on CPU but not differentiable, so their backward pass is the torch bilinear / Malvar one
  (BPDA, Athalye et al. 2018).

Pitfall (spec §5.4): OpenCV names a Bayer pattern by the 2×2 block starting at (1, 1), so
RGGB data is `COLOR_BayerBG2RGB`; `COLOR_BayerRG2RGB` would swap red and blue.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bastion.errors import ConfigError, InvalidInputError

Demosaic = Callable[[torch.Tensor], torch.Tensor]
"""A demosaicing function: Bayer `N×1×H×W` (RGGB) → RGB `N×3×H×W`."""

#: The 2×2 RGGB tile: the colour channel (0 R, 1 G, 2 B) at (row % 2, col % 2).
RGGB = ((0, 1), (1, 2))

# Malvar–He–Cutler 5×5 kernels (all /8), spec §5.2 step 9.
_G_AT_RB = [
    [0, 0, -1, 0, 0],
    [0, 0, 2, 0, 0],
    [-1, 2, 4, 2, -1],
    [0, 0, 2, 0, 0],
    [0, 0, -1, 0, 0],
]
# R at a green site of a red row (its left/right neighbours are red); B at green in a blue row
_ROW_NEIGHBOURS = [
    [0, 0, 0.5, 0, 0],
    [0, -1, 0, -1, 0],
    [-1, 4, 5, 4, -1],
    [0, -1, 0, -1, 0],
    [0, 0, 0.5, 0, 0],
]
_DIAGONAL = [
    [0, 0, -1.5, 0, 0],
    [0, 2, 0, 2, 0],
    [-1.5, 0, 6, 0, -1.5],
    [0, 2, 0, 2, 0],
    [0, 0, -1.5, 0, 0],
]


def _check_bayer(raw: torch.Tensor) -> None:
    if raw.dim() != 4 or raw.shape[1] != 1 or raw.shape[2] % 2 or raw.shape[3] % 2:
        raise InvalidInputError(
            f"a Bayer image must have shape N×1×H×W with even H and W, got {tuple(raw.shape)}"
        )


def cfa_masks(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot `3×H×W` masks: which colour each RGGB site records (dtype/device of `like`)."""
    rows = torch.arange(height, device=like.device).reshape(-1, 1) % 2
    cols = torch.arange(width, device=like.device).reshape(1, -1) % 2
    channel = torch.tensor(RGGB, device=like.device)[rows, cols]
    return F.one_hot(channel, 3).permute(2, 0, 1).to(like.dtype)


def mosaic(rgb: torch.Tensor) -> torch.Tensor:
    """Sample `N×3×H×W` RGB through the RGGB filter array: a Bayer plane `N×1×H×W`."""
    if rgb.dim() != 4 or rgb.shape[1] != 3 or rgb.shape[2] % 2 or rgb.shape[3] % 2:
        raise InvalidInputError(
            f"mosaicing needs N×3×H×W images with even H and W, got {tuple(rgb.shape)}"
        )
    return (rgb * cfa_masks(rgb.shape[2], rgb.shape[3], rgb)).sum(1, keepdim=True)


def _site_masks(raw: torch.Tensor) -> torch.Tensor:
    """Boolean `4×1×H×W` masks of the four sites R, Gr (green in red rows), Gb, B."""
    h, w = raw.shape[2], raw.shape[3]
    rows = torch.arange(h, device=raw.device).reshape(-1, 1) % 2
    cols = torch.arange(w, device=raw.device).reshape(1, -1) % 2
    site = rows * 2 + cols  # 0 R, 1 Gr, 2 Gb, 3 B
    return torch.stack([site == k for k in range(4)]).unsqueeze(1)


def malvar(raw: torch.Tensor) -> torch.Tensor:
    """Malvar–He–Cutler gradient-corrected demosaicing, mirror padding; differentiable."""
    _check_bayer(raw)
    g_kernel, row_kernel, diag_kernel = (
        torch.tensor(k, dtype=raw.dtype, device=raw.device)
        for k in (_G_AT_RB, _ROW_NEIGHBOURS, _DIAGONAL)
    )
    kernels = torch.stack([g_kernel, row_kernel, row_kernel.T, diag_kernel]).unsqueeze(1)
    est = F.conv2d(F.pad(raw, (2, 2, 2, 2), mode="reflect"), kernels / 8)
    g_rb, row, col, diag = est[:, 0:1], est[:, 1:2], est[:, 2:3], est[:, 3:4]
    r_site, gr_site, gb_site, b_site = _site_masks(raw)
    # at a green site, the red (blue) estimate uses the row kernel when the row holds red
    # (blue), the column kernel otherwise; at the opposite colour site, the diagonal kernel
    red = torch.where(r_site, raw, torch.where(gr_site, row, torch.where(gb_site, col, diag)))
    green = torch.where(r_site | b_site, g_rb, raw)
    blue = torch.where(b_site, raw, torch.where(gb_site, row, torch.where(gr_site, col, diag)))
    return torch.cat([red, green, blue], 1)


def bilinear(raw: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicing (Brooks et al. 2019), mirror padding; differentiable."""
    _check_bayer(raw)
    planes = raw * cfa_masks(raw.shape[2], raw.shape[3], raw)  # N×3×H×W, zeros elsewhere
    cross = [[0, 1, 0], [1, 4, 1], [0, 1, 0]]
    box = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    kernels = torch.tensor([box, cross, box], dtype=raw.dtype, device=raw.device) / 4
    return F.conv2d(F.pad(planes, (1, 1, 1, 1), mode="reflect"), kernels.unsqueeze(1), groups=3)


def _opencv(raw: torch.Tensor, code_name: str) -> torch.Tensor:
    import cv2

    code = getattr(cv2, code_name)
    planes = (raw.detach().clamp(0, 1) * 65535).round().to(torch.int32).cpu().numpy()
    out = np.stack([cv2.demosaicing(p[0].astype(np.uint16), code) for p in planes])
    return torch.from_numpy(out.astype(np.float32) / 65535).permute(0, 3, 1, 2)


def _with_backward(forward: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`forward`'s values with `surrogate`'s gradient (BPDA)."""
    return surrogate + (forward.to(surrogate) - surrogate).detach()


def opencv_bilinear(raw: torch.Tensor) -> torch.Tensor:
    """OpenCV bilinear demosaicing (`COLOR_BayerBG2RGB`: RGGB data); torch bilinear backward."""
    _check_bayer(raw)
    return _with_backward(_opencv(raw, "COLOR_BayerBG2RGB"), bilinear(raw))


def opencv_edge_aware(raw: torch.Tensor) -> torch.Tensor:
    """OpenCV edge-aware demosaicing (`COLOR_BayerBG2RGB_EA`); Malvar backward."""
    _check_bayer(raw)
    return _with_backward(_opencv(raw, "COLOR_BayerBG2RGB_EA"), malvar(raw))


DEMOSAIC: dict[str, Demosaic] = {
    "malvar": malvar,
    "bilinear": bilinear,
    "opencv": opencv_bilinear,
    "opencv-ea": opencv_edge_aware,
}


def get_demosaic(name: str | Demosaic) -> Demosaic:
    """The demosaicing function named `name` (see `DEMOSAIC`), or `name` itself if callable."""
    if callable(name):
        return name
    if name not in DEMOSAIC:
        raise ConfigError(f"unknown demosaic {name!r}; choose one of {', '.join(DEMOSAIC)}")
    return DEMOSAIC[name]
