"""Suite check kinds `fooling` and `scaling`, and runs behind the RawISP defense
(`--defense raw_isp`, the suite's `defense` key, adaptive BPDA twins)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bastion.cli import main
from bastion.defenses import RawISP
from bastion.errors import ConfigError
from bastion.suites.runner import run_suite
from bastion.suites.suite import load_suite, suite_from_dict


def _suite(*checks: dict[str, Any], **top: Any) -> Any:
    return suite_from_dict({"check": list(checks), **top}, "kinds")


def _fooling(generations: int, **extra: Any) -> dict[str, Any]:
    params = {"generations": generations, "population": 50, "init_size": 50}
    return {"id": "fooling", "kind": "fooling", "params": params, **extra}


SCALING = {"id": "scaling", "kind": "scaling", "n": 8, "params": {"pairs": 2}}


@pytest.fixture(scope="module")
def kinds_run(demo, digits, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("kinds")
    report = run_suite(demo, digits, _suite(_fooling(30), SCALING), n=16, out=out)
    return report, out


def _entry(report: Any, check_id: str) -> dict[str, Any]:
    return next(c for c in report.data["checks"] if c["id"] == check_id)


def test_evolution_fools_most_classes_where_random_images_do_not(kinds_run, demo, digits) -> None:  # type: ignore[no-untyped-def]
    report, _ = kinds_run
    fooling = _entry(report, "fooling")["fooling"]
    assert fooling["fooled_fraction"] >= 0.9 and fooling["generations"] == 30
    rows = fooling["classes"]
    assert [r["class"] for r in rows] == list(range(10))
    assert all(r["confidence"] >= 0.99 and r["predicted"] == r["class"] for r in rows[:1])
    baseline = run_suite(demo, digits, _suite(_fooling(0)), n=16)  # the random start alone
    assert _entry(baseline, "fooling")["fooling"]["fooled_fraction"] <= 0.6
    images = report.figures["fooling"]
    assert len(images) == 10 and images[0].shape == (8, 8, 1)
    # the kept 8-bit image really is what the model labels with that confidence
    x = torch.tensor(images[3], dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = demo(x).softmax(1)[0]
    assert float(probs[3]) == pytest.approx(rows[3]["confidence"], abs=1e-4)


def test_scaling_check_reports_each_scaler(kinds_run) -> None:  # type: ignore[no-untyped-def]
    report, _ = kinds_run
    entry = _entry(report, "scaling")
    linear, area = entry["scaling"]
    assert (linear["scaler"], area["scaler"]) == ("cv2.linear", "cv2.area")
    assert linear["vulnerable"] and linear["attack_success_rate"] == 1.0
    assert linear["detection_rate"] == 1.0 and linear["success_after_median"] == 0.0
    assert not area["vulnerable"] and area["psnr_source"] < linear["psnr_source"]
    assert entry["vulnerable"] and entry["n"] == 8 and entry["forward"] > 0
    assert linear["input_size"] == [8, 8] and linear["source_size"] == [32, 32]
    # neither kind changes robust accuracy: no attack or verify check ran
    assert report.data["robust_accuracy"] == report.clean_accuracy


def test_html_shows_fooling_gallery_and_scaling_table(kinds_run) -> None:  # type: ignore[no-untyped-def]
    report, out = kinds_run
    html = (out / "report.html").read_text()
    assert "Fooling images" in html and html.count('class="fooling-tile"') == 10
    assert "Image-scaling audit" in html and "Vulnerable?" in html and "False positives" in html
    assert html.count("what the model sees") == 2  # one example per scaler
    assert "cv2.linear reads only a few source pixels" in html  # the advice
    data = json.loads((out / "report.json").read_text())
    assert [c["kind"] for c in data["checks"]] == ["fooling", "scaling"]
    assert "data:image" not in json.dumps(data)  # images stay out of report.json


def test_resume_gives_the_same_entries(kinds_run, demo, digits) -> None:  # type: ignore[no-untyped-def]
    report, out = kinds_run
    again = run_suite(demo, digits, _suite(_fooling(30), SCALING), n=16, out=out, resume=True)
    assert again.data["checks"] == report.data["checks"]
    assert all(
        (a == b).all()
        for a, b in zip(again.figures["fooling"], report.figures["fooling"], strict=True)
    )
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if '"key":"fooling|' not in ln]  # lose the fooling item
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    redone = run_suite(demo, digits, _suite(_fooling(30), SCALING), n=16, out=out, resume=True)
    assert _entry(redone, "fooling")["fooling"] == _entry(report, "fooling")["fooling"]
    assert _entry(redone, "scaling") == _entry(report, "scaling")


def test_criteria_on_the_new_metrics(demo, digits) -> None:  # type: ignore[no-untyped-def]
    suite = _suite(
        _fooling(5, criterion="fooled_fraction <= 0.1"),
        {**SCALING, "criterion": "detection_rate >= 0.5"},
    )
    report = run_suite(demo, digits, suite, n=8)
    assert _entry(report, "fooling")["passed"] is False  # the demo model is easily fooled
    assert _entry(report, "scaling")["passed"] is False  # cv2.area attacks go undetected
    assert report.passed is False


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (_fooling(5, params={"steps": 3}), "unknown fooling parameter"),
        ({"kind": "fooling", "params": {"encoding": "pixels"}}, "encoding"),
        ({"kind": "fooling", "params": {"generations": -1}}, "generations"),
        ({"kind": "fooling", "eps": [0.1]}, "takes no eps"),
        ({"kind": "fooling", "criterion": "robust_accuracy >= 0.5"}, "fooled_fraction"),
        ({"kind": "scaling", "params": {"scalers": ["cv2.bogus"]}}, "unknown scaler"),
        ({"kind": "scaling", "params": {"scalers": []}}, "non-empty"),
        ({"kind": "scaling", "params": {"ratio": 1}}, "ratio"),
        ({"kind": "scaling", "n": 2}, "n >= 4"),
        ({"kind": "scaling", "params": {"eps": 2}}, "unknown scaling parameter"),
        ({"attack": "pgd", "eps": [0.1], "criterion": "detection_rate >= 0.5"}, "detection_rate"),
    ],
)
def test_bad_parameters_are_refused(check: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _suite(check)


def test_bad_defense_settings_are_refused() -> None:
    fgsm = {"attack": "fgsm", "eps": [0.1]}
    with pytest.raises(ConfigError, match="unknown defense"):
        _suite(fgsm, defense="jpeg")
    with pytest.raises(ConfigError, match="needs a defense"):
        _suite(fgsm, adaptive=True)
    with pytest.raises(ConfigError, match="verify"):
        _suite({"kind": "verify", "eps": [0.01]}, defense="raw_isp")


def test_blackbox_suite_is_built_in() -> None:
    suite = load_suite("blackbox")
    assert [(c.kind, c.attack) for c in suite.checks] == [
        ("attack", "FeatureGameMCTS"),
        ("attack", "SafeCV"),
        ("fooling", "FoolingEvolution"),
        ("scaling", "ScalingAttack"),
    ]


TINY = """\
name = "tiny-defended"
{top}
[[check]]
id = "fgsm"
attack = "FGSM"
eps = [0.1, 0.3]
"""


def _cli(tmp_path: Path, top: str, *flags: str) -> tuple[int, dict[str, Any]]:
    suite = tmp_path / "suite.toml"
    suite.write_text(TINY.format(top=top))
    out = tmp_path / "out"
    argv = ["report", "--n", "8", "--suite", str(suite), "--out", str(out), "--quiet", *flags]
    code = main(argv)
    return code, json.loads((out / "report.json").read_text())


def test_defense_flag_attacks_the_defended_model(tmp_path: Path, demo, digits) -> None:  # type: ignore[no-untyped-def]
    code, report = _cli(tmp_path, "", "--defense", "raw_isp")
    assert code == 0 and report["model"]["defense"] == "raw_isp"
    assert report["suite"]["defense"] == "raw_isp"
    # grey digits go through the ISP (replicated to RGB and back): the recorded clean
    # accuracy is the defended model's, computed here independently
    defended = RawISP().wrap(demo)
    with torch.no_grad():
        pred = defended(digits.x[:8]).argmax(1)
    assert report["clean_accuracy"] == pytest.approx(float((pred == digits.y[:8]).double().mean()))
    with torch.no_grad():
        assert not torch.equal(defended(digits.x[:8]), demo(digits.x[:8]))
    # before/after: the same suite on the undefended model, its own report beside
    before = report["undefended"]
    with torch.no_grad():
        plain = demo(digits.x[:8]).argmax(1)
    assert before["clean_accuracy"] == pytest.approx(float((plain == digits.y[:8]).double().mean()))
    assert set(before["checks"]) == {c["id"] for c in report["checks"]}
    assert (tmp_path / "out" / "undefended" / "report.json").is_file()
    assert "Before and after the defense" in (tmp_path / "out" / "report.html").read_text()


def test_adaptive_adds_bpda_twins_and_keeps_the_worst_case(tmp_path: Path) -> None:
    code, report = _cli(tmp_path, 'defense = "raw_isp"\nadaptive = true')
    assert code == 0 and report["model"]["adaptive"] is True
    fgsm, twin = report["checks"]
    assert (fgsm["id"], twin["id"], twin["bpda"]) == ("fgsm", "fgsm-bpda", True)
    worst = report["robust_accuracy_by_norm"]["linf"][-1]["robust_accuracy"]
    assert worst <= min(
        fgsm["results"][-1]["robust_accuracy"], twin["results"][-1]["robust_accuracy"]
    )
    assert main(["report", "--n", "8", "--out", str(tmp_path / "x"), "--adaptive", "--quiet"]) == 2


@pytest.mark.slow
def test_blackbox_suite_runs_on_the_demo(demo, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = run_suite(demo, digits, "blackbox", n=16, out=tmp_path)
    mcts, safecv, fooling, scaling = report.data["checks"]
    assert mcts["minimum_norm"]["success_rate"] >= 0.5  # the demo CNN is not robust
    assert fooling["fooling"]["fooled_fraction"] >= 0.9
    assert scaling["scaling"][0]["vulnerable"] and not scaling["scaling"][1]["vulnerable"]
    assert report.data["robust_accuracy_n"] == 16
