"""SIFT features of an image: keypoints, the saliency distribution and a partition of pixels.

The feature-guided black-box attacks (Wicker et al., TACAS 2018; Wu et al., DeepGame, TCS
2020) let one player choose a *feature* and the other a pixel inside it. A feature is a SIFT
keypoint λ_i with location (x = column, y = row), size λ_{i,s} (OpenCV's `kp.size`, a
diameter) and response λ_{i,r}:

* Player I's distribution over features: `P_I(i) = λ_{i,r} / Σ_j λ_{j,r}`.
* the saliency map `S(p) = Σ_i λ_{i,r} · N₂(p; λ_i, σ_i²)`, normalised to sum 1, with the paper's
  2-D isotropic normal and σ_i = λ_{i,s} (DLV's code uses the 1-D radial pdf instead).
* the hard partition: each pixel belongs to the keypoint whose radial normal pdf
  `φ(‖p − λ_i‖; 0, σ_i)` is largest there (ties to the first keypoint), as DLV and DeepGame's
  black-box features, without DeepGame's off-by-one keypoint index.
* Player II's distribution inside feature i: the keypoint's 2-D normal restricted to the
  feature's pixels.

Small images give SIFT too little to work with, so images whose shorter side is under 50 px
are enlarged ×15 first (SafeCV's `inflation_constant`) and keypoints mapped back to the
original pixel grid (centre-aligned, as `cv2.resize` samples). SIFT's duplicate keypoints (one
per dominant orientation, same place and size) are merged. An image with no keypoints (a
uniform image) falls back to a regular grid of square features with equal responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bastion.errors import InvalidInputError

SMALL_IMAGE = 50  # SafeCV's `small_image` threshold (shorter side in pixels)
INFLATION = 15  # SafeCV's `inflation_constant`


@dataclass(frozen=True)
class Features:
    """The SIFT features of one H×W image.

    `keypoints` is K×4: column, row, size (σ, in pixels of the original image) and response,
    one row per feature. `partition[r, c]` is the feature index of pixel (r, c); every
    feature owns at least one pixel. `saliency` (H×W, sums to 1) is the response-weighted
    Gaussian mixture. `player_one` is P_I, `player_two[r, c]` is the probability of pixel
    (r, c) within its feature (each feature's pixels sum to 1). `grid` is True when SIFT
    found nothing and the features are grid cells. `scale` is the factor the image was
    enlarged by before SIFT.
    """

    keypoints: np.ndarray
    partition: np.ndarray
    saliency: np.ndarray
    player_one: np.ndarray
    player_two: np.ndarray
    grid: bool
    scale: int

    @property
    def count(self) -> int:
        return len(self.keypoints)

    def pixels(self, k: int) -> np.ndarray:
        """The flat (row-major) indices of the pixels of feature k."""
        return np.flatnonzero(self.partition.ravel() == k)


def sift_keypoints(image: np.ndarray, scale: int | None = None) -> tuple[np.ndarray, int]:
    """SIFT keypoints (K×4: column, row, size, response) of an H×W or H×W×C image in [0, 1],
    in the original pixel grid, and the enlargement factor used (default: ×15 below 50 px)."""
    import cv2

    if image.ndim == 3:
        image = image.mean(axis=2) if image.shape[2] != 1 else image[..., 0]
    h, w = image.shape
    if scale is None:
        scale = INFLATION if min(h, w) < SMALL_IMAGE else 1
    if scale < 1:
        raise InvalidInputError(f"the SIFT enlargement factor must be >= 1, got {scale}")
    gray = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        gray = np.asarray(
            cv2.resize(gray, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR), np.uint8
        )
    found = cv2.SIFT.create().detect(gray, None)  # OpenCV >= 4.4 (SIFT left xfeatures2d)
    rows: dict[tuple[float, float, float], float] = {}
    for kp in found:
        # cv2.resize maps pixel centres: original = (enlarged + 0.5) / scale − 0.5
        col = (kp.pt[0] + 0.5) / scale - 0.5
        row = (kp.pt[1] + 0.5) / scale - 0.5
        key = (round(col, 3), round(row, 3), round(kp.size / scale, 3))
        rows[key] = max(rows.get(key, 0.0), float(kp.response))
    out = np.array([[*k, r] for k, r in rows.items() if r > 0], dtype=np.float64)
    return out.reshape(-1, 4), scale


def grid_keypoints(h: int, w: int, cells: int = 4) -> np.ndarray:
    """A `cells`×`cells` grid of equal-response pseudo-keypoints (the no-keypoint fallback)."""
    ch, cw = h / min(cells, h), w / min(cells, w)
    rows = (np.arange(min(cells, h)) + 0.5) * ch - 0.5
    cols = (np.arange(min(cells, w)) + 0.5) * cw - 0.5
    size = max(ch, cw) / 2
    return np.array([[c, r, size, 1.0] for r in rows for c in cols], dtype=np.float64)


def features(image: np.ndarray | torch.Tensor, scale: int | None = None) -> Features:
    """The features of one image (C×H×W tensor or H×W[×C] array, values in [0, 1])."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise InvalidInputError(f"expected one C×H×W image, got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3) or image.size == 0 or not np.isfinite(image).all():
        raise InvalidInputError("expected one finite H×W or H×W×C image with pixels in [0, 1]")
    h, w = image.shape[:2]
    kps, used = sift_keypoints(image, scale)
    grid = len(kps) == 0
    if grid:
        kps = grid_keypoints(h, w)
    sigma = np.maximum(kps[:, 2], 0.5)  # a keypoint narrower than half a pixel owns its pixel
    rr, cc = np.mgrid[0:h, 0:w]
    sq = (cc[None] - kps[:, 0, None, None]) ** 2 + (rr[None] - kps[:, 1, None, None]) ** 2
    log_radial = -sq / (2 * sigma[:, None, None] ** 2) - np.log(sigma)[:, None, None]
    partition = log_radial.argmax(axis=0)  # first maximum wins ties
    owned = np.unique(partition)
    keep = np.zeros(len(kps), dtype=bool)
    keep[owned] = True
    remap = np.cumsum(keep) - 1
    kps, sigma, sq, partition = kps[keep], sigma[keep], sq[keep], remap[partition]
    gauss = np.exp(-sq / (2 * sigma[:, None, None] ** 2)) / (
        2 * math.pi * sigma[:, None, None] ** 2
    )
    saliency = (kps[:, 3, None, None] * gauss).sum(axis=0)
    saliency = saliency / saliency.sum() if saliency.sum() > 0 else np.full((h, w), 1 / (h * w))
    own = np.take_along_axis(gauss, partition[None], axis=0)[0] + 1e-300
    totals = np.bincount(partition.ravel(), weights=own.ravel(), minlength=len(kps))
    player_two = own / totals[partition]
    return Features(
        keypoints=kps,
        partition=partition,
        saliency=saliency,
        player_one=kps[:, 3] / kps[:, 3].sum(),
        player_two=player_two,
        grid=grid,
        scale=used,
    )
