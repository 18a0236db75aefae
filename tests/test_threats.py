"""Threat models: parsing, defaults, the per-threat headline and its pass criteria."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import run_cli  # the CLI runner of the CLI tests (tests/ is on sys.path)
from torch import nn

from bastion.errors import ConfigError
from bastion.suites.runner import run_suite
from bastion.suites.suite import Check, Suite, load_suite, suite_from_dict
from bastion.threats import ThreatModel, default_threats, parse_eps, parse_fail_under

SMALL = Suite(
    "small",
    (
        Check("fgsm", "FGSM", (0.05,), threats=True, threat_norms=("linf",)),
        Check("apgd", "APGD", (), params={"n_iter": 20}, cascade=True, threats=True),
        Check(
            "cw",
            "CarliniWagnerL2",
            (1.0,),
            norm="l2",
            params={"binary_search_steps": 3, "max_iterations": 100, "initial_const": 0.1},
            n=16,
        ),
    ),
)


def test_threat_models_round_trip_with_fractions() -> None:
    t = ThreatModel.parse("linf:8/255")
    assert t.eps == 8 / 255 and str(t) == "linf:8/255"
    assert str(ThreatModel.parse("L2:0.5")) == "l2:0.5"
    assert parse_eps("2/255") == 2 / 255 and parse_eps("1e-2") == 0.01
    for bad in ("linf", "l3:0.1", "linf:8", "linf:abc", "l2:-1"):
        with pytest.raises(ConfigError):
            ThreatModel.parse(bad)


def test_fail_under_is_a_fraction_per_threat_or_for_all() -> None:
    f = parse_fail_under("linf:8/255=0.4")
    assert f.threat == ThreatModel("linf", 8 / 255) and f.min_accuracy == 0.4
    assert parse_fail_under("0.5").threat is None
    with pytest.raises(ConfigError, match="write 0.5 for 50 %"):
        parse_fail_under("50")


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        ("cifar10:/data", (3, 32, 32), ["linf:8/255", "l2:0.5"]),
        ("mnist:/data", (1, 28, 28), ["linf:0.3", "l2:2"]),
        ("fashion-mnist:/d", (1, 28, 28), ["linf:0.1", "l2:2"]),
        ("digits", (1, 8, 8), ["linf:0.1", "l2:0.5"]),
        ("folder:/imgs", (3, 224, 224), ["linf:4/255"]),
        ("npz:/x.npz", (3, 32, 32), ["linf:8/255", "l2:0.5"]),
    ],
)
def test_defaults_follow_the_data_set(spec: str, shape: Any, expected: list[str]) -> None:
    assert [str(t) for t in default_threats(spec, shape)] == expected


@pytest.fixture(scope="module")
def small_report(demo, digits, tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("threats")
    report = run_suite(demo, digits, SMALL, n=64, batch_size=32, out=out, gallery=0)
    return report, out


def _broken_per_point(out: Path, norm: str, eps: float, n: int) -> torch.Tensor:
    """An independent reading of results.jsonl: broken within eps by any item of `norm`."""
    broken = torch.zeros(n, dtype=torch.bool)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    header = lines[0]
    norms = {c["id"]: c["norm"] for c in header["suite"]["checks"]}
    for rec in lines[1:]:
        if rec.get("kind") != "attack" or norms[rec["check"]] != norm:
            continue
        rows = rec["rows"]
        for i, s, d in zip(rows["index"], rows["success"], rows[norm], strict=True):
            at = rec["eps"] if rec["eps"] is not None else d
            if s and at <= eps * (1 + 1e-9):
                broken[i] = True
    return broken


def test_headline_is_the_worst_case_per_point_over_every_check(small_report) -> None:
    report, out = small_report
    data = report.data
    assert [t["threat"] for t in data["threat_models"]] == ["linf:0.1", "l2:0.5"]
    clean = data["clean_accuracy"]
    for t in data["threat_models"]:
        correct = torch.tensor([p == y for p, y in zip(*_clean_predictions(out), strict=True)])
        broken = _broken_per_point(out, t["norm"], t["eps"], 64)
        expected = float((correct & ~broken).double().mean())
        assert math.isclose(t["robust_accuracy"], expected)
        assert t["n"] == 64
        # never above what any single attack found
        for a in t["attacks"].values():
            if a["robust_accuracy"] is not None and a["n"] == 64:
                assert t["robust_accuracy"] <= a["robust_accuracy"] + 1e-12
        assert t["robust_accuracy"] <= clean
    assert set(data["threat_models"][0]["attacks"]) == {"fgsm", "apgd"}
    assert set(data["threat_models"][1]["attacks"]) == {"apgd-l2", "cw"}
    assert report.robust_accuracy() == data["threat_models"][0]["robust_accuracy"]
    assert report.robust_accuracy("l2:0.5") == data["threat_models"][1]["robust_accuracy"]
    with pytest.raises(ConfigError, match="evaluated: linf:0.1, l2:0.5"):
        report.robust_accuracy("linf:8/255")


def _clean_predictions(out: Path) -> tuple[list[int], list[int]]:
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    from bastion.data import load_data

    y = load_data("digits").y[:64].tolist()
    pred = [0] * 64
    for rec in lines[1:]:
        if rec.get("kind") == "clean":
            for i, p in zip(rec["index"], rec["pred"], strict=True):
                pred[i] = p
    return pred, y


def test_asked_threat_models_must_be_covered(demo, digits) -> None:
    no_l2 = Suite("fgsm-only", (Check("fgsm", "FGSM", (0.1,)),))
    with pytest.raises(ConfigError, match="no check of suite 'fgsm-only' attacks at l2:0.5"):
        run_suite(demo, digits, no_l2, n=8, threats=["l2:0.5"])
    with pytest.raises(ConfigError, match="does not evaluate"):
        run_suite(demo, digits, SMALL, n=8, threats=["linf:0.1"], fail_under="l2:0.5=0.1")


def test_cli_defaults_quote_a_threat_model_and_fail_under_reads_it(tmp_path: Path) -> None:
    """`bastion report --threat linf:0.1 --fail-under linf:0.1=0.4`, as README shows it, on
    the embedded default with every other default."""
    code, out, err = run_cli(
        ["report", "--threat", "linf:0.1", "--fail-under", "linf:0.1=0.4", "--out",
         str(tmp_path)]
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    (t,) = report["threat_models"]
    assert t["threat"] == "linf:0.1" and t["n"] == 450 and t["passed"] is True
    assert 0.3 < t["robust_accuracy"] < 0.6  # the demo CNN is neither broken nor robust
    assert set(t["attacks"]) == {"fgsm", "apgd-ce", "apgd-t", "fab-t"}  # PGD: the curve below
    assert "robust accuracy linf:0.1:" in out and "(n = 450" in out
    assert report["normalization"] is None
    assert not [f for f in report["flags"] if f["name"] == "clean_accuracy_near_chance"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-under", "50"], "write 0.5 for 50 %"),
        (["--threat", "linf:8"], "larger than the pixel range"),
        (["--threat", "l7:0.1"], "cannot read threat model"),
        (["--eps", "8/0"], "divides by zero"),
    ],
)
def test_cli_refuses_bad_threats_in_one_line(args: list[str], message: str, tmp_path) -> None:
    code, _, err = run_cli(["report", "--out", str(tmp_path), *args])
    assert code == 2 and message in err and "Traceback" not in err


def test_eps_accepts_fractions(tmp_path: Path) -> None:
    args = ["report", "--out", str(tmp_path), "--n", "16", "--suite", str(_fgsm_suite(tmp_path))]
    code, _, err = run_cli([*args, "--eps", "8/255,0.1"])
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    fgsm = next(c for c in report["checks"] if c["attack"] == "FGSM")
    assert any(math.isclose(r["eps"], 8 / 255) for r in fgsm["results"])


def test_resume_refuses_another_normalization(tmp_path: Path) -> None:
    args = ["report", "--n", "16", "--suite", str(_fgsm_suite(tmp_path)), "--out", str(tmp_path)]
    assert run_cli([*args, "--mean", "0", "--std", "1"])[0] == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["normalization"] == {"mean": [0.0], "std": [1.0]}
    code, _, err = run_cli([*args, "--resume"])
    assert code == 2 and "changed: normalization" in err
    code, _, err = run_cli([*args, "--mean", "0", "--std", "1", "--threat", "linf:0.2", "--resume"])
    assert code == 2 and "threats" in err


def _fgsm_suite(tmp_path: Path) -> Path:
    path = tmp_path.parent / f"{tmp_path.name}-fgsm.toml"
    path.write_text(
        'name = "f"\n[[check]]\nid = "fgsm"\nattack = "FGSM"\neps = [0.1, 0.2]\nthreats = true\n'
    )
    return path


class _Scaled(nn.Module):
    """Logits multiplied by a large factor: cross-entropy saturates to zero gradients in
    float32 while the prediction (and the scale-free DLR loss) is unchanged."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


