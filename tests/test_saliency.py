"""SIFT features: keypoint coordinates, the saliency distribution and the partition of pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bastion.attacks.saliency import INFLATION, features, sift_keypoints
from bastion.errors import InvalidInputError


def _blob(h: int, w: int, row: float, col: float, sigma: float = 2.5) -> np.ndarray:
    rr, cc = np.mgrid[0:h, 0:w]
    return np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2))


def test_keypoints_are_column_row_not_transposed() -> None:
    # one blob on a wide image: the strongest keypoint and the saliency peak are at the
    # blob, read as (column, row) — the transposed DLV map would put them at (row, col)
    img = _blob(40, 64, row=12, col=45)
    kps, scale = sift_keypoints(img)
    assert scale == INFLATION  # shorter side below 50 px: enlarged before SIFT
    col, row = kps[kps[:, 3].argmax(), :2]
    assert abs(col - 45) < 2 and abs(row - 12) < 2
    f = features(img)
    peak = np.unravel_index(f.saliency.argmax(), f.saliency.shape)
    assert abs(peak[0] - 12) <= 2 and abs(peak[1] - 45) <= 2


def test_large_images_are_not_enlarged() -> None:
    img = _blob(64, 64, row=30, col=20, sigma=4)
    kps, scale = sift_keypoints(img)
    assert scale == 1 and len(kps)


def test_distributions_and_partition_are_consistent(digits) -> None:  # type: ignore[no-untyped-def]
    for img in digits.x[:10]:
        f = features(img)
        assert not f.grid and f.count >= 1
        assert f.partition.shape == (8, 8)
        assert set(np.unique(f.partition)) == set(range(f.count))  # every feature owns pixels
        assert f.saliency.sum() == pytest.approx(1.0) and (f.saliency >= 0).all()
        assert f.player_one.sum() == pytest.approx(1.0)
        sums = np.bincount(f.partition.ravel(), weights=f.player_two.ravel())
        np.testing.assert_allclose(sums, 1.0)
        # each pixel belongs to the keypoint with the largest radial normal pdf there
        r, c = 3, 5
        kp = f.keypoints
        sq = (kp[:, 0] - c) ** 2 + (kp[:, 1] - r) ** 2
        sigma = np.maximum(kp[:, 2], 0.5)
        pdf = np.exp(-sq / (2 * sigma**2)) / sigma
        assert pdf[f.partition[r, c]] == pytest.approx(pdf.max())


def test_uniform_image_falls_back_to_a_grid() -> None:
    f = features(torch.full((1, 8, 8), 0.5))
    assert f.grid and f.count == 16
    assert np.bincount(f.partition.ravel()).tolist() == [4] * 16
    np.testing.assert_allclose(f.player_one, 1 / 16)


def test_colour_images_use_all_channels() -> None:
    """A blob in any one channel alone is found where it is (a reader of one channel would
    see a blank image for the other two and fall back to the grid), and a colour image has
    the features of its channel mean."""
    blob = _blob(32, 32, row=10, col=20)
    for c in range(3):
        channels = [np.zeros_like(blob)] * 3
        channels[c] = blob
        f = features(torch.from_numpy(np.stack(channels)).float())
        assert not f.grid and f.partition.shape == (32, 32)
        col, row = f.keypoints[f.keypoints[:, 3].argmax(), :2]
        assert abs(col - 20) < 2 and abs(row - 10) < 2, (c, col, row)
    colour = np.stack([blob, 0.5 * blob, _blob(32, 32, row=24, col=8)], axis=-1)
    mixed, grey = features(colour), features(colour.mean(axis=2))
    np.testing.assert_allclose(mixed.keypoints, grey.keypoints)
    assert np.array_equal(mixed.partition, grey.partition)


def test_bad_images_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        features(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InvalidInputError):
        features(np.full((8, 8), np.nan))
    with pytest.raises(InvalidInputError):
        sift_keypoints(np.zeros((8, 8)), scale=0)
