"""What the HTML pages show where a per-eps figure is not defined (CW), and that the pytest
session page's table fits a 1400-pixel window."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from test_html_report import make_gallery, make_report

from bastion.suites.browser import FLAGS, find_chromium
from bastion.suites.html_report import render_html
from bastion.suites.report_model import AttackResult, ReportData
from bastion.suites.session_report import Entry, session_html


def _with_cw_as_run(report: ReportData) -> ReportData:
    """The report with its CW check as the runner records it: one minimum-norm run, so no
    per-eps time or passes, and the run's totals on the check."""
    cw = next(c for c in report.checks if c.attack == "CarliniWagnerL2")
    cw.results = [
        replace(r, seconds=None, forward=None, backward=None)
        for r in cw.results
        if isinstance(r, AttackResult)
    ]
    cw.seconds, cw.forward, cw.backward = 31.5, 24_618, 24_570
    return report


def _check_section(page: str, check_id: str) -> str:
    start = page.index(f"<h3>{check_id}</h3>")
    end = page.find("<h3>", start + 1)
    return page[start : end if end != -1 else len(page)]


def test_cw_rows_show_the_runs_time_and_passes_once_not_dashes() -> None:
    page = render_html(_with_cw_as_run(make_report()), [])
    cw = _check_section(page, "cw-l2")
    body = cw[cw.index("<tbody>") : cw.index("</tbody>")]
    assert body.count('rowspan="3"') == 3  # time, forward, backward span the 3 eps rows
    assert "31.5 s" in body and "24,618" in body and "24,570" in body
    assert "—" not in body  # every cell has a figure
    assert "minimum-norm attack" in cw
    # a bounded attack keeps its own per-eps figures and no note
    pgd = _check_section(page, "pgd")
    assert "rowspan" not in pgd and "minimum-norm" not in pgd


def _session_page() -> str:
    report = make_report()
    entries = []
    for nodeid in (
        "tests/robustness/test_release_candidate_models.py::test_resnet18_cifar10_is_"
        "robust_under_linf_8_255_with_the_standard_suite[seed-0-device-cpu-fast]",
        "tests/test_model.py::test_small",
    ):
        entry = Entry(nodeid=nodeid, index=0, kind="attack", report=report)
        entry.threshold = {"attack": "PGD", "eps": 0.1, "min_accuracy": 0.4, "value": 0.45}
        entry.html = render_html(report, make_gallery())
        entries.append(entry)
    return session_html({"summary": {"checks": 2, "tests": 2}, "created": "now"}, entries)


def _widths(chromium: str, page: str, tmp_path: Path, extra_css: str = "") -> tuple[int, int]:
    """(the document's scroll width, the session table's right edge) at 1400 × 900 px."""
    probe = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    probe = probe.replace("</style>", extra_css + "</style>", 1)
    script = (
        "<script>const t = document.querySelector('.session table').getBoundingClientRect();"
        "document.title = document.documentElement.scrollWidth + ' ' + Math.round(t.right);"
        "</script>"
    )
    path = tmp_path / "probe.html"
    path.write_text(probe.replace("</body>", script + "</body>"), encoding="utf-8")
    flags = [f for f in FLAGS if not f.startswith(("--enable-logging", "--v="))]
    out = subprocess.run(
        [chromium, *flags, "--window-size=1400,900", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    match = re.search(r"<title>(\d+) (\d+)</title>", out)
    assert match, out[-2000:]
    return int(match[1]), int(match[2])


@pytest.mark.browser
def test_session_table_fits_a_1400_pixel_window(tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium not found on PATH (Debian: apt-get install -y chromium)")
    page = _session_page()
    page_width, table_right = _widths(chromium, page, tmp_path)
    assert page_width <= 1400 and table_right <= 1400
    # the measurement can fail: without the wrapping rules the long test id overflows
    unwrapped = ".session td.wrap { white-space: nowrap; overflow-wrap: normal; }"
    assert _widths(chromium, page, tmp_path, unwrapped)[1] > 1400