def test_flags_dlr_breaking_what_cross_entropy_left(demo, digits) -> None:
    suite = Suite(
        "ce-dlr",
        (
            Check("apgd-ce", "APGD", (), params={"n_iter": 20}, cascade=True, threats=True),
            Check(
                "apgd-t",
                "APGDT",
                (),
                params={"n_iter": 20, "n_target_classes": 3},
                cascade=True,
                threats=True,
            ),  # fmt: skip
        ),
    )
    scaled = run_suite(_Scaled(demo, 1e4), digits, suite, n=64, threats=["linf:0.1"], gallery=0)
    names = [f.name for f in scaled.flags]
    assert "ce_dlr_disagree" in names
    plain = run_suite(demo, digits, suite, n=64, threats=["linf:0.1"], gallery=0)
    assert "ce_dlr_disagree" not in [f.name for f in plain.flags]
    # the worst case does not trust the masked loss: both models are equally (non-)robust
    assert abs(scaled.robust_accuracy("linf:0.1") - plain.robust_accuracy("linf:0.1")) <= 0.1


class _Quantized(nn.Module):
    """Rounds the input to 16 grey levels: exactly zero input gradients everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 16) / 16)


def test_flags_black_box_breaking_what_gradients_left(demo, digits) -> None:
    suite = Suite(
        "grad-box",
        (
            Check("pgd", "PGD", (), params={"steps": 10}, threats=True, threat_norms=("linf",)),
            Check(
                "square",
                "Square",
                (),
                params={"n_queries": 300},
                cascade=True,
                threats=True,
                threat_norms=("linf",),
            ),  # fmt: skip
        ),
    )
    report = run_suite(_Quantized(demo), digits, suite, n=48, threats=["linf:0.1"], gallery=0)
    assert "black_box_stronger" in [f.name for f in report.flags]
    assert "black_box_stronger" not in [
        f.name for f in run_suite(demo, digits, suite, n=48, threats=["linf:0.1"]).flags
    ]


def test_flags_clean_accuracy_near_chance(digits) -> None:
    torch.manual_seed(0)
    random = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    suite = Suite("f", (Check("fgsm", "FGSM", (0.1,)),))
    report = run_suite(random, digits, suite, n=64, gallery=0)
    flag = next(f for f in report.flags if f.name == "clean_accuracy_near_chance")
    assert "--mean/--std" in flag.message
    # the same flag is first in the terminal output
    from io import StringIO

    from rich.console import Console

    from bastion.suites.terminal import print_summary

    buf = StringIO()
    print_summary(report.model, Console(file=buf, width=200))
    assert buf.getvalue().splitlines()[0].startswith("warning [")


def _fgsm_trained(digits_train: Any, eps: float, epochs: int) -> nn.Module:
    """A digits CNN trained on FGSM examples only (Goodfellow et al.'s recipe without the
    clean term): at a large eps it overfits to the single step (Wong et al. 2020)."""
    import torch.nn.functional as F

    from bastion.zoo import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(digits_train)).split(64):
            x = digits_train.x[idx].clone().requires_grad_(True)
            y = digits_train.y[idx]
            (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
            x_adv = (x + eps * g.sign()).clamp(0, 1).detach()
            opt.zero_grad()
            F.cross_entropy(model(x_adv), y).backward()
            opt.step()
    return model.eval()


def test_flags_fgsm_far_weaker_than_multi_step_after_fgsm_training(demo, digits) -> None:
    from bastion.data import load_data

    suite = Suite(
        "fgsm-vs-apgd",
        (
            Check("fgsm", "FGSM", (), threats=True, threat_norms=("linf",)),
            Check("apgd", "APGD", (), params={"n_iter": 20}, cascade=True, threats=True),
        ),
    )
    overfit = _fgsm_trained(load_data("digits", split="train"), 0.2, 20)
    report = run_suite(overfit, digits, suite, n=128, threats=["linf:0.2"], gallery=0)
    fgsm = report.threat_models[0].attacks["fgsm"].robust_accuracy
    assert fgsm - report.robust_accuracy("linf:0.2") > 0.10
    assert "single_step_much_weaker" in [f.name for f in report.flags]
    plain = run_suite(demo, digits, suite, n=128, threats=["linf:0.1"], gallery=0)
    assert "single_step_much_weaker" not in [f.name for f in plain.flags]


def test_flags_robust_accuracy_rising_with_eps() -> None:
    from bastion.suites.evaluation_flags import evaluation_flags
    from bastion.suites.report_model import AttackResult, CheckEntry, VerifyResult
    from bastion.suites.runner import RunState

    state = RunState(100, torch.zeros(100, dtype=torch.long))
    state.pred[:] = 0

    def entry(accs: list[float]) -> CheckEntry:
        rows: list[AttackResult | VerifyResult] = [
            AttackResult(e, a, None, 100, None, None, None, None, None, None)
            for e, a in zip((0.1, 0.2, 0.3), accs, strict=True)
        ]
        return CheckEntry("pgd", "attack", "PGD", "linf", [0.1, 0.2, 0.3], {}, 100, False, None,
                          results=rows)  # fmt: skip

    rising = evaluation_flags(Suite("s", ()), state, [], [entry([0.5, 0.2, 0.4])], [], 10)
    assert [f.name for f in rising] == ["robust_accuracy_rises_with_eps"]
    assert "0.3" in rising[0].message and "0.2" in rising[0].message
    falling = evaluation_flags(Suite("s", ()), state, [], [entry([0.5, 0.2, 0.2])], [], 10)
    assert falling == []
    one_step = entry([0.5, 0.2, 0.4])
    one_step.attack = "FGSM"  # overshoots at large eps by nature; not the evaluation failing
    assert evaluation_flags(Suite("s", ()), state, [], [one_step], [], 10) == []


def test_threat_fractions_draw_the_curve_up_to_each_threat_radius() -> None:
    """The built-in curves sit below the run's threat radius (2/255, 4/255, 6/255 under
    8/255; 0.075, 0.15, 0.225 under MNIST's 0.3), not on a grid fixed in MNIST units."""
    cifar = (ThreatModel("linf", 8 / 255), ThreatModel("l2", 0.5))
    quick = {c.id: c for c in load_suite("quick").at_threats(cifar).checks}
    assert [round(e * 255, 9) for e in quick["pgd"].eps] == [2, 4, 6]
    assert [round(e * 255, 9) for e in quick["fgsm"].eps] == [8]
    assert quick["apgd-ce"].eps == (8 / 255,) and quick["apgd-ce-l2"].eps == (0.5,)
    mnist = {c.id: c for c in load_suite("standard").at_threats((ThreatModel("linf", 0.3),)).checks}
    assert mnist["pgd"].eps == pytest.approx([0.3 * k / 8 for k in range(1, 8)])
    assert mnist["fgsm"].eps == pytest.approx([0.3 * k / 8 for k in range(1, 9)])
    # --eps replaces the curve; the threat radius stays
    swept = load_suite("quick").with_eps((0.01, 0.02)).at_threats(cifar)
    assert {c.id: c.eps for c in swept.checks}["pgd"] == (0.01, 0.02, 8 / 255)
    # a run at L2 only: the L∞-only curve checks drop out, the rest run at L2
    l2_only = [c.id for c in load_suite("quick").at_threats((ThreatModel("l2", 0.5),)).checks]
    assert l2_only == ["apgd-ce-l2", "apgd-t-l2", "fab-t-l2", "cw"]


@pytest.mark.parametrize(
    "fractions", [[0], [1.5], [], ["a"]], ids=["zero", "above-one", "empty", "text"]
)
def test_threat_fractions_refused_in_one_line(fractions: list[Any]) -> None:
    raw = {"check": [{"attack": "PGD", "threats": True, "threat_fractions": fractions}]}
    with pytest.raises(ConfigError, match=r"threat_fractions is a list of fractions in \(0, 1\]"):
        suite_from_dict(raw, "mine")
    with pytest.raises(ConfigError, match="needs threats = true"):
        suite_from_dict({"check": [{"attack": "PGD", "threat_fractions": [0.5]}]}, "mine")
