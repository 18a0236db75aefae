"""Named image resizers of real libraries, their coefficient matrices, and pixel metrics.

Image-scaling attacks (Xiao et al. 2019, Quiring et al. 2020) target the resize that runs
before a model. Each resizer here wraps the library call itself (OpenCV, Pillow, torch),
so attacks and detectors see exactly what a deployment sees.

Conventions: sizes are `(rows, cols)`, i.e. (height, width) — not OpenCV's `(cols, rows)`.
Images are numpy arrays H×W or H×W×C, either uint8 (0–255) or float in [0, 1];
`as_pixels` turns both into float64 H×W×C on the 0–255 scale and rejects anything else
(NaN, floats outside [0, 1], other dtypes) instead of clipping. A scaler called on uint8
runs the library's own uint8 path (with its rounding) and returns uint8; called on floats
it returns float32 on the input's scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from bastion.errors import ConfigError, InvalidInputError

Size = tuple[int, int]


@dataclass(frozen=True)
class Scaler:
    """One library's resize algorithm, callable as `scaler(image, (rows, cols))`."""

    name: str
    library: str  # "cv2", "pil" or "torch"
    method: str
    antialias: bool = False

    def __call__(self, image: np.ndarray, size: Size) -> np.ndarray:
        rows, cols = int(size[0]), int(size[1])
        if rows < 1 or cols < 1:
            raise ConfigError(f"resize size must be positive, got {size}")
        grey = image.ndim == 2
        img = image[..., None] if grey else image
        out = _RESIZERS[self.library](self, img, rows, cols)
        return out[..., 0] if grey else out


_CV2_FLAGS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos4": cv2.INTER_LANCZOS4,
}


def _cv2_resize(s: Scaler, img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    data = img if img.dtype == np.uint8 else img.astype(np.float32)
    flag = _CV2_FLAGS[s.method]
    if data.shape[2] > 4:  # cv2.resize takes at most four channels
        return np.stack(
            [
                _cv2_resize(s, data[..., c : c + 1], rows, cols)[..., 0]
                for c in range(data.shape[2])
            ],
            axis=-1,
        )
    return cv2.resize(data, (cols, rows), interpolation=flag).reshape(rows, cols, img.shape[2])


def _pil_resize(s: Scaler, img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from PIL import Image

    resample = getattr(Image.Resampling, s.method.upper())
    if img.dtype == np.uint8 and img.shape[2] in (1, 3):
        mode_img = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out = np.asarray(mode_img.resize((cols, rows), resample))
        return out.reshape(rows, cols, img.shape[2])
    # Pillow resizes floats only as single-channel mode "F": one call per channel.
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize(
                (cols, rows), resample
            )
        )
        for c in range(img.shape[2])
    ]
    out = np.stack(chans, axis=-1)
    return out.astype(np.uint8) if img.dtype == np.uint8 else out


