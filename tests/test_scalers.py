"""Named resizers: recovered coefficients reproduce every library call; metrics and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.attacks.scalers import (
    SCALERS,
    as_pixels,
    coefficient_error,
    coefficients,
    get_scaler,
    psnr,
)
from bastion.errors import ConfigError, InvalidInputError


@pytest.mark.parametrize("name", sorted(SCALERS))
@pytest.mark.parametrize(("src", "dst"), [((128, 96), (32, 24)), ((101, 75), (33, 20))])
def test_coefficients_reproduce_the_scaler_on_float32(name: str, src, dst) -> None:  # type: ignore[no-untyped-def]
    assert coefficient_error(name, src, dst) < 1e-3


@pytest.mark.parametrize("name", sorted(SCALERS))
def test_uint8_path_is_the_float_model_up_to_rounding(name: str) -> None:
    img = np.random.default_rng(1).integers(0, 256, (64, 48, 3)).astype(np.uint8)
    cl, cr = coefficients(name, (64, 48), (16, 12))
    model = np.clip(np.stack([cl @ img[..., c] @ cr for c in range(3)], axis=-1), 0, 255)
    out = get_scaler(name)(img, (16, 12))
    assert out.dtype == np.uint8 and out.shape == (16, 12, 3)
    # one rounding of the result, plus Pillow's uint8 intermediate between its two passes
    assert np.abs(out - model).max() <= 1.0 + 1e-6


def test_torch_aa_is_torchvision_resize() -> None:
    import torch
    from torchvision.transforms.v2 import functional as TF

    img = np.random.default_rng(2).uniform(0, 1, (90, 70, 3)).astype(np.float32)
    ours = get_scaler("torch.bilinear-aa")(img, (30, 20))
    theirs = TF.resize(torch.from_numpy(img.transpose(2, 0, 1)), [30, 20], antialias=True)
    assert np.abs(ours - theirs.numpy().transpose(1, 2, 0)).max() < 1e-5


def test_coefficients_are_cached_per_sizes_and_read_only() -> None:
    a = coefficients("cv2.linear", (64, 64), (16, 16))
    assert coefficients("cv2.linear", (64, 64), (16, 16))[0] is a[0]
    assert coefficients("cv2.linear", (64, 64), (16, 32))[1].shape == (64, 32)
    assert not a[0].flags.writeable
    np.testing.assert_allclose(a[0].sum(axis=1), 1.0)


def test_vulnerable_and_robust_coefficients_as_quiring_describes() -> None:
    """β = 4: nearest reads 1/4 of the lines, linear 1/2 with weight 0.5, area all of them."""
    near, lin, area = (
        coefficients(n, (64, 64), (16, 16))[0]
        for n in SCALERS
        if n in ("cv2.nearest", "cv2.linear", "cv2.area")
    )
    assert (near.sum(0) > 0).mean() == 0.25 and near.max() == 1.0
    assert (lin.sum(0) > 0).mean() == 0.5 and lin.max() == pytest.approx(0.5)
    assert (area.sum(0) > 0).mean() == 1.0 and area.max() == pytest.approx(0.25)


def test_more_than_four_channels_resize_per_channel() -> None:
    img = np.random.default_rng(3).uniform(0, 1, (40, 40, 6)).astype(np.float32)
    out = get_scaler("cv2.linear")(img, (10, 10))
    np.testing.assert_allclose(out[..., 5], get_scaler("cv2.linear")(img[..., 5], (10, 10)))


def test_psnr() -> None:
    a = np.random.default_rng(0).uniform(0, 255, (60, 80, 3))
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(10 * np.log10(255**2))


def test_as_pixels_takes_uint8_and_unit_floats_only() -> None:
    assert as_pixels(np.full((4, 5), 255, np.uint8)).shape == (4, 5, 1)
    assert as_pixels(np.ones((4, 5, 3))).max() == 255
    for bad, msg in [
        (np.full((4, 4), np.nan), "NaN"),
        (np.full((4, 4), 2.0), r"\[0, 1\]"),
        (np.zeros((4, 4), np.int32), "dtype"),
        (np.zeros((1, 4, 4, 3)), "H×W"),
    ]:
        with pytest.raises(InvalidInputError, match=msg):
            as_pixels(bad)


def test_unknown_scaler_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cv2.linear"):
        get_scaler("cv2.bilinear")
