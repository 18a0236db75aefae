"""Decamouflage: scores as the paper defines them, attack images flagged and held-out benign
photos passed, calibration modes, threshold files bound to their scaler and size, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from bastion.attacks.scalers import get_scaler
from bastion.attacks.scaling import ScalingAttack
from bastion.attacks.ssim import ssim
from bastion.cli import main
from bastion.defenses import Decamouflage
from bastion.defenses.decamouflage import SCORES, csp_count, image_scores
from bastion.errors import ConfigError, DataError

SIZE = (64, 64)


def _rgb(img: np.ndarray, side: int = 256) -> np.ndarray:
    img = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
    return cv2.resize(np.ascontiguousarray(img), (side, side), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def held_out() -> list[np.ndarray]:
    """Photos that the built-in thresholds were not calibrated on."""
    return [_rgb(getattr(data, n)()) for n in ("coins", "moon", "text", "clock", "brick")] + [
        _rgb(data.astronaut()[100:400, 50:350]),
    ]


@pytest.fixture(scope="module")
def attacks(held_out: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for scaler in ("cv2.nearest", "cv2.linear"):
        attack = ScalingAttack(scaler)
        out[scaler] = [
            attack(
                src, cv2.resize(held_out[(i + 1) % 6], SIZE, interpolation=cv2.INTER_AREA)
            ).attack
            for i, src in enumerate(held_out)
        ]
    return out


def test_scores_follow_the_definitions(held_out: list[np.ndarray]) -> None:
    img = held_out[5]
    s = image_scores(img, "cv2.linear", SIZE)
    f = get_scaler("cv2.linear")
    back = f(f(img.astype(np.float32), SIZE), img.shape[:2]).astype(np.float64)
    assert s["rescale_mse"] == pytest.approx(((img - back) ** 2).mean(), rel=1e-4)
    assert s["rescale_ssim"] == pytest.approx(ssim(img, back), abs=1e-4)
    low = np.stack(
        [
            np.asarray(Image.fromarray(img[..., c]).filter(ImageFilter.MinFilter(3)))
            for c in range(3)
        ],
        axis=-1,
    ).astype(np.float64)
    assert s["filter_mse"] == pytest.approx(((img - low) ** 2).mean(), rel=1e-4)
    assert s["csp"] == 1


def test_grey_and_rgb_files_of_the_same_pixels_get_the_same_scores_and_verdict(
    held_out: list[np.ndarray],
) -> None:
    """A grey photo and an attack hidden in it, each as H×W, H×W×1 and H×W×3 with R = G = B:
    one set of scores and one verdict per image (the reference's MSE summed the channels,
    so the RGB copy scored 3× its grey self)."""
    grey = held_out[0][..., 0]  # coins: a grey photo
    target = cv2.resize(held_out[5], SIZE, interpolation=cv2.INTER_AREA)
    hidden = ScalingAttack("cv2.linear")(grey, cv2.cvtColor(target, cv2.COLOR_RGB2GRAY)).attack
    det = Decamouflage("cv2.linear", SIZE)
    for img in (grey, hidden):
        forms = [img, img[..., None], np.stack([img] * 3, axis=-1)]
        scores = det.score(forms)
        for k in SCORES:
            assert np.allclose(scores[k], scores[k][0], rtol=1e-5), (k, scores[k])
        verdicts = det.decide(scores)["ensemble"]
        assert verdicts.tolist() == [img is hidden] * 3


def test_thresholds_are_refused_at_a_size_ratio_they_were_not_calibrated_for(
    tmp_path: Path, held_out: list[np.ndarray]
) -> None:
    """Built-in thresholds hold for sources ~4× the input: a photo at the input size is
    refused with one sentence, and a detector built for that ratio scores it; a calibration
    records its images' ratios, in the JSON file too."""
    native = [cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA) for img in held_out]
    with pytest.raises(ConfigError, match=r"is 1× the model input 64×64.*hold for images 4×"):
        Decamouflage("cv2.linear", SIZE).score(native)
    det = Decamouflage("cv2.linear", SIZE, source_ratio=1.0)
    assert det.ratio_range == (1.0, 1.0) and len(det.score(native)["csp"]) == len(native)
    assert det.thresholds != Decamouflage("cv2.linear", SIZE).thresholds
    assert len(Decamouflage("cv2.linear", SIZE).score([_rgb(data.coffee(), 320)])["csp"]) == 1
    calibrated = Decamouflage("cv2.linear", SIZE).calibrate(held_out)
    assert calibrated.ratio_range == (4.0, 4.0)
    calibrated.save(tmp_path / "t.json")
    with pytest.raises(ConfigError, match="black-box thresholds hold for images 4×"):
        Decamouflage.load(tmp_path / "t.json").score([_rgb(data.coffee(), 1024)])


