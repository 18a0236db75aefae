"""The harness: cascade and worst-case semantics, exact resume, sanity flags, suites."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bastion.errors import ConfigError
from bastion.suites.runner import run_suite
from bastion.suites.suite import Check, Suite, load_suite

TINY = Suite(
    "tiny",
    (
        Check("fgsm", "FGSM", (0.05, 0.1, 0.2)),
        Check("pgd", "PGD", (0.05, 0.1, 0.2), params={"steps": 10}, cascade=True),
        Check(
            "cw",
            "CarliniWagnerL2",
            (0.5, 1.0),
            norm="l2",
            params={"binary_search_steps": 4, "max_iterations": 100, "initial_const": 0.1},
            n=24,
        ),
    ),
)


@pytest.fixture(scope="module")
def tiny_report(demo, digits):  # type: ignore[no-untyped-def]
    return run_suite(demo, digits, TINY, n=96, batch_size=32, gallery=4)


def _check(report: Any, check_id: str) -> dict[str, Any]:
    return next(c for c in report.data["checks"] if c["id"] == check_id)


def test_report_records_clean_and_robust_accuracy(tiny_report) -> None:
    data = tiny_report.data
    assert data["clean_accuracy"] >= 0.95
    assert [c["attack"] for c in data["checks"]] == ["FGSM", "PGD", "CarliniWagnerL2"]
    # the digits defaults; each threat model over every sample the run evaluated
    assert [t["threat"] for t in data["threat_models"]] == ["linf:0.1", "l2:0.5"]
    assert all(t["n"] == 96 for t in data["threat_models"])
    assert data["robust_accuracy"] == data["threat_models"][0]["robust_accuracy"]
    assert 0 <= data["robust_accuracy"] <= data["clean_accuracy"]
    assert data["passes"]["forward"] > 0 and data["passes"]["backward"] > 0
    json.loads(tiny_report.to_json())  # strict JSON: no NaN or infinity


def test_cascade_pgd_is_never_above_fgsm_and_curves_fall_with_eps(tiny_report) -> None:
    fgsm, pgd = _check(tiny_report, "fgsm"), _check(tiny_report, "pgd")
    for f, p in zip(fgsm["results"], pgd["results"], strict=True):
        assert p["robust_accuracy"] <= f["robust_accuracy"]
        assert p["attacked"] <= f["attacked"]  # cascade attacks only what still stands
    accs = [r["robust_accuracy"] for r in pgd["results"]]
    assert accs == sorted(accs, reverse=True)
    linf = tiny_report.data["robust_accuracy_by_norm"]["linf"]
    assert [r["robust_accuracy"] for r in linf] == accs  # PGD cascades over FGSM: same worst


def test_minimum_norm_check_reads_robust_accuracy_off_distances(tiny_report) -> None:
    cw = _check(tiny_report, "cw")
    assert cw["n"] == 24 and cw["minimum_norm"]["success_rate"] > 0.8
    small, large = cw["results"]
    assert small["robust_accuracy"] >= large["robust_accuracy"]
    assert small["mean_l2"] <= 0.5 + 1e-9


def test_report_lookup_by_attack_and_eps(tiny_report) -> None:
    assert (
        tiny_report.robust_accuracy("pgd", eps=0.1)
        == _check(tiny_report, "pgd")["results"][1]["robust_accuracy"]
    )
    assert (
        tiny_report.robust_accuracy("FGSM")
        == _check(tiny_report, "fgsm")["results"][-1]["robust_accuracy"]
    )
    with pytest.raises(ConfigError, match="no check"):
        tiny_report.robust_accuracy("deepfool")
    with pytest.raises(ConfigError, match="evaluated eps"):
        tiny_report.robust_accuracy("pgd", eps=0.3)


def test_gallery_shows_real_adversarial_examples(demo, digits, tiny_report) -> None:
    items = tiny_report.gallery
    assert 1 <= len(items) <= 4
    for item in items:
        adv = torch.as_tensor(item.adv).permute(2, 0, 1).unsqueeze(0).float()
        assert demo(adv).argmax(1).item() != int(digits.y[item.index])
        assert item.adv_pred != item.label


class Interrupt:
    """A progress sink that interrupts the run (Ctrl-C) inside the `after`-th PGD item (also
    used by the Ray executor's tests)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def task(self, label: str, total: float) -> Any:
        sink = self

        class _Task:
            def update(self, completed: float) -> None:
                if label.startswith("pgd") and completed >= sink.after:
                    raise KeyboardInterrupt

            def close(self) -> None:
                pass

        return _Task()


def _comparable(report: Any) -> dict[str, Any]:
    timing = {"seconds", "forward", "backward"}
    checks = [
        {k: v for k, v in c.items() if k not in timing}
        | {"results": [{k: v for k, v in r.items() if k not in timing} for r in c["results"]]}
        for c in report.data["checks"]
    ]
    keep = ("clean_accuracy", "robust_accuracy", "robust_accuracy_by_norm", "flags")
    return {"checks": checks, **{k: report.data[k] for k in keep}}


def test_resume_after_an_interruption_gives_the_uninterrupted_report(
    demo, digits, tmp_path
) -> None:
    suite = Suite("resume", TINY.checks[:2])
    full = run_suite(demo, digits, suite, n=96, batch_size=32, out=tmp_path / "a", gallery=4)
    with pytest.raises(KeyboardInterrupt):
        run_suite(
            demo,
            digits,
            suite,
            n=96,
            batch_size=32,
            out=tmp_path / "b",
            gallery=0,
            progress=Interrupt(after=4),
        )
    log = tmp_path / "b" / "results.jsonl"
    before = log.read_text().splitlines()
    assert (
        1
        < len(before)
        < len(full_lines := (tmp_path / "a" / "results.jsonl").read_text().splitlines())
    )
    with log.open("a") as f:
        f.write('{"type":"item","key":"torn')  # a write cut off mid-line
    resumed = run_suite(
        demo, digits, suite, n=96, batch_size=32, out=tmp_path / "b", resume=True, gallery=4
    )
    after = log.read_text().splitlines()
    assert after[: len(before)] == before  # finished items were kept, not redone
    assert len(after) == len(full_lines)
    assert _comparable(resumed) == _comparable(full)
    # the gallery of resumed items is re-attacked: per-sample determinism gives the same images
    assert [g.index for g in resumed.gallery] == [g.index for g in full.gallery]
    for a, b in zip(resumed.gallery, full.gallery, strict=True):
        assert abs(a.adv - b.adv).max() < 1e-6


def test_resume_refuses_a_log_from_another_run(demo, digits, tmp_path) -> None:
    suite = Suite("one", (Check("fgsm", "FGSM", (0.1,)),))
    run_suite(demo, digits, suite, n=32, out=tmp_path, gallery=0)
    with pytest.raises(ConfigError, match="seed"):
        run_suite(demo, digits, suite, n=32, out=tmp_path, seed=1, resume=True, gallery=0)


def test_sanity_checks_stay_quiet_on_an_honest_model(tiny_report) -> None:
    assert tiny_report.flags == []
    assert tiny_report.data["sanity"]["large_eps_accuracy"] <= 0.1


class _Saturated(nn.Module):
    """Distillation-like masking: logits scaled so float32 softmax saturates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e4


class _Softmax(_Saturated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


class _Noisy(_Saturated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + 0.01 * torch.randn_like(x).clamp(-1, 1))


class _Quantised(_Saturated):
    """Rounds the input: zero gradients everywhere, yet no real robustness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)