def _torch_resize(s: Scaler, img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    # Channels go on the batch axis: torch's multi-channel float32 kernels round differently
    # (up to 5e-3 grey levels) from its one-channel kernel, which the coefficients come from.
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), np.float32))[:, None]
    corners = {"align_corners": False} if s.method in ("bilinear", "bicubic") else {}
    aa = {"antialias": True} if s.antialias else {}
    out = F.interpolate(t, size=(rows, cols), mode=s.method, **corners, **aa)[:, 0]
    res = out.numpy().transpose(1, 2, 0)
    # torchvision's Resize on uint8 tensors rounds and saturates the float result.
    return np.clip(np.round(res), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else res


_RESIZERS = {"cv2": _cv2_resize, "pil": _pil_resize, "torch": _torch_resize}

SCALERS: dict[str, Scaler] = {
    s.name: s
    for s in (
        *(Scaler(f"cv2.{m}", "cv2", m) for m in _CV2_FLAGS),
        *(
            Scaler(f"pil.{m}", "pil", m)
            for m in ("nearest", "bilinear", "bicubic", "lanczos", "box")
        ),
        Scaler("torch.nearest", "torch", "nearest"),
        Scaler("torch.bilinear", "torch", "bilinear"),
        Scaler("torch.bilinear-aa", "torch", "bilinear", antialias=True),
        Scaler("torch.bicubic", "torch", "bicubic"),
        Scaler("torch.bicubic-aa", "torch", "bicubic", antialias=True),
        Scaler("torch.area", "torch", "area"),
    )
}
"""Every named resizer. `torch.*-aa` equals torchvision `Resize(size, antialias=True)` on
tensors; `torch.*` without `-aa` is `F.interpolate(..., align_corners=False)`."""


def get_scaler(scaler: str | Scaler) -> Scaler:
    """The `Scaler` called `scaler` (e.g. "cv2.linear", "pil.bicubic", "torch.bilinear-aa")."""
    if isinstance(scaler, Scaler):
        return scaler
    if scaler not in SCALERS:
        raise ConfigError(f"unknown scaler {scaler!r}; choose one of {', '.join(SCALERS)}")
    return SCALERS[scaler]


@functools.lru_cache(maxsize=64)
def _coefficients(name: str, src: Size, dst: Size) -> tuple[np.ndarray, np.ndarray]:
    s = SCALERS[name]
    (m, n), (mp, np_) = src, dst
    cl = s(255 * np.eye(m, dtype=np.float32), (mp, m)).astype(np.float64) / 255
    cr = s(255 * np.eye(n, dtype=np.float32), (n, np_)).astype(np.float64) / 255
    cl /= cl.sum(axis=1, keepdims=True)
    cr /= cr.sum(axis=0, keepdims=True)
    cl.flags.writeable = cr.flags.writeable = False
    return cl, cr


def coefficients(scaler: str | Scaler, src: Size, dst: Size) -> tuple[np.ndarray, np.ndarray]:
    """`(CL, CR)` with `scaler(S, dst) ≈ CL · S · CR` for every `src`-sized S (Quiring §3.1).

    Recovered from the scaler itself by resizing scaled identity matrices (float32, so no
    rounding) and normalising CL's rows and CR's columns to sum to one. Cached per
    (scaler, src, dst); the arrays are read-only.
    """
    s = get_scaler(scaler)
    src, dst = (int(src[0]), int(src[1])), (int(dst[0]), int(dst[1]))
    if min(*src, *dst) < 1:
        raise ConfigError(f"sizes must be positive, got {src} -> {dst}")
    return _coefficients(s.name, src, dst)


def coefficient_error(scaler: str | Scaler, src: Size, dst: Size, seed: int = 0) -> float:
    """max |CL·S·CR − scaler(S)| on a random float32 image S on the 0–255 scale."""
    s = get_scaler(scaler)
    img = np.random.default_rng(seed).uniform(0, 255, size=(*src, 3)).astype(np.float32)
    cl, cr = coefficients(s, src, dst)
    model = np.stack([cl @ img[..., c].astype(np.float64) @ cr for c in range(3)], axis=-1)
    return float(np.abs(model - s(img, dst)).max())


def as_pixels(
    image: np.ndarray, what: str = "image", dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """`image` (uint8, or float in [0, 1]; H×W or H×W×C) as `dtype` H×W×C on 0–255."""
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(
            f"{what} must be a numpy array, got {type(image).__name__}; convert it with np.asarray"
        )
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise InvalidInputError(
            f"{what} must be H×W or H×W×C, got shape {image.shape}; drop the batch axis"
        )
    img = image[..., None] if image.ndim == 2 else image
    if img.dtype == np.uint8:
        return img.astype(dtype)
    if not np.issubdtype(img.dtype, np.floating):
        raise InvalidInputError(f"{what} must be uint8 or float in [0, 1], got dtype {img.dtype}")
    if not np.isfinite(img).all():
        raise InvalidInputError(f"{what} contains NaN or infinite pixels; clean it first")
    if img.min() < 0 or img.max() > 1:
        raise InvalidInputError(
            f"{what} pixel values span [{img.min():.4g}, {img.max():.4g}] but floats must lie "
            "in [0, 1]; divide 0–255 images by 255 or pass them as uint8"
        )
    return img.astype(dtype) * dtype(255.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images on the 0–255 scale (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
