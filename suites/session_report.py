"""The session report of the pytest plugin: every check a test session ran, in one place.

Each check a test runs becomes an `Entry`: the test's node id, the check's kind (`suite`
today; verification and detector checks will add their own kinds and renderers), its cache
key, whether it came from the cache, the threshold it was held to, the test's outcome and
the check's own report.json dict. When a test finishes, its entries are appended, with the
check's rendered HTML page, to `DIR/parts/<worker>.jsonl` (one part per process, so xdist
workers never write the same file). At the end of the session the controller merges every
part into `DIR/report.json` and a self-contained `DIR/report.html` (a table of all checks,
then each check's full report as a section), and removes the parts.

No torch here: the controller of an xdist run merges without ever importing it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bastion
from bastion.fileio import write_atomic
from bastion.suites.report_model import ReportData

SESSION_FORMAT = "bastion-pytest-session/1"
PARTS = "parts"


def anchor(nodeid: str, index: int) -> str:
    """The HTML id of a test's `index`-th check (stable across workers)."""
    return "check-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid).strip("-") + f"-{index}"


@dataclass
class Entry:
    """One check run by one test."""

    nodeid: str
    index: int
    kind: str
    report: ReportData
    key: str | None = None
    cached: bool = False
    cache_source: str | None = None
    threshold: dict[str, Any] | None = None
    test_outcome: str | None = None
    worker: str = "main"
    gallery: Sequence[Any] = field(default_factory=list, repr=False)
    html: str | None = field(default=None, repr=False)

    @property
    def anchor(self) -> str:
        return anchor(self.nodeid, self.index)

    @property
    def verdict(self) -> str:
        """`passed`/`failed` by its threshold or its suite's criteria; without either, its
        test's outcome (a plain `assert report.robust_accuracy(…) >= …` decides that)."""
        if self.threshold is not None or self.report.passed is not None:
            failed = bool(self.threshold and self.threshold.get("passed") is False) or (
                self.report.passed is False
            )
            return "failed" if failed else "passed"
        return self.test_outcome or "recorded"

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"

    def to_dict(self, *, with_html: bool = False) -> dict[str, Any]:
        out = {
            "nodeid": self.nodeid,
            "index": self.index,
            "anchor": self.anchor,
            "kind": self.kind,
            "key": self.key,
            "cached": self.cached,
            "cache_source": self.cache_source,
            "threshold": self.threshold,
            "test_outcome": self.test_outcome,
            "verdict": self.verdict,
            "worker": self.worker,
            "report": self.report.to_dict(),
        }
        if with_html:
            out["html"] = self.html
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Entry:
        return cls(
            nodeid=str(raw["nodeid"]),
            index=int(raw["index"]),
            kind=str(raw["kind"]),
            report=ReportData.from_dict(raw["report"]),
            key=raw.get("key"),
            cached=bool(raw.get("cached")),
            cache_source=raw.get("cache_source"),
            threshold=raw.get("threshold"),
            test_outcome=raw.get("test_outcome"),
            worker=str(raw.get("worker", "main")),
            html=raw.get("html"),
        )


def _render_suite(entry: Entry) -> str:
    from bastion.suites.html_report import render_html

    return render_html(entry.report, entry.gallery)


# how each kind of check renders its own page; new kinds of checks register here
RENDERERS: dict[str, Callable[[Entry], str]] = {"suite": _render_suite}


def append_part(directory: Path, worker: str, entries: Iterable[Entry]) -> None:
    """Append finished entries (with their rendered pages) to this process's part file."""
    path = directory / PARTS / f"{worker}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for entry in entries:
        render = RENDERERS.get(entry.kind)
        entry.html = render(entry) if render is not None else None
        lines.append(json.dumps(entry.to_dict(with_html=True), allow_nan=False) + "\n")
    with path.open("a", encoding="utf-8") as f:
        f.writelines(lines)


def read_parts(directory: Path) -> list[Entry]:
    """Every entry the session's processes wrote, ordered by test and check."""
    entries = []
    for path in sorted((directory / PARTS).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries.append(Entry.from_dict(json.loads(line)))
    return sorted(entries, key=lambda e: (e.nodeid, e.index))


def clear_parts(directory: Path) -> None:
    shutil.rmtree(directory / PARTS, ignore_errors=True)


def summarize(entries: Sequence[Entry]) -> dict[str, Any]:
    return {
        "checks": len(entries),
        "tests": len({e.nodeid for e in entries}),
        "failed": sum(e.failed for e in entries),
        "cached": sum(e.cached for e in entries),
    }


def session_dict(entries: Sequence[Entry], options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format": SESSION_FORMAT,
        "bastion_version": bastion.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": dict(options),
        "summary": summarize(entries),
        "checks": [e.to_dict() for e in entries],
    }


def write_session(
    directory: Path, entries: Sequence[Entry], options: Mapping[str, Any]
) -> dict[str, Path]:
    """Write DIR/report.json and DIR/report.html for the whole session."""
    data = session_dict(entries, options)
    paths = {"json": directory / "report.json", "html": directory / "report.html"}
    write_atomic(paths["json"], json.dumps(data, indent=2, allow_nan=False))
    write_atomic(paths["html"], session_html(data, entries))
    return paths


# ---------------------------------------------------------------- HTML

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)
_STYLE = """
.session { max-width: 1200px; margin: 0 auto; padding: 24px 28px; }
.session h1 { font-size: 24px; margin: 0 0 4px; }
.session .sub { color: #6b7280; margin-bottom: 16px; overflow-wrap: anywhere; }
/* the table stays inside its card: long test ids, data specs and thresholds wrap anywhere,
   and whatever still does not fit scrolls inside the card, never the page */
.session-table { background: #fff; border: 1px solid #e5e7eb; border-radius: 10px;
  overflow-x: auto; max-width: 100%; }
.session table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; }
.session td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 10ch; }
.session th, .session td { border-bottom: 1px solid #e5e7eb; padding: 6px 10px; text-align: left; }
.session td.num { text-align: right; font-variant-numeric: tabular-nums; }
.session .bad { color: #b91c1c; font-weight: 600; } .session .ok { color: #047857; }
.session-check > .check-head { max-width: 1200px; margin: 0 auto; padding: 28px 28px 0; }
.session-check > .check-head h2 { font-size: 18px; margin: 0; overflow-wrap: anywhere; }
.session-check { border-top: 4px solid #e5e7eb; margin-top: 24px; }
"""


