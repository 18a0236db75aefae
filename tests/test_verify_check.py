"""The suite's `verify` check: verified accuracy, robustness intervals, resume, report."""

from __future__ import annotations

import json

import pytest

from bastion.errors import ConfigError
from bastion.suites.runner import run_suite
from bastion.suites.suite import suite_from_dict


def _suite(**params: object) -> object:
    return suite_from_dict(
        {
            "check": [
                {
                    "id": "verified",
                    "kind": "verify",
                    "eps": [0.002, 0.3],
                    "params": {"timeout": 3, **params},
                }
            ]
        },
        "verify-test",
    )


def test_verified_accuracy_and_intervals_on_demo(demo, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = run_suite(demo, digits, _suite(interval=True, interval_steps=2), n=4, out=tmp_path)
    entry = report.data["checks"][0]
    small, large = entry["results"]
    correct = report.clean_accuracy
    assert small["verified_accuracy"] == pytest.approx(correct)  # tiny ball: proved by bounds
    assert large["verified_accuracy"] == 0.0 and large["unsafe"] == round(4 * correct)
    assert report.verified_accuracy("verified", 0.002) == pytest.approx(correct)
    for r in entry["intervals"]:
        assert r["safe_up_to"] >= 0.002
        assert r["adversarial_at"] is not None and r["safe_up_to"] <= r["adversarial_at"] <= 0.3
    # the counterexamples are real: UNSAFE feeds the worst-case robust accuracy
    assert report.robust_accuracy() == 0.0
    shown = report.gallery
    assert shown and all(g.adv_pred != g.label for g in shown)
    html = (tmp_path / "report.html").read_text()
    assert "Verified accuracy" in html and "Proved safe up to" in html
    assert json.loads((tmp_path / "report.json").read_text())["checks"][0]["kind"] == "verify"


def test_verify_check_resumes_exactly(demo, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = run_suite(demo, digits, _suite(), n=4, out=tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # lose the last item
    again = run_suite(demo, digits, _suite(), n=4, out=tmp_path, resume=True)
    assert again.data["checks"][0]["results"] == first.data["checks"][0]["results"]


def test_bad_verify_parameters_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown verify parameter"):
        _suite(steps=3)
    with pytest.raises(ConfigError, match="engine"):
        _suite(engine="gurobi")
    with pytest.raises(ConfigError, match="norm"):
        suite_from_dict({"check": [{"kind": "verify", "eps": [0.1], "norm": "l2"}]}, "bad")
