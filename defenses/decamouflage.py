"""Decamouflage (Kim et al., arXiv 2010.03735): three detectors of image-scaling attack images.

Each looks at the large image A before the deployment's resize:
* rescaling — A against A scaled down to the model size and back up with the deployment
  scaler (`rescale_mse`, `rescale_ssim`): an attack image comes back as the upscaled target;
* filtering — A against its 3×3 minimum filter (`filter_mse`, `filter_ssim`): the filter
  wipes out the sparse embedded target pixels;
* steganalysis — `csp`, the number of bright blobs ("centred spectrum points") in the
  centred log spectrum: the embedded target repeats the spectrum periodically.
A detector flags an image when both its scores pass their thresholds (`combine="all"`,
our default) or when either does (`combine="any"`, the spec's reading of the paper); the
ensemble is the majority vote of the three detectors. MSE is the mean over pixels *and
channels* on the 0–255 scale (the reference code sums over channels and divides by H·W,
so a grey image saved as RGB scored 3× its grey self); SSIM as scikit-image with Gaussian
weights σ = 1.5, averaged over channels. A grey image and the same pixels as RGB get the
same scores and verdict.

Thresholds hold only for images about as much larger than the model input as the images
they were calibrated on: the built-in ones are calibrated on photos 4× the input
(`source_ratio`), and a calibration records the range of its benign images' ratios.
`score` refuses images whose size ratio lies beyond that range by more than 1.5× (at the
model's own size, for one, a detailed photo is a false positive); build the detector with
`source_ratio=` the images' ratio, or calibrate on benign images of their size.

Deviations: `combine="all"` by default — on held-out photos the MSE scores of detailed
benign images pass black-box thresholds that SSIM does not (docs/scaling.md: ensemble
false-positive rate 25 % with "any", 0 % with "all", same detection rate); no JPEG round
trips (the reference writes filtered images and spectra as JPEG); the spectrum is
normalised to a 896×896 image (`|F|·896²/(H·W)`) so the fixed threshold 250 keeps its
meaning at every size (§4.6 of our spec); the built-in thresholds are a black-box
calibration on photos bundled with scikit-image and scikit-learn.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import cv2
import numpy as np
import scipy.fft

from bastion.attacks.scalers import Size, as_pixels, get_scaler
from bastion.attacks.ssim import ssim, ssims
from bastion.errors import ConfigError, DataError
from bastion.fileio import write_atomic

SCORES = ("rescale_mse", "rescale_ssim", "filter_mse", "filter_ssim", "csp")
_ATTACK_IF_LOW = frozenset({"rescale_ssim", "filter_ssim"})  # the others: attack if high
DETECTORS = {
    "rescaling": ("rescale_mse", "rescale_ssim"),
    "filtering": ("filter_mse", "filter_ssim"),
    "steganalysis": ("csp",),
}
_FORMAT = "bastion-decamouflage/1"
_SPECTRUM_REF = 896 * 896
BUILTIN_RATIO = 4.0
"""Source-to-input size ratio of the photos the built-in thresholds are calibrated on."""
RATIO_TOLERANCE = 1.5
"""Images up to this factor beyond the calibrated size ratios are scored."""


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(cv2.norm(a, b, cv2.NORM_L2SQR) / a.size)


def size_ratio(image: np.ndarray, size: Size) -> float:
    """How many times larger than the model input `size` (rows, cols) an image is: the
    geometric mean of the row and column ratios."""
    return float(np.sqrt(image.shape[0] / size[0] * image.shape[1] / size[1]))


def csp_count(image: np.ndarray) -> int:
    """Centred spectrum points of an H×W×C float image on 0–255 (Decamouflage steganalysis)."""
    img = image.astype(np.float32, copy=False)
    grey = img[..., 0] if img.shape[2] == 1 else cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)
    # 20·ln|F| > 250 with |F| normalised to a 896² image, on the real FFT's half spectrum;
    # the other half is its point mirror (F(−u, −v) = conj F(u, v) for a real image).
    half = scipy.fft.rfft2(grey, workers=max(1, cv2.getNumThreads()))
    bright = np.abs(half) > np.exp(250 / 20) * grey.size / _SPECTRUM_REF
    h, w = grey.shape
    mirror = bright[(-np.arange(h)) % h][:, w - np.arange(w // 2 + 1, w)]
    spectrum = np.concatenate([bright, mirror], axis=1)
    binary = np.roll(spectrum, (h // 2, w // 2), axis=(0, 1)).astype(np.uint8) * 255  # fftshift
    blurred = cv2.GaussianBlur(cv2.medianBlur(binary, 3), (21, 21), 0)
    contours, _ = cv2.findContours(blurred, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return len(contours)


def _rescaled(a: np.ndarray, scaler: str, size: Size) -> np.ndarray:
    s = get_scaler(scaler)
    return s(s(a, size), a.shape[:2])


def _min_filtered(a: np.ndarray) -> np.ndarray:
    return cv2.erode(a, np.ones((3, 3), np.uint8)).reshape(a.shape)


def rescale_scores(a: np.ndarray, scaler: str, size: Size) -> tuple[float, float]:
    """MSE and SSIM of A (H×W×C, 0–255) against A scaled to `size` and back."""
    back = _rescaled(a, scaler, size)
    return _mse(a, back), ssim(a, back)


def filter_scores(a: np.ndarray) -> tuple[float, float]:
    """MSE and SSIM of A (H×W×C, 0–255) against its 3×3 minimum filter."""
    low = _min_filtered(a)
    return _mse(a, low), ssim(a, low)


@functools.lru_cache(maxsize=1)
def _spectrum_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="bastion-decamouflage")


def image_scores(image: np.ndarray, scaler: str, size: Size) -> dict[str, float]:
    """The five Decamouflage scores of one image (uint8 or float in [0, 1]).

    The steganalysis runs in a thread beside the two SSIMs, which share A's local means
    (OpenCV and scipy's FFT release the GIL).
    """
    a = as_pixels(image, dtype=np.float32)
    csp = _spectrum_thread().submit(csp_count, a)
    back, low = _rescaled(a, scaler, size), _min_filtered(a)
    rescale_ssim, filter_ssim = ssims(a, [back, low])
    return {
        "rescale_mse": _mse(a, back),
        "rescale_ssim": rescale_ssim,
        "filter_mse": _mse(a, low),
        "filter_ssim": filter_ssim,
        "csp": float(csp.result()),
    }


def _flags(scores: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    return {
        k: scores[k] < thresholds[k] if k in _ATTACK_IF_LOW else scores[k] > thresholds[k]
        for k in SCORES
    }


def _best_threshold(benign: np.ndarray, attacks: np.ndarray, low: bool) -> float:
    """The cut with the highest accuracy on the labelled scores (a sorted sweep)."""
    values = np.unique(np.concatenate([benign, attacks]))
    cuts = np.concatenate([[values[0] - 1], (values[1:] + values[:-1]) / 2, [values[-1] + 1]])
    sign = -1 if low else 1
    correct = [(sign * benign <= sign * c).sum() + (sign * attacks > sign * c).sum() for c in cuts]
    return float(cuts[int(np.argmax(correct))])


def bundled_photos() -> list[np.ndarray]:
    """RGB photos shipped with scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "rocket", "retina")
    photos = [getattr(data, n)() for n in names]
    photos += [data.immunohistochemistry(), data.stereo_motorcycle()[0]]
    photos += [np.stack([data.camera()] * 3, axis=-1), *load_sample_images().images]
    return photos