@pytest.mark.parametrize(
    "wrapper,flag",
    [
        (_Softmax, "probability_outputs"),
        (_Noisy, "randomness"),
        (_Saturated, "zero_gradients"),
        (_Quantised, "zero_gradients"),
        (_Quantised, "large_eps_not_broken"),
    ],
)
def test_sanity_checks_flag_untrustworthy_evaluations(demo, digits, wrapper, flag) -> None:
    suite = Suite("one", (Check("fgsm", "FGSM", (0.1,)),))
    report = run_suite(wrapper(demo), digits, suite, n=64, gallery=0)
    assert flag in {f.name for f in report.flags}


def test_builtin_suites_load_and_toml_suites_are_validated(tmp_path: Path) -> None:
    quick = load_suite("quick")
    assert [c.attack for c in quick.checks] == [
        "FGSM", "PGD", "APGD", "APGDT", "FAB", "CarliniWagnerL2"
    ]  # fmt: skip
    assert quick.checks[5].params == {"binary_search_steps": 5, "max_iterations": 100}
    assert len(load_suite("standard").checks) == 8
    with pytest.raises(ConfigError, match="unknown suite"):
        load_suite("nightly")
    bad = tmp_path / "bad.toml"
    for body, match in [
        ('[[check]]\nattack = "deepfool"\neps = [0.1]\n', "unknown attack"),
        ('[[check]]\nattack = "PGD"\neps = [3]\n', "out of range"),
        ('[[check]]\nattack = "PGD"\neps = [0.1]\nspeed = 2\n', "unknown key"),
        ('[[check]]\nattack = "PGD"\neps = [0.1]\nparams = { stepz = 2 }\n', "parameters"),
        ('[[check]]\nattack = "PGD"\neps = [0.1]\ncriterion = "accuracy > 1"\n', "criterion"),
        ('name = "x"\n', "no \\[\\[check\\]\\]"),
        ("[[check]\n", "cannot read"),
    ]:
        bad.write_text(body)
        with pytest.raises(ConfigError, match=match):
            load_suite(str(bad))