def test_csp_is_one_for_benign_and_many_for_attacks_at_every_size() -> None:
    """Spec §4.5 at 896², and the size caveat of §4.6 at 224²: the spectrum is normalised."""
    for side in (224, 896):
        benign = [_rgb(data.astronaut(), side), _rgb(data.coffee(), side)]
        assert [csp_count(b.astype(np.float64)) for b in benign] == [1, 1]
    src, tgt = _rgb(data.coffee(), 896), _rgb(data.chelsea(), 224)
    attack = ScalingAttack("cv2.nearest")(src, tgt).attack
    assert csp_count(attack.astype(np.float64)) >= 2


def test_builtin_thresholds_flag_attacks_and_pass_held_out_photos(
    held_out: list[np.ndarray], attacks: dict[str, list[np.ndarray]]
) -> None:
    """Attacks hidden in smooth grey photos (moon; for nearest also coins and text) slip past
    the rescaling and filtering detectors — only the spectrum sees them — so the ensemble
    misses those; every attack is seen by at least one detector."""
    for scaler, images in attacks.items():
        det = Decamouflage(scaler, SIZE)
        assert det.detect(images).mean() >= (5 / 6 if scaler == "cv2.linear" else 3 / 6)
        flags = det.decide(det.score(images))
        assert (flags["rescaling"] | flags["filtering"] | flags["steganalysis"]).all()
        assert det.detect(held_out).mean() <= 1 / 6
        assert det.mode == "built-in"


def test_white_box_and_black_box_calibration(
    held_out: list[np.ndarray], attacks: dict[str, list[np.ndarray]]
) -> None:
    atk = attacks["cv2.linear"]
    white = Decamouflage("cv2.linear", SIZE).calibrate(held_out[:3], atk[:3])
    assert white.mode == "white-box"
    assert white.detect(atk[3:]).all() and not white.detect(held_out[3:]).any()
    black = Decamouflage("cv2.linear", SIZE).calibrate(held_out, percentile=100)
    scores = black.score(held_out)
    assert black.thresholds["rescale_mse"] == pytest.approx(scores["rescale_mse"].max())
    assert black.thresholds["rescale_ssim"] == pytest.approx(scores["rescale_ssim"].min())
    assert black.thresholds["csp"] == 1.0 and not black.detect(held_out).any()
    assert black.detect(atk).all()


def test_thresholds_round_trip_through_json_and_refuse_other_deployments(
    tmp_path: Path, held_out: list[np.ndarray]
) -> None:
    det = Decamouflage("pil.nearest", SIZE).calibrate(held_out)
    path = tmp_path / "t.json"
    det.save(path)
    back = Decamouflage.load(path, "pil.nearest", 64)
    assert back.thresholds == det.thresholds and back.mode == "black-box"
    assert json.loads(path.read_text())["scaler"] == "pil.nearest"
    with pytest.raises(ConfigError, match="calibrated for pil.nearest at 64×64"):
        Decamouflage.load(path, "cv2.linear", 64)
    with pytest.raises(ConfigError, match="not for pil.nearest at 32×32"):
        Decamouflage.load(path, size=32)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DataError):
        Decamouflage.load(tmp_path / "bad.json")


def test_cli_detect_calibrate_and_thresholds(
    tmp_path: Path, held_out: list[np.ndarray], attacks: dict[str, list[np.ndarray]], capsys
) -> None:  # type: ignore[no-untyped-def]
    for name, images in (("benign", held_out), ("attacks", attacks["cv2.linear"])):
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i}.png")
    common = ["--scaler", "cv2.linear", "--size", "64"]
    save = str(tmp_path / "t.json")
    argv = [
        "detect",
        "--calibrate",
        str(tmp_path / "benign"),
        "--attacks",
        str(tmp_path / "attacks"),
    ]
    assert main([*argv, *common, "--save", save]) == 0
    assert "white-box" in capsys.readouterr().out
    assert (
        main(
            [
                "detect",
                str(tmp_path / "attacks"),
                str(tmp_path / "benign" / "0.png"),
                *common,
                "--thresholds",
                save,
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all(" attack " in line for line in lines[:6])
    assert lines[6].split()[1] == "benign" and lines[-1].startswith("7 images: 6 attack")
    assert main(["detect", str(tmp_path / "benign"), *common, "--json", "--thresholds", save]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "white-box" and set(SCORES) <= set(report["images"][0])
    assert main(["detect", str(tmp_path / "benign"), "--size", "32", "--thresholds", save]) == 2
    assert main(["detect", str(tmp_path / "nope.png"), *common]) == 2
    assert main(["detect", "--calibrate", str(tmp_path / "benign"), *common]) == 2
    assert "calibrated for cv2.linear" in capsys.readouterr().err