@functools.lru_cache(maxsize=16)
def builtin_thresholds(
    scaler: str, size: Size, percentile: float = 99.0, ratio: float = BUILTIN_RATIO
) -> dict[str, float]:
    """Black-box thresholds from bundled photos (flipped, cropped) resized to `ratio`×`size`."""
    big = (max(1, round(ratio * size[0])), max(1, round(ratio * size[1])))
    benign = []
    for p in bundled_photos():
        h, w = p.shape[:2]
        for img in (p, p[:, ::-1], p[: h * 3 // 4, w // 4 :]):
            benign.append(
                cv2.resize(np.ascontiguousarray(img), big[::-1], interpolation=cv2.INTER_AREA)
            )
    det = Decamouflage(scaler, size, thresholds={})
    return det.calibrate(benign, percentile=percentile).thresholds


class Decamouflage:
    """Detector of image-scaling attacks against `scaler` resizing to `size` = (rows, cols).

    `combine` joins the two scores of the rescaling and filtering detectors ("all": both
    must flag; "any": either). `calibrate(benign, attacks=None)`: white-box (the
    best-accuracy threshold per score on labelled images) when attack images are given,
    black-box otherwise (the benign `percentile`; CSP never below the paper's fixed 1).
    Without calibration, `thresholds` are the built-in black-box ones (computed on first
    use, a few seconds at 224²) for images `source_ratio` (default 4) times the input size.
    `score` refuses images whose size ratio the thresholds do not cover (module docstring).
    Images: a sequence of H×W(×C) arrays (uint8, or float in [0, 1]) or one N×H×W×C array.
    """

    def __init__(
        self,
        scaler: str = "cv2.linear",
        size: Size | int = (224, 224),
        *,
        thresholds: dict[str, float] | None = None,
        combine: Literal["all", "any"] = "all",
        source_ratio: float = BUILTIN_RATIO,
        ratio_range: tuple[float, float] | None = None,
    ) -> None:
        if combine not in ("all", "any"):
            raise ConfigError(f"combine must be 'all' or 'any', got {combine!r}")
        if not (np.isfinite(source_ratio) and source_ratio >= 1):
            raise ConfigError(f"source_ratio must be a number >= 1, got {source_ratio}")
        self.source_ratio = float(source_ratio)
        self.combine = combine
        self.scaler = get_scaler(scaler).name
        rows, cols = (size, size) if isinstance(size, int) else size
        if rows < 1 or cols < 1:
            raise ConfigError(f"size must be positive, got {size}")
        self.size: Size = (int(rows), int(cols))
        self.mode = "built-in" if thresholds is None else "given"
        self._thresholds = None if thresholds is None else dict(thresholds)
        builtin = (self.source_ratio, self.source_ratio) if thresholds is None else None
        self.ratio_range: tuple[float, float] | None = ratio_range or builtin
        """Size ratios of the calibration images (None: unknown, nothing is refused)."""

    @property
    def thresholds(self) -> dict[str, float]:
        """Threshold per score (an image is flagged by a score beyond it)."""
        if self._thresholds is None:
            self._thresholds = dict(
                builtin_thresholds(self.scaler, self.size, ratio=self.source_ratio)
            )
        return self._thresholds

    def check_ratio(self, images: Sequence[np.ndarray] | np.ndarray) -> None:
        """Raise `ConfigError` for the first image whose size ratio to the input lies more
        than `RATIO_TOLERANCE`× beyond the ratios the thresholds were calibrated on."""
        if self.ratio_range is None:
            return
        lo, hi = self.ratio_range[0] / RATIO_TOLERANCE, self.ratio_range[1] * RATIO_TOLERANCE
        for i, img in enumerate(images):
            r = size_ratio(img, self.size)
            if not lo <= r <= hi:
                cal = "×–".join(f"{v:.2g}" for v in sorted(set(self.ratio_range)))
                raise ConfigError(
                    f"image {i} ({img.shape[0]}×{img.shape[1]}) is {r:.2g}× the model input "
                    f"{self.size[0]}×{self.size[1]}, but the {self.mode} thresholds hold for "
                    f"images {cal}× the input ({lo:.2g}×–{hi:.2g}× accepted); calibrate them "
                    f"on benign images of this size (or, in Python, pass source_ratio={r:.2g})"
                )

    def score(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Each score for every image: name → array of N floats (`check_ratio` first)."""
        self.check_ratio(images)
        return self._score(images, progress)

    def _score(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        rows = []
        for i, img in enumerate(images):
            rows.append(image_scores(img, self.scaler, self.size))
            if progress is not None:
                progress(i + 1, len(images))
        return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in SCORES}

    def decide(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-score, per-detector and `ensemble` (majority of three) boolean verdicts."""
        flags = _flags(scores, self.thresholds)
        join = np.logical_and if self.combine == "all" else np.logical_or
        out = {name: join.reduce([flags[k] for k in ks]) for name, ks in DETECTORS.items()}
        out["ensemble"] = np.sum([out[name] for name in DETECTORS], axis=0) >= 2
        return {**flags, **out}

    def detect(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """True for every image the ensemble takes for an attack image."""
        return self.decide(self.score(images))["ensemble"]

    def calibrate(
        self,
        benign: Sequence[np.ndarray] | np.ndarray,
        attacks: Sequence[np.ndarray] | np.ndarray | None = None,
        *,
        percentile: float = 99.0,
    ) -> Decamouflage:
        """Set the thresholds from benign images (and attack images: white-box); returns self."""
        if len(benign) < 1 or (attacks is not None and len(attacks) < 1):
            raise DataError("calibration needs at least one benign (and one attack) image")
        if not 50 <= percentile <= 100:
            raise ConfigError(f"percentile must lie in [50, 100], got {percentile}")
        b = self._score(benign)
        ratios = [size_ratio(img, self.size) for img in benign]
        if attacks is None:
            t = {
                k: float(
                    np.percentile(b[k], 100 - percentile if k in _ATTACK_IF_LOW else percentile)
                )
                for k in SCORES
            }
            t["csp"] = max(t["csp"], 1.0)
            self.mode = "black-box"
        else:
            a = self._score(attacks)
            t = {k: _best_threshold(b[k], a[k], k in _ATTACK_IF_LOW) for k in SCORES}
            self.mode = "white-box"
        self._thresholds = t
        self.ratio_range = (min(ratios), max(ratios))
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "scaler": self.scaler,
            "size": list(self.size),
            "mode": self.mode,
            "combine": self.combine,
            "thresholds": self.thresholds,
            "ratio_range": None if self.ratio_range is None else list(self.ratio_range),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the thresholds with the scaler and size they belong to as JSON."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        scaler: str | None = None,
        size: Size | int | None = None,
    ) -> Decamouflage:
        """The detector saved in `path`; refuses it when `scaler`/`size` are given and differ."""
        try:
            d = json.loads(open(path, encoding="utf-8").read())
            ok = d.get("format") == _FORMAT and set(d["thresholds"]) == set(SCORES)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"cannot read thresholds from {path}: {exc}") from None
        if not ok:
            raise DataError(f"{path} is not a Decamouflage threshold file; make one with calibrate")
        det = cls(
            d["scaler"],
            tuple(d["size"]),
            thresholds=d["thresholds"],
            combine=d.get("combine", "all"),
            ratio_range=tuple(d["ratio_range"]) if d.get("ratio_range") else None,
        )
        det.mode = d.get("mode", "given")
        want = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        if (scaler is not None and get_scaler(scaler).name != det.scaler) or (
            want is not None and want != det.size
        ):
            raise ConfigError(
                f"{path} was calibrated for {det.scaler} at {det.size[0]}×{det.size[1]}, not for "
                f"{scaler or det.scaler} at {want[0] if want else det.size[0]}×"
                f"{want[1] if want else det.size[1]}; calibrate thresholds for this deployment"
            )
        return det
