"""The main job exactly as a user types it, end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bastion_report_on_the_embedded_default(tmp_path: Path) -> None:
    exe = shutil.which("bastion") or str(Path(sys.executable).parent / "bastion")
    env = {**os.environ, "BASTION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [exe, "report"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "bastion-report"
    report = json.loads((out / "report.json").read_text())
    assert report["clean_accuracy"] >= 0.95
    assert [c["attack"] for c in report["checks"]] == ["FGSM", "PGD", "CarliniWagnerL2"]
    cw = report["checks"][2]["minimum_norm"]
    assert cw["success_rate"] == 1.0 and cw["mean_l2"] < 1.0
    assert report["flags"] == []
    assert (out / "report.html").stat().st_size > 10_000
    _renders_in_chromium(out / "report.html", tmp_path / "report.png")
    assert len((out / "results.jsonl").read_text().splitlines()) > 10
    # the second run loads the cached model instead of training it again
    again = subprocess.run(
        [exe, "report", "--out", "second"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["clean_accuracy"] == report["clean_accuracy"]
    assert second["checks"][0]["results"] == [
        {**r, "seconds": s["seconds"]}
        for r, s in zip(report["checks"][0]["results"], second["checks"][0]["results"], strict=True)
    ]


def _renders_in_chromium(html: Path, png: Path) -> None:
    """The real report renders with no console errors; BASTION_UPDATE_SCREENSHOT=1 makes
    its screenshot the one README.md shows."""
    from bastion.suites.browser import find_chromium, screenshot_html

    if find_chromium() is None:
        return  # the browser tests of tests/test_html_report.py say why they skip
    assert screenshot_html(html, png) == []
    assert png.stat().st_size > 50_000
    if os.environ.get("BASTION_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(png, Path(__file__).resolve().parents[1] / "docs" / "report-screenshot.png")
