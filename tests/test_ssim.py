"""SSIM in threaded row bands equals scikit-image's definition, in colour and grey."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from bastion.attacks.ssim import ssim, ssims
from bastion.errors import InvalidInputError


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 255, shape)
    return a, np.clip(a + rng.normal(0, 25, a.shape), 0, 255)


@pytest.mark.parametrize(
    ("shape", "scale"),
    [
        ((60, 80, 3), 1.0),
        ((203, 150, 3), 1.0),
        ((11, 40), 1.0),
        ((150, 97), 1.0),
        ((90, 70, 3), 0.02),
    ],
)
def test_ssim_matches_scikit_image(shape: tuple[int, ...], scale: float) -> None:
    a, b = _pair(shape)
    a, b = a * scale, b * scale  # dark images: the stabilising constants C1, C2 dominate
    ref = structural_similarity(
        a,
        b,
        channel_axis=2 if len(shape) == 3 else None,
        gaussian_weights=True,
        sigma=1.5,
        data_range=255,
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-5)


def test_ssim_is_the_same_on_one_thread_and_many() -> None:
    a, b = _pair((300, 120, 3), seed=1)
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        serial = ssim(a, b)
        cv2.setNumThreads(4)
        parallel = ssim(a, b)
    finally:
        cv2.setNumThreads(threads)
    assert serial == parallel
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssims_shares_the_reference_without_changing_the_values() -> None:
    a, b = _pair((150, 90, 3), seed=2)
    c = np.clip(a[::-1] * 0.5 + 40, 0, 255)
    assert ssims(a, [b, c, a]) == [ssim(a, b), ssim(a, c), ssim(a, a)]


def test_ssim_rejects_mismatched_or_tiny_images() -> None:
    a, b = _pair((40, 40, 3))
    with pytest.raises(InvalidInputError, match="one shape"):
        ssim(a, b[:, :30])
    with pytest.raises(InvalidInputError, match="one shape"):
        ssims(a, [b, b[:, :30]])
    with pytest.raises(InvalidInputError, match="at least 11×11"):
        ssim(a[:10], b[:10])