def _parts_of(page: str) -> tuple[str, str]:
    """The (style, body) of a rendered report page."""
    style = re.search(r"<style[^>]*>(.*?)</style>", page, re.S)
    body = re.search(r"<body[^>]*>(.*)</body>", page, re.S)
    return (style.group(1) if style else "", body.group(1) if body else page)


def _scoped(fragment: str, prefix: str) -> str:
    """Prefix a page's ids and in-page links so that many pages can share one document.
    (The pages escape every user string, so `id="` only ever comes from the template.)"""
    fragment = re.sub(r'(?<![\w-])id="([^"]*)"', rf'id="{prefix}-\1"', fragment)
    fragment = re.sub(r'\bhref="#([^"]*)"', rf'href="#{prefix}-\1"', fragment)
    return re.sub(r"url\(#([^)]*)\)", rf"url(#{prefix}-\1)", fragment)


def _pct(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "—"


def _threshold_text(threshold: Mapping[str, Any] | None) -> str:
    if not threshold:
        return "—"
    what = threshold.get("attack") or "worst case"
    eps = threshold.get("eps")
    at = f" @ {eps:g}" if isinstance(eps, (int, float)) else ""
    return f"{what}{at} ≥ {threshold.get('min_accuracy', 0):g}"


def session_html(data: Mapping[str, Any], entries: Sequence[Entry]) -> str:
    """One self-contained page: the session's table of checks, then each check's page."""
    e = html.escape
    styles, sections, rows = "", [], []
    for entry in entries:
        style, body = _parts_of(entry.html or "")
        styles = styles or style
        rep = entry.report
        verdict = entry.verdict
        css = "bad" if verdict == "failed" else "ok" if verdict == "passed" else ""
        rows.append(
            f'<tr><td class="wrap"><a href="#{e(entry.anchor)}">{e(entry.nodeid)}</a>'
            f"{f' (#{entry.index + 1})' if entry.index else ''}</td>"
            f'<td class="wrap">{e(rep.suite_name)}</td><td class="wrap">{e(rep.data.spec)}</td>'
            f'<td class="num">{_pct(rep.clean_accuracy)}</td>'
            f'<td class="num">{_pct(rep.robust_accuracy)}</td>'
            f'<td class="wrap">{e(_threshold_text(entry.threshold))}</td>'
            f'<td class="num">{_pct((entry.threshold or {}).get("value"))}</td>'
            f'<td class="{css}">{e(verdict)}</td><td>{"yes" if entry.cached else "no"}</td></tr>'
        )
        origin = f"from the cache ({entry.cache_source})" if entry.cached else "computed"
        sections.append(
            f'<section class="session-check" id="{e(entry.anchor)}"><div class="check-head">'
            f"<h2>{e(entry.nodeid)}{f' · check {entry.index + 1}' if entry.index else ''}</h2>"
            f"<div>{e(entry.kind)} check · threshold {e(_threshold_text(entry.threshold))} · "
            f"{e(origin)} · worker {e(entry.worker)}</div></div>"
            f"{_scoped(body, entry.anchor)}</section>"
        )
    summary = data.get("summary") or {}
    options = data.get("options") or {}
    opts = " · ".join(f"{k} {v}" for k, v in options.items() if v not in (None, False))
    table = (
        '<div class="session-table"><table><thead><tr><th>Test</th><th>Suite</th><th>Data</th>'
        "<th>Clean</th>"
        "<th>Robust (worst)</th><th>Threshold</th><th>Measured</th><th>Verdict</th>"
        "<th>Cached</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        if rows
        else "<p>No robustness checks ran in this session.</p>"
    )
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="Bastion {e(str(data.get("bastion_version")))}">\n'
        "<title>Bastion robustness checks · pytest session</title>\n"
        f"<style>{styles}{_STYLE}</style>\n</head>\n<body>\n"
        '<div class="session"><h1>Bastion robustness checks</h1>'
        f'<div class="sub">{summary.get("checks", 0)} checks in {summary.get("tests", 0)} tests'
        f" · {summary.get('failed', 0)} failed · {summary.get('cached', 0)} from the cache · "
        f"{e(str(data.get('created', '')))}{' · ' + e(opts) if opts else ''}</div>"
        f"{table}</div>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
