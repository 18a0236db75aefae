"""Image-scaling attacks (Xiao 2019 / Quiring 2020): the QP hits the target, robust scalers
cost more distortion, the reconstruction defenses remove the target, errors are clear."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.sparse as sp
from skimage import data

from bastion.attacks.scalers import get_scaler, psnr
from bastion.attacks.scaling import PenaltyScalingAttack, ScalingAttack, solve_box_qp
from bastion.cli import main
from bastion.defenses.scaling_defenses import (
    scaling_advice,
    scaling_audit,
    selective_median_filter,
    selective_random_filter,
    used_pixels,
)
from bastion.errors import ConfigError, InvalidInputError


def _pair(big: int, small: int) -> tuple[np.ndarray, np.ndarray]:
    """Spec §3.4: coffee as the source, chelsea as the target."""
    src = cv2.resize(data.coffee(), (big, big), interpolation=cv2.INTER_AREA)
    return src, cv2.resize(data.chelsea(), (small, small), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    return _pair(128, 32)


def _slack(c: np.ndarray, u: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Both sides of |c·u − t0| ≤ 1/255 as non-negative slacks."""
    return np.r_[1 / 255 - (c @ u - t0), 1 / 255 + (c @ u - t0)]


def test_dual_solver_finds_the_qp_optimum() -> None:
    """Against SLSQP on small random box-constrained least-norm problems."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    c = rng.uniform(0, 1, (4, 12)) * (rng.uniform(size=(4, 12)) < 0.5)
    c /= c.sum(1, keepdims=True)
    start = rng.uniform(0, 255, (12, 3))
    target = c @ rng.uniform(0, 255, (12, 3))  # feasible by construction
    x, _, ok = solve_box_qp(sp.csr_matrix(c), start, target, 1.0, tol=1e-5, max_iterations=50000)
    assert ok
    for j in range(3):  # SLSQP on the same problem in [0, 1] units (it is better scaled)
        s0, t0 = start[:, j] / 255, target[:, j] / 255
        lin = {"type": "ineq", "jac": lambda u: np.vstack([-c, c])}
        ref = minimize(
            lambda u, s0=s0: 0.5 * np.sum((u - s0) ** 2),
            np.clip(s0, 0, 1),
            jac=lambda u, s0=s0: u - s0,
            bounds=[(0, 1)] * 12,
            constraints=[
                {
                    **lin,
                    "fun": lambda u, t0=t0: np.r_[1 / 255 - (c @ u - t0), 1 / 255 + (c @ u - t0)],
                }
            ],
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        assert ref.success
        assert np.abs(c @ x[:, j] - target[:, j]).max() <= 1.0 + 1e-4
        ours = 0.5 * np.sum((x[:, j] - start[:, j]) ** 2)
        assert ours == pytest.approx(ref.fun * 255**2, rel=1e-4)


@pytest.mark.parametrize("scaler", ["cv2.nearest", "cv2.linear", "pil.nearest", "torch.bilinear"])
def test_attack_hits_the_target_and_stays_close_to_the_source(pair, scaler: str) -> None:  # type: ignore[no-untyped-def]
    src, tgt = pair
    res = ScalingAttack(scaler)(src, tgt)
    assert res.converged and res.attack.dtype == np.uint8 and res.attack.shape == src.shape
    assert res.max_error_target <= 4 and res.psnr_target >= 38
    np.testing.assert_array_equal(res.scaled, get_scaler(scaler)(res.attack, (32, 32)))
    # a do-nothing baseline (the source itself) is nowhere near the target
    assert psnr(get_scaler(scaler)(src, (32, 32)), tgt) < 15
    assert res.psnr_source >= 15


def test_robust_scalers_need_clearly_more_distortion(pair) -> None:  # type: ignore[no-untyped-def]
    """Quiring §4: ≥ 5 dB less PSNR(A, S) for area and Pillow's antialiased kernels."""
    src, tgt = pair
    names = ("cv2.nearest", "cv2.linear", "cv2.cubic", "cv2.area", "pil.bilinear", "pil.box")
    psnr_of = {s: ScalingAttack(s)(src, tgt).psnr_source for s in names}
    worst_vulnerable = min(psnr_of["cv2.nearest"], psnr_of["cv2.linear"], psnr_of["cv2.cubic"])
    assert max(psnr_of["cv2.area"], psnr_of["pil.bilinear"], psnr_of["pil.box"]) <= (
        worst_vulnerable - 5
    )


def test_penalty_variant_reaches_the_target(pair) -> None:  # type: ignore[no-untyped-def]
    src, tgt = _pair(64, 16)
    res = PenaltyScalingAttack("cv2.nearest", max_iterations=300)(src, tgt)
    assert res.psnr_target >= 25 and res.psnr_source >= 15
    assert psnr(get_scaler("cv2.nearest")(src, (16, 16)), tgt) < 15