def test_criteria_decide_passed(demo, digits, tmp_path: Path) -> None:
    path = tmp_path / "crit.toml"
    path.write_text(
        '[[check]]\nid = "fgsm"\nattack = "FGSM"\neps = [0.05, 0.3]\n'
        'criterion = "robust_accuracy >= 0.5"\ncriterion_eps = 0.05\n'
        '[[check]]\nid = "pgd"\nattack = "PGD"\neps = [0.3]\n'
        'criterion = "robust_accuracy >= 0.5"\n'
    )
    report = run_suite(demo, digits, str(path), n=64, gallery=0)
    fgsm, pgd = report.data["checks"]
    assert fgsm["passed"] is True and pgd["passed"] is False
    assert report.passed is False
    assert math.isclose(
        report.robust_accuracy("fgsm", eps=0.05), fgsm["results"][0]["robust_accuracy"]
    )


def test_eps_override_replaces_the_linf_sweep(demo, digits) -> None:
    report = run_suite(demo, digits, "quick", eps=[0.1], n=16, gallery=0)
    for check in report.data["checks"][:2]:
        assert [r["eps"] for r in check["results"]] == [0.1]
    cw = next(c for c in report.data["checks"] if c["id"] == "cw")
    assert [r["eps"] for r in cw["results"]] == [0.5, 1.0, 1.5, 2.0]  # L2: left alone


def test_written_report_holds_the_gallery_and_strict_json(tiny_report, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    paths = tiny_report.write(tmp_path, junit=tmp_path / "junit.xml")
    data = json.loads(paths["json"].read_text())
    assert data["clean_accuracy"] == tiny_report.clean_accuracy
    assert len(data["gallery"]) == len(tiny_report.gallery)

    class Gallery(HTMLParser):
        items = 0
        images: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if "gallery-item" in (a.get("class") or "").split():
                self.items += 1
            if tag == "img":
                self.images.append(a.get("class") or "")

    parser = Gallery()
    parser.feed(paths["html"].read_text())
    assert parser.items == len(tiny_report.gallery) >= 1
    assert sum("adversarial" in c for c in parser.images) == parser.items
    assert (tmp_path / "junit.xml").read_text().count("<testcase") == 3


class _Asserting(nn.Module):
    """A plain-Python model whose forward asserts its input shape (as exported guards do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "expects RGB"
        return x.flatten(1)[:, :10]


def test_a_model_that_asserts_on_the_data_is_an_input_error(digits) -> None:
    from bastion.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="cannot take 1×8×8 images"):
        run_suite(_Asserting(), digits, TINY, n=4)
