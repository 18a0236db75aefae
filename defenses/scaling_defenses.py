"""Quiring et al.'s defenses against image-scaling attacks (USENIX Security 2020, §5).

* `scaling_advice`: is a (scaler, sizes) pair vulnerable, and which robust scaler to use
  instead (area scaling, Pillow's or torch's antialiased kernels);
* `selective_median_filter` / `selective_random_filter`: reconstruct the pixels P the
  scaler actually reads from their neighbours outside P, so that an embedded target is
  wiped out before the usual resize.
Images as in `bastion.attacks.scalers.as_pixels`; filters return the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch

from bastion.attacks.scalers import Size, as_pixels, coefficients, get_scaler
from bastion.attacks.scaling import ScalingAttack
from bastion.errors import ConfigError

_ROBUST = {
    "cv2.nearest": "cv2.area",
    "cv2.linear": "cv2.area",
    "cv2.cubic": "cv2.area",
    "cv2.lanczos4": "cv2.area",
    "pil.nearest": "pil.bilinear",
    "torch.nearest": "torch.area",
    "torch.bilinear": "torch.bilinear-aa",
    "torch.bicubic": "torch.bicubic-aa",
}


@dataclass(frozen=True)
class ScalingAdvice:
    """Coefficient statistics of a downscale (Quiring §4) and the advice drawn from them.

    Per axis (rows, cols): `ratio` β = source/target, `used_fraction` of source lines with
    non-zero weight, `max_weight` of one source line in one output. `vulnerable` when on
    some axis β·max_weight ≥ 1.5 (a few lines carry the output: an attack only has to
    change those); robust scalers average ≈ β lines (β·max_weight ≈ 1).
    """

    scaler: str
    ratio: tuple[float, float]
    used_fraction: tuple[float, float]
    max_weight: tuple[float, float]
    vulnerable: bool
    alternative: str | None

    @property
    def message(self) -> str:
        if not self.vulnerable:
            return f"{self.scaler} averages every source pixel at this ratio: robust"
        alt = self.alternative or "an area or antialiased scaler"
        return f"{self.scaler} reads only a few source pixels per output: vulnerable; use {alt}"


def scaling_advice(scaler: str, src: Size, dst: Size) -> ScalingAdvice:
    """Whether resizing `src` → `dst` with `scaler` invites scaling attacks (Quiring §3.5.1)."""
    name = get_scaler(scaler).name
    cl, cr = coefficients(name, src, dst)
    axes = (np.abs(cl), np.abs(cr.T))  # both as outputs × source lines
    ratio = (src[0] / dst[0], src[1] / dst[1])
    used = tuple(float((a.sum(axis=0) > 0).mean()) for a in axes)
    peak = tuple(float(a.max()) for a in axes)
    vulnerable = any(r * p >= 1.5 for r, p in zip(ratio, peak, strict=True))
    return ScalingAdvice(
        name,
        ratio,
        (used[0], used[1]),
        (peak[0], peak[1]),
        vulnerable,
        _ROBUST.get(name) if vulnerable else None,
    )


def used_pixels(
    scaler: str, src: Size, dst: Size, method: Literal["attack", "mass"] = "attack"
) -> np.ndarray:
    """Boolean src-sized mask P of the pixels the scaler reads (Quiring §5.2).

    "attack" (the paper): attack an all-255 image towards an all-100 target with ε = 1 and
    mark the pixels that changed. "mass": source pixels whose row and column both carry
    non-zero coefficient mass (faster; marks a superset).
    """
    if method == "mass":
        cl, cr = coefficients(scaler, src, dst)
        return np.outer(np.abs(cl).sum(axis=0) > 0, np.abs(cr).sum(axis=1) > 0)
    if method != "attack":
        raise ConfigError(f"method must be 'attack' or 'mass', got {method!r}")
    white = np.full(src, 255, np.uint8)
    res = ScalingAttack(scaler, eps=1.0)(white, np.full(dst, 100, np.uint8))
    return res.attack != 255


def _reconstruct(
    image: np.ndarray,
    scaler: str,
    size: Size,
    bandwidth: float,
    method: Literal["attack", "mass"],
    pick: str,
    seed: int,
) -> np.ndarray:
    img = as_pixels(image)
    h, w, c = img.shape
    if not bandwidth > 0:
        raise ConfigError(f"bandwidth must be positive, got {bandwidth}")
    mask = used_pixels(scaler, (h, w), size, method)
    bv, bh = int(h / size[0] / bandwidth), int(w / size[1] / bandwidth)
    win = (2 * bv + 1, 2 * bh + 1)
    padded = np.pad(img, ((bv, bv), (bh, bh), (0, 0)))
    valid = np.pad(~mask, ((bv, bv), (bh, bh)))  # outside the image counts as in P
    views = np.lib.stride_tricks.sliding_window_view(padded, win, axis=(0, 1))
    okviews = np.lib.stride_tricks.sliding_window_view(valid, win, axis=(0, 1))
    rows, cols = np.nonzero(mask)
    out = img.copy()
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // (c * win[0] * win[1]))
    for k in range(0, rows.size, chunk):
        r, q = rows[k : k + chunk], cols[k : k + chunk]
        vals = views[r, q].reshape(r.size, c, -1)  # (pixels, channels, window)
        ok = okviews[r, q].reshape(r.size, -1)
        count = ok.sum(axis=1)
        if pick == "median":  # lower middle of the valid values, per channel
            srt = np.sort(np.where(ok[:, None, :], vals, np.inf), axis=2)
            idx = np.maximum(count - 1, 0) // 2
            new = np.take_along_axis(srt, idx[:, None, None].repeat(c, 1), axis=2)[..., 0]
        else:  # one uniformly drawn valid pixel of the window, all channels alike
            rank = np.floor(rng.random(r.size) * count)
            idx = np.argmax(np.cumsum(ok, axis=1) > rank[:, None], axis=1)
            new = np.take_along_axis(vals, idx[:, None, None].repeat(c, 1), axis=2)[..., 0]
        has = count > 0  # a window with no pixel outside P keeps its value
        out[r[has], q[has]] = new[has]
    res = out[..., 0] if image.ndim == 2 else out
    return np.round(res).astype(np.uint8) if image.dtype == np.uint8 else res / 255.0


def selective_median_filter(
    image: np.ndarray,
    scaler: str,
    size: Size,
    *,
    bandwidth: float = 1.0,
    method: Literal["attack", "mass"] = "attack",
) -> np.ndarray:
    """Quiring's median reconstruction: every pixel in P becomes the median of its window.

    The window spans ±⌊β/bandwidth⌋ pixels per axis (clipped to the image) and excludes
    every pixel of P; for an even count the lower middle value is taken. Per channel.
    """
    return _reconstruct(image, scaler, size, bandwidth, method, "median", 0)


def selective_random_filter(
    image: np.ndarray,
    scaler: str,
    size: Size,
    *,
    bandwidth: float = 1.0,
    method: Literal["attack", "mass"] = "attack",
    seed: int = 0,
) -> np.ndarray:
    """Quiring's random reconstruction: every pixel in P becomes a random window pixel ∉ P.

    Deviation: the reference redraws up to window-size times per pixel and gives up; we
    draw exactly uniformly among the valid pixels, and take one pixel for all channels.
    """
    return _reconstruct(image, scaler, size, bandwidth, method, "random", seed)


def scaling_audit(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scaler: str,
    *,
    ratio: int = 4,
    pairs: int = 8,
    eps: float = 1.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """What `scaler` in front of `model` exposes, measured on the model's own images.

    `images` (N×C×H×W in [0, 1], the model's input size, N ≥ 4) are upscaled ×`ratio`
    (OpenCV cubic) into benign high-resolution sources. For `pairs` (source, target) pairs
    of different predicted classes the QP attack hides the target; the audit reports the
    attack's success (the model reads the target's class from the scaled attack image),
    its PSNR/SSIM to the source, the success left after Quiring's selective median
    filter and that filter's cost on benign images (agreement with the undefended
    prediction), Decamouflage's detection rate and false-positive rate (black-box
    thresholds calibrated on one half of the benign sources, rates on the attacks and the
    other half), and `scaling_advice`.
    """
    from bastion.attacks.scaling import classify
    from bastion.defenses.decamouflage import Decamouflage
    from bastion.validation import check_images

    check_images(images)
    if images.shape[0] < 4 or ratio < 2 or pairs < 1:
        raise ConfigError("the audit needs at least 4 images, ratio >= 2 and pairs >= 1")
    s = get_scaler(scaler)
    x = images.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)
    h, w = x.shape[1:3]
    small = [np.round(img * 255).astype(np.uint8) for img in x]
    big = [_upscale(img, (ratio * h, ratio * w)) for img in small]
    preds = classify(model, [img / 255.0 for img in small])
    rng = np.random.default_rng(seed)
    attack = ScalingAttack(s.name, eps=eps)
    rows: list[dict[str, Any]] = []
    attack_images = []
    for k, i in enumerate(rng.permutation(len(big))[:pairs]):
        others = [j for j in rng.permutation(len(big)) if preds[j] != preds[i]]
        j = int(others[0]) if others else int((i + 1) % len(big))
        res = attack(big[i], small[j], model=model, target_label=preds[j])
        cleaned = selective_median_filter(res.attack, s.name, (h, w))
        after = classify(model, [_as_hwc(s(cleaned, (h, w))) / 255.0])[0]
        rows.append({**res.metrics(), "success_after_median": after == preds[j]})
        attack_images.append(res.attack)
        if progress is not None:
            progress(k + 1, pairs)
    before = classify(model, [_as_hwc(s(b, (h, w))) / 255.0 for b in big])
    filtered = [_as_hwc(s(selective_median_filter(b, s.name, (h, w)), (h, w))) for b in big]
    agree = np.mean(np.array(classify(model, [f / 255.0 for f in filtered])) == np.array(before))
    det = Decamouflage(s.name, (h, w)).calibrate(big[0::2])
    advice = scaling_advice(s.name, (ratio * h, ratio * w), (h, w))
    return {
        "scaler": s.name,
        "input_size": [h, w],
        "source_size": [ratio * h, ratio * w],
        "pairs": len(rows),
        "attack_success_rate": float(np.mean([r["success"] for r in rows])),
        "psnr_source": float(np.mean([r["psnr_source"] for r in rows])),
        "ssim_source": float(np.mean([r["ssim_source"] for r in rows])),
        "psnr_target": float(np.mean([min(r["psnr_target"], 99.0) for r in rows])),
        "success_after_median": float(np.mean([r["success_after_median"] for r in rows])),
        "median_benign_agreement": float(agree),
        "detection_rate": float(det.detect(attack_images).mean()),
        "false_positive_rate": float(det.detect(big[1::2]).mean()),
        "vulnerable": advice.vulnerable,
        "advice": advice.message,
        "attacks": rows,
    }


def _as_hwc(img: np.ndarray) -> np.ndarray:
    return (img[..., None] if img.ndim == 2 else img).astype(np.float64)


def _upscale(img: np.ndarray, size: Size) -> np.ndarray:
    out = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return out.reshape(*size, img.shape[2])
