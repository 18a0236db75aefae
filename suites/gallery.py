"""Gallery images for the HTML report: clean | adversarial | amplified difference.

A `GalleryItem` holds one attacked sample as H×W×C float arrays in [0, 1] (C = 1 or 3)
together with what the model said about it. `png_data_uri` turns an array into an inline
PNG (upscaled with nearest neighbour so that 8×8 digits stay visible), and
`amplified_difference` makes a perturbation visible at any size.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from bastion.suites.report_model import GalleryRef

#: Small images are upscaled by an integer factor to about this many pixels on their long side.
TARGET_PIXELS = 112


@dataclass
class GalleryItem(GalleryRef):
    """One attacked sample: what report.json records of it (`GalleryRef`) and its images."""

    clean: np.ndarray
    adv: np.ndarray

    def ref(self) -> GalleryRef:
        """The record without the pixels."""
        return GalleryRef(**{f.name: getattr(self, f.name) for f in fields(GalleryRef)})


def display_scale(height: int, width: int) -> int:
    """The integer upscaling factor for an image: ~TARGET_PIXELS on its long side, at least 1."""
    return max(1, TARGET_PIXELS // max(height, width, 1))


def _as_hwc(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[:, :, None]
    if (
        array.ndim != 3
        or array.shape[2] not in (1, 3)
        or array.shape[0] == 0
        or array.shape[1] == 0
    ):
        raise ValueError(f"expected an H×W×C image with C = 1 or 3, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("the image holds NaN or infinite values")
    return array


def png_bytes(image: np.ndarray, scale: int = 1, *, channels_first: bool = False) -> bytes:
    """8-bit PNG bytes of an H×W×C (or H×W; C×H×W with `channels_first`) image in [0, 1]:
    grey for one channel, RGB for three; values rounded to 8 bits, anything outside [0, 1]
    at the nearest bound; `scale` upscales by an integer factor (nearest neighbour). The
    one PNG encoder of Bastion (the HTML gallery, `bastion attack`, `fool`, `verify`)."""
    array = np.asarray(image, dtype=np.float64)
    if channels_first and array.ndim == 3:
        array = array.transpose(1, 2, 0)
    array = _as_hwc(array)
    factor = int(scale)
    if factor < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if factor > 1:
        pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(image: np.ndarray, scale: int | None = None) -> str:
    """A `data:image/png;base64,…` URI of an H×W×C (or H×W) image in [0, 1] (`png_bytes`).

    `scale` is the integer nearest-neighbour upscaling factor; by default
    `display_scale(H, W)`, so an 8×8 digit becomes 112×112 and a 32×32 image 96×96.
    """
    shape = np.shape(image)
    if len(shape) < 2:
        _as_hwc(np.asarray(image))  # raises the shape error
    factor = display_scale(shape[0], shape[1]) if scale is None else scale
    data = png_bytes(image, factor)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def amplified_difference(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """`0.5 + (adv - clean) / (2 max|adv - clean|)`: the perturbation stretched to [0, 1].

    Mid-grey means no change, white the largest increase and black the largest decrease
    (per channel, so colour shows which channel moved). Identical images give uniform grey.
    """
    a = _as_hwc(clean)
    b = _as_hwc(adv)
    if a.shape != b.shape:
        raise ValueError(f"clean and adversarial shapes differ: {a.shape} vs {b.shape}")
    delta = b - a
    peak = float(np.abs(delta).max())
    shape = np.shape(clean)
    if peak == 0.0:
        return np.full(shape, 0.5)
    stretched: np.ndarray = 0.5 + delta / (2.0 * peak)
    return stretched.reshape(shape)
