"""Defenses evaluated honestly inside the report: a distilled model attacked on logits / T,
EOT and BPDA against the randomised RAW-ISP, DVERGE's transfer check from an independent
surrogate, and the table undefended | defended | adaptive in every writer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from bastion.attacks import FGSM
from bastion.attacks.transfer import paper_attacks, transfer_accuracy
from bastion.cli import main
from bastion.data import Dataset, load_data
from bastion.defenses import Distilled, Ensemble, TemperatureScaled, distill
from bastion.defenses.eot import ExpectationOverTransformation
from bastion.defenses.surrogate import baseline_ensemble
from bastion.errors import ConfigError
from bastion.model_io import METADATA_ATTR
from bastion.suites.defense_plan import model_defense, with_defense_checks
from bastion.suites.report_model import ReportData
from bastion.suites.runner import run_suite
from bastion.suites.suite import suite_from_dict
from bastion.suites.terminal import print_summary
from bastion.threats import ThreatModel
from bastion.zoo import DigitsCNN

TINY: dict[str, Any] = {
    "check": [
        {"id": "fgsm", "attack": "FGSM", "threats": ["linf"]},
        {"id": "pgd", "attack": "PGD", "params": {"steps": 10}, "threats": ["linf"]},
    ]
}
TINY_TOML = """\
name = "tiny"
[[check]]
id = "fgsm"
attack = "FGSM"
threats = ["linf"]
[[check]]
id = "pgd"
attack = "PGD"
params = { steps = 10 }
threats = ["linf"]
"""


@pytest.fixture(scope="module")
def distilled() -> Distilled:
    """T = 100 on digits: 1 + 5 + 5 epochs of Adam (as test_distillation), a few seconds."""
    train = load_data("digits", split="train")
    return distill(
        DigitsCNN,
        train,
        temperature=100,
        epochs=5,
        batch_size=32,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        seed=0,
    )


def _robust(report: ReportData, check: str, eps: float) -> float:
    entry = report.check(check)
    assert entry is not None, [c.id for c in report.checks]
    row = entry.result_at(eps)
    assert row is not None
    return row.robust_accuracy


def test_distilled_model_is_attacked_on_logits_over_t(
    distilled: Distilled, digits: Dataset
) -> None:
    suite = suite_from_dict(TINY, "tiny")
    report = run_suite(distilled.student, digits, suite, n=48, threats=["linf:0.1"]).model
    ids = [c.id for c in report.checks]
    assert ids == ["fgsm", "pgd", "fgsm-T", "pgd-T"]  # twins after the suite's own checks
    assert {report.check(i).kind for i in ("fgsm-T", "pgd-T")} == {"adaptive"}  # type: ignore[union-attr]
    # T = 100 saturates the softmax: FGSM on the logits finds almost nothing, on Z/T it works
    plain, adaptive = _robust(report, "fgsm", 0.1), _robust(report, "fgsm-T", 0.1)
    assert adaptive <= plain - 0.3
    assert _robust(report, "pgd-T", 0.1) <= _robust(report, "pgd", 0.1) - 0.3
    # oracle: FGSM on TemperatureScaled(student, 100) by hand, the same 48 samples
    x, y = digits.x[:48], digits.y[:48]
    with torch.no_grad():
        correct = distilled.student(x).argmax(1) == y
    res = FGSM(0.1)(TemperatureScaled(distilled.student, 100.0), x, y)
    assert adaptive == pytest.approx(float((correct & ~res.success).double().mean()))
    # the table: no undistilled twin; defended = the suite as is; adaptive = the headline
    assert report.defense is not None and report.model["defense"] == "distillation (T = 100)"
    (row,) = report.defense.rows
    assert row.undefended is None and report.defense.undefended_by is None
    assert row.adaptive == report.robust_accuracy == report.threat_models[0].robust_accuracy
    assert row.defended is not None and row.adaptive <= row.defended - 0.3
    assert report.defense.adaptive_by == ["fgsm-T", "pgd-T"]
    back = ReportData.from_json(report.to_json())
    assert back.defense == report.defense


def test_an_undefended_model_gets_no_twins_and_an_unchanged_report(demo, digits) -> None:  # type: ignore[no-untyped-def]
    report = run_suite(demo, digits, suite_from_dict(TINY, "tiny"), n=16, threats=["linf:0.1"])
    assert [c.id for c in report.model.checks] == ["fgsm", "pgd"]
    assert report.model.defense is None and "defense" not in json.loads(report.to_json())


def test_eot_against_the_randomised_isp_is_stronger_than_one_draw(
    demo: torch.nn.Module, digits: Dataset, tmp_path: Path
) -> None:
    suite = suite_from_dict(TINY, "tiny")
    kwargs: dict[str, Any] = {"n": 48, "threats": ["linf:0.2"], "defense": "raw_isp:random"}
    report = run_suite(demo, digits, suite, out=tmp_path, **kwargs).model
    ids = [c.id for c in report.checks]
    assert ids == ["fgsm", "pgd", "fgsm-eot", "fgsm-eot-bpda", "pgd-eot", "pgd-eot-bpda"]
    assert report.check("pgd-eot").params["view"] == "eot"  # type: ignore[union-attr]
    single = _robust(report, "pgd", 0.2)
    strongest = min(_robust(report, i, 0.2) for i in ("pgd-eot", "pgd-eot-bpda"))
    assert strongest <= single - 0.15  # EOT + BPDA breaks what single-draw gradients leave
    (row,) = report.defense.rows  # type: ignore[union-attr]
    assert row.undefended is not None and row.defended is not None and row.adaptive is not None
    assert row.adaptive <= row.defended
    assert row.undefended == report.undefended.threat_models[0].robust_accuracy  # type: ignore[union-attr]
    # the undefended run has none of the twins (they need the defense)
    before = json.loads((tmp_path / "undefended" / "report.json").read_text())
    assert [c["id"] for c in before["checks"]] == ["fgsm", "pgd"]
    # per-item reseeding: the same seed gives the same numbers, and resume recomputes nothing
    again = run_suite(demo, digits, suite, out=tmp_path, resume=True, **kwargs).model
    fresh = run_suite(demo, digits, suite, **kwargs).model
    for other in (again, fresh):
        assert [(c.id, [r.robust_accuracy for r in c.results]) for c in other.checks] == [
            (c.id, [r.robust_accuracy for r in c.results]) for c in report.checks
        ]


def test_eot_view_averages_the_draws() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    view = ExpectationOverTransformation(net, samples=7)
    assert torch.allclose(view(x), torch.log_softmax(net(x), 1), atol=1e-6)  # no randomness

    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x) + 6 * torch.rand(x.shape[0], 3, generator=gen)

    gen = torch.Generator().manual_seed(1)
    out = ExpectationOverTransformation(Noisy(), samples=4)(x)
    gen.manual_seed(1)
    draws = torch.stack([Noisy()(x) for _ in range(4)])  # the same draws, one call each
    assert torch.allclose(out, draws.softmax(2).mean(0).log(), atol=1e-6)
    with pytest.raises(ConfigError):
        ExpectationOverTransformation(net, samples=0)


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    """A stand-in for a DVERGE ensemble (the check only needs a model that says it is one):
    two small CNNs trained independently of the surrogate."""
    model = baseline_ensemble("digits", 2, epochs=3, seed=3)
    setattr(model, METADATA_ATTR, {"defense": "dverge", "members": "2"})
    return model


def test_dverge_transfer_check_is_the_papers_transfer_attack(
    ensemble: Ensemble, digits: Dataset
) -> None:
    params = {"members": 2, "epochs": 3, "steps": 10, "restarts": 1}
    raw = {"check": [*TINY["check"][1:], {"id": "transfer", "kind": "transfer", "eps": [0.1],
                                           "params": params}]}  # fmt: skip
    report = run_suite(ensemble, digits, suite_from_dict(raw, "t"), n=32, threats=["linf:0.1"])
    entry = report.model.check("transfer")
    assert entry is not None and entry.transfer is not None
    (row,) = entry.transfer
    # oracle: the same attacks by hand, from the same (cached) surrogate
    surrogate = baseline_ensemble("digits", 2, epochs=3, seed=7)
    baseline = baseline_ensemble("digits", 2, epochs=3, seed=8)
    attacks = paper_attacks(0.1, steps=10, restarts=1, sgm=False, seed=0)
    x, y = digits.x[:32], digits.y[:32]
    mine = transfer_accuracy(ensemble, surrogate, x, y, attacks)
    theirs = transfer_accuracy(baseline, surrogate, x, y, attacks)
    assert row.robust_accuracy == pytest.approx(mine["all"])
    assert row.baseline_robust_accuracy == pytest.approx(theirs["all"])
    assert row.attacks == pytest.approx(
        {k: v for k, v in mine.items() if k not in ("clean", "all")}
    )
    assert mine["all"] < mine["clean"]  # the attack transfers: it is not a no-op
    # the table: undefended = the baseline ensemble, defended = transfer, adaptive = white box
    (d,) = report.model.defense.rows  # type: ignore[union-attr]
    assert (d.undefended, d.defended) == pytest.approx((theirs["all"], mine["all"]))
    assert d.adaptive == report.model.robust_accuracy <= d.defended
    assert report.model.defense.adaptive_by == ["pgd"]  # type: ignore[union-attr]
    assert 'id="defense-table"' in _html(report)
    back = ReportData.from_json(report.to_json())
    assert back.check("transfer").transfer == entry.transfer  # type: ignore[union-attr]


def _html(report: Any) -> str:
    from bastion.suites.html_report import render_html

    return render_html(report.model, report.gallery, report.figures)


def test_a_dverge_ensemble_gets_a_transfer_check_at_the_linf_threats(ensemble: Ensemble) -> None:
    assert model_defense(ensemble) is not None
    suite = suite_from_dict(TINY, "tiny")
    threats = (ThreatModel("linf", 0.1), ThreatModel("l2", 0.5), ThreatModel("linf", 0.05))
    planned, info = with_defense_checks(suite, ensemble, threats, {"source": "e.pt2"})
    transfer = planned.checks[-1]
    assert (transfer.kind, transfer.eps, transfer.params) == (
        "transfer",
        (0.05, 0.1),
        {"members": 2},
    )
    assert info == {"source": "e.pt2", "defense": "dverge"}


def test_saved_ensembles_and_students_keep_what_the_report_needs(
    ensemble: Ensemble, distilled: Distilled, tmp_path: Path
) -> None:
    from bastion.model_io import load_model, save_model

    example = torch.zeros(2, 1, 8, 8)
    for model, name in ((ensemble, "dverge"), (distilled.student, "distillation")):
        path = tmp_path / f"{name}.pt2"
        save_model(model, path, example)
        found = model_defense(load_model(path))
        assert found is not None and found.name == name


EOT = {"kind": "adaptive", "attack": "PGD", "eps": [0.1], "params": {"view": "eot"}}


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"kind": "adaptive", "attack": "PGD", "eps": [0.1]}, "params.view"),
        ({**EOT, "attack": "Square"}, "gradient attack"),
        ({**EOT, "cascade": True}, "cascade"),
        ({**EOT, "params": {"view": "eot", "samples": 0}}, "samples"),
        ({"kind": "transfer", "eps": [0.1], "norm": "l2"}, "L∞"),
        ({"kind": "transfer", "eps": [0.1], "params": {"steps": 0}}, "steps"),
        ({"kind": "transfer", "eps": [0.1], "params": {"loss": "ce"}}, "unknown transfer"),
    ],
)
def test_bad_defense_checks_are_refused(check: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        suite_from_dict({"check": [{"id": "x", **check}]}, "bad")


def _cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


def test_cli_distil_then_report_shows_undefended_defended_adaptive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student, plain = tmp_path / "student.pt2", tmp_path / "plain.pt2"
    for path, t in ((student, "100"), (plain, "1")):  # T = 1: the undistilled twin
        argv = ["defend", "distill", "--epochs", "5", "--temperature", t, "--out", str(path)]
        assert _cli(*argv, "--quiet") == 0
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_TOML)
    out = tmp_path / "report"
    capsys.readouterr()
    code = _cli("report", str(student), "--n", "32", "--suite", str(suite), "--out", str(out),
                "--baseline", str(plain), "--quiet")  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "undefended | defended | adaptive" in printed
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["defense"] == "distillation (T = 100)"
    (row,) = [r for r in data["defense"]["rows"] if r["threat"] == "linf:0.1"]
    assert row["adaptive"] <= row["defended"]
    assert {"fgsm-T", "pgd-T"} <= {c["id"] for c in data["checks"]}
    assert "Defense: distillation (T = 100)" in (out / "report.html").read_text()
    # the undefended column: the same suite on the undistilled model, no twins there
    before = json.loads((out / "undefended" / "report.json").read_text())
    assert [c["id"] for c in before["checks"]] == ["fgsm", "pgd"]
    assert before["model"] == {"source": str(plain), "sha256": before["model"]["sha256"]}
    assert row["undefended"] == before["threat_models"][0]["robust_accuracy"]
    assert str(plain) in data["defense"]["undefended_by"]


def test_cli_randomised_isp_report_runs_eot(tmp_path: Path) -> None:
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_TOML)
    out = tmp_path / "report"
    argv = ["report", "--defense", "raw_isp:random", "--n", "16", "--suite", str(suite),
            "--threat", "linf:0.2", "--out", str(out), "--quiet"]  # fmt: skip
    assert _cli(*argv) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["defense"] == "raw_isp:random"
    assert [c["id"] for c in data["checks"]][2:] == [
        "fgsm-eot", "fgsm-eot-bpda", "pgd-eot", "pgd-eot-bpda"
    ]  # fmt: skip
    (row,) = data["defense"]["rows"]
    assert row["adaptive"] <= row["defended"] and row["undefended"] is not None
    assert _cli("report", "--defense", "jpeg", "--out", str(out)) == 2


def test_terminal_prints_the_table(distilled: Distilled, digits: Dataset) -> None:
    report = run_suite(distilled.student, digits, suite_from_dict(TINY, "t"), n=16,
                       threats=["linf:0.1"])  # fmt: skip
    buf = io.StringIO()
    print_summary(report.model, Console(file=buf, width=200))
    text = buf.getvalue()
    row = report.model.defense.rows[0]  # type: ignore[union-attr]
    assert f"defense linf:0.1: – | {row.defended:.3f} | {row.adaptive:.3f} (n = 16)" in text


def test_the_docs_defense_table_shows_what_the_benchmark_json_holds(tmp_path: Path) -> None:
    import importlib.util
    import shutil
    import sys

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "docs_tables", root / "benchmarks" / "docs_tables.py"
    )
    assert spec is not None and spec.loader is not None
    docs_tables = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("docs_tables", docs_tables)
    spec.loader.exec_module(docs_tables)
    results = tmp_path / "results"
    shutil.copytree(root / "benchmarks" / "results", results)
    doc = json.loads((results / "defense_table.json").read_text())
    isp = doc["defenses"]["raw_isp_random"]
    isp["threats"][0].update(undefended=0.5, defended=0.75, adaptive=0.125)
    isp["report"].update(wall_seconds=700.4, cpu_seconds=150.2)
    doc["defenses"]["dverge"]["clean_undefended"] = None
    (results / "defense_table.json").write_text(json.dumps(doc))
    text = docs_tables.TABLES["defense_table"](results)
    row = next(line for line in text.splitlines() if line.startswith("| RAW-ISP"))
    assert "| L∞ 0.1 | 0.500 | 0.750 | **0.125** |" in row
    assert row.endswith("| – | 700 s (150 s) |")  # no training; the report's wall (CPU)
    assert "| – → " in next(line for line in text.splitlines() if line.startswith("| DVERGE"))
