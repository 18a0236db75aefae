"""SSIM of two images as scikit-image computes it, fast enough for per-image detection.

Same definition as `skimage.metrics.structural_similarity(gaussian_weights=True,
sigma=1.5, data_range=255, channel_axis=-1)` (as Decamouflage uses it): 11×11 Gaussian
local statistics with the sample covariance, the map averaged over every channel with the
5-pixel border cropped. Computed with OpenCV in float32, in bands of rows small enough to
stay in cache, spread over `cv2.getNumThreads()` threads (OpenCV releases the GIL): an
896×896 RGB pair takes 25–40 ms on 2 cores (docs/scaling.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from bastion.errors import InvalidInputError

_RADIUS, _SIGMA = 5, 1.5  # skimage: int(3.5 * sigma + 0.5), an 11×11 window
_COV_NORM = 121 / 120  # skimage's sample covariance over the 11×11 window
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
_BAND_ROWS = 64


@functools.lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="bastion-ssim")


def _blur(z: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The Gaussian local mean into `dst`, cropped by the radius (the border never counts)."""
    r = _RADIUS
    cv2.GaussianBlur(z, (2 * r + 1,) * 2, _SIGMA, dst=dst, borderType=cv2.BORDER_REFLECT)
    return dst[r:-r, r:-r]


def _band_sums(
    x: np.ndarray, ys: Sequence[np.ndarray], bands: list[tuple[int, int]]
) -> list[list[float]]:
    """Σ of the SSIM map of x against each y over each band [start, stop) of map rows.

    Runs band by band in five scratch arrays allocated once (fresh full-size temporaries
    cost more in page faults than the arithmetic), blurring x once per band for every y.
    Blurring is linear, so blur(x²) + blur(y²) is one pass, blur(x² + y²); OpenCV's
    accumulate and addWeighted (α·a + β·b + γ) fuse the rest into few passes.
    """
    r, c2n = _RADIUS, 2 * _COV_NORM
    scratch = np.empty((5, _BAND_ROWS + 2 * r, *x.shape[1:]), np.float32)
    sums = []
    for s, e in bands:
        n = e - s
        xs = x[s : s + n + 2 * r]
        b0, b1, b2, b3, b4 = scratch[:, : n + 2 * r]
        ux = _blur(xs, b0)
        row = []
        for y in ys:
            ys_ = y[s : s + n + 2 * r]
            uy = _blur(ys_, b1)
            sq = _blur(cv2.accumulateSquare(ys_, cv2.multiply(xs, xs, dst=b2)), b3)
            xy = _blur(cv2.multiply(xs, ys_, dst=b2), b4)
            uxy = cv2.multiply(ux, uy, dst=b2[r:-r, r:-r])
            u2 = cv2.accumulateSquare(ux, cv2.multiply(uy, uy, dst=uy))  # ux stays for the next y
            cov = cv2.addWeighted(xy, c2n, uxy, -c2n, _C2, dst=xy)  # 2σxy + C2, before uxy changes
            num = cv2.multiply(cv2.addWeighted(uxy, 2.0, uxy, 0.0, _C1, dst=uxy), cov, dst=uxy)
            var = cv2.addWeighted(sq, _COV_NORM, u2, -_COV_NORM, _C2, dst=sq)  # σx² + σy² + C2
            den = cv2.multiply(cv2.addWeighted(u2, 1.0, u2, 0.0, _C1, dst=u2), var, dst=u2)
            ratio = cv2.divide(num, den, dst=num)
            row.append(sum(cv2.sumElems(ratio.reshape(n, -1))))  # contiguous rows: a 2-D view
        sums.append(row)
    return sums


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two H×W(×C) images on the 0–255 scale, averaged over channels."""
    return ssims(a, [b])[0]


def ssims(a: np.ndarray, others: Sequence[np.ndarray]) -> list[float]:
    """`[ssim(a, b) for b in others]`, with a's local means computed once."""
    x = np.asarray(a, np.float32)
    ys = [np.asarray(b, np.float32) for b in others]
    for y in ys:
        if x.shape != y.shape:
            raise InvalidInputError(f"SSIM needs images of one shape, got {x.shape} and {y.shape}")
    if x.ndim < 2 or min(x.shape[:2]) <= 2 * _RADIUS:
        raise InvalidInputError(
            f"SSIM needs images of at least {2 * _RADIUS + 1}×{2 * _RADIUS + 1} pixels, "
            f"got shape {x.shape}"
        )
    rows = x.shape[0] - 2 * _RADIUS  # rows of the cropped map
    bands = [(s, min(s + _BAND_ROWS, rows)) for s in range(0, rows, _BAND_ROWS)]
    # Each worker takes every k-th band; the band sums add up in one order, so the result
    # does not depend on the number of threads.
    workers = min(len(bands), max(1, cv2.getNumThreads()))
    if workers == 1:
        sums = _band_sums(x, ys, bands)
    else:
        runs = [bands[i::workers] for i in range(workers)]
        parts = list(_pool(workers).map(lambda run: _band_sums(x, ys, run), runs))
        sums = [parts[i % workers][i // workers] for i in range(len(bands))]
    size = rows * (x.shape[1] - 2 * _RADIUS) * (x.size // (x.shape[0] * x.shape[1]))
    return [sum(band[k] for band in sums) / size for k in range(len(ys))]