def test_advice_marks_exactly_the_vulnerable_scalers() -> None:
    vulnerable = {"cv2.nearest", "cv2.linear", "cv2.cubic", "cv2.lanczos4"}
    vulnerable |= {"pil.nearest", "torch.nearest", "torch.bilinear", "torch.bicubic"}
    for name in (
        "cv2.area",
        "pil.bilinear",
        "pil.bicubic",
        "pil.lanczos",
        "pil.box",
        "torch.bilinear-aa",
        "torch.bicubic-aa",
        "torch.area",
        *vulnerable,
    ):
        advice = scaling_advice(name, (128, 128), (32, 32))
        assert advice.vulnerable == (name in vulnerable), name
        if advice.vulnerable:
            assert not scaling_advice(advice.alternative or "", (128, 128), (32, 32)).vulnerable


@pytest.mark.parametrize("scaler", ["cv2.nearest", "cv2.linear"])
def test_selective_filters_remove_the_target_and_keep_benign_images(scaler: str) -> None:
    """Quiring §5 / spec §3.5: the scaled defended attack image is no longer the target."""
    src, tgt = _pair(256, 64)
    f = get_scaler(scaler)
    np.testing.assert_array_equal(
        used_pixels(scaler, (256, 256), (64, 64)),
        used_pixels(scaler, (256, 256), (64, 64), method="mass"),
    )
    attack = ScalingAttack(scaler)(src, tgt).attack
    for defend in (selective_median_filter, selective_random_filter):
        cleaned = defend(attack, scaler, (64, 64), bandwidth=2)
        assert psnr(f(cleaned, (64, 64)), tgt) <= 15
        assert psnr(f(cleaned, (64, 64)), f(src, (64, 64))) >= 20
    benign = selective_median_filter(src, scaler, (64, 64), bandwidth=2)
    assert benign.dtype == np.uint8 and psnr(benign, src) >= 28


def _nearest_centroid(digits):  # type: ignore[no-untyped-def]
    """A classifier without training: logits = −‖x − class mean‖²."""
    import torch

    means = torch.stack([digits.x[digits.y == k].mean(0) for k in range(10)])
    return lambda x: -((x[:, None] - means[None]) ** 2).flatten(2).sum(2)


def test_model_reads_the_target_class_and_audit_reports_it(digits) -> None:  # type: ignore[no-untyped-def]
    model = _nearest_centroid(digits)
    report = scaling_audit(model, digits.x[:16], "cv2.linear", pairs=4)
    assert report["vulnerable"] and report["attack_success_rate"] == 1.0
    assert report["success_after_median"] <= 0.25 and report["detection_rate"] >= 0.75
    robust = scaling_audit(model, digits.x[:16], "cv2.area", pairs=4)
    assert not robust["vulnerable"] and robust["psnr_source"] <= report["psnr_source"] - 3


def test_bad_inputs_give_clear_errors(pair) -> None:  # type: ignore[no-untyped-def]
    src, tgt = pair
    attack = ScalingAttack("cv2.linear")
    with pytest.raises(InvalidInputError, match="channel"):
        attack(src[..., 0], tgt)
    with pytest.raises(InvalidInputError, match="larger than source"):
        attack(tgt, src)
    with pytest.raises(InvalidInputError, match="NaN"):
        attack(np.full((64, 64, 3), np.nan), tgt)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        attack(src / 1.0, tgt)  # 0–255 floats
    with pytest.raises(ConfigError, match="unknown scaler"):
        ScalingAttack("opencv.linear")


def test_cli_scale_attack_writes_the_image_and_exits_2_on_bad_input(
    tmp_path: Path,
    pair,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    from PIL import Image

    src, tgt = pair
    Image.fromarray(src).save(tmp_path / "s.png")
    Image.fromarray(data.chelsea()).save(tmp_path / "t.png")
    Image.fromarray(data.camera()).save(tmp_path / "grey.png")
    out = tmp_path / "a.png"
    argv = ["scale-attack", str(tmp_path / "s.png"), str(tmp_path / "t.png"), "--size", "32"]
    assert main([*argv, "--scaler", "cv2.nearest", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "psnr_target=" in line and "target_resized=True" in line
    assert np.asarray(Image.open(out)).shape == src.shape
    assert main(["scale-attack", str(tmp_path / "grey.png"), *argv[2:]]) == 2
    assert main([*argv, "--scaler", "nope"]) == 2
    assert main(["scale-attack", str(tmp_path / "missing.png"), *argv[2:]]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_896_attack_converges_to_the_qp_optimum() -> None:
    """coffee → chelsea, 896² → 224², cv2 linear RGB: PSNR(A, S) ≈ 16.7 dB, target ≥ 30 dB."""
    src, tgt = _pair(896, 224)
    res = ScalingAttack("cv2.linear")(src, tgt)
    assert res.converged and abs(res.psnr_source - 16.7) <= 1.0 and res.psnr_target >= 30
