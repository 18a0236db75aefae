"""The terminal summary: rich tables on a terminal, one plain line per row when piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_COLUMNS = (
    ("eps", "eps", "g"),
    ("robust acc", "robust_accuracy", ".3f"),
    ("success", "success_rate", ".3f"),
    ("attacked", "attacked", "d"),
    ("mean L2", "mean_l2", ".3f"),
    ("mean L∞", "mean_linf", ".3f"),
    ("seconds", "seconds", ".2f"),
)


_VERIFY_COLUMNS = (
    ("eps", "eps", "g"),
    ("verified acc", "verified_accuracy", ".3f"),
    ("robust acc ≤", "robust_accuracy", ".3f"),
    ("unsafe", "unsafe", "d"),
    ("unknown", "unknown", "d"),
)


_FOOLING_COLUMNS = (
    ("class", "name", "s"),
    ("confidence", "confidence", ".4f"),
    ("predicted", "predicted", "d"),
    ("generation", "generation", "d"),
)

_SCALING_COLUMNS = (
    ("scaler", "scaler", "s"),
    ("vulnerable", "vulnerable", "s"),
    ("attack success", "attack_success_rate", ".3f"),
    ("PSNR", "psnr_source", ".2f"),
    ("after median", "success_after_median", ".3f"),
    ("detection", "detection_rate", ".3f"),
    ("false pos.", "false_positive_rate", ".3f"),
)


def _fmt(value: float | str | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _title(check: dict[str, Any]) -> str:
    if check.get("kind") == "fooling":
        f = check["fooling"]
        return (
            f"{check['id']}: {check['attack']} (fooled at 0.99: "
            f"{_fmt(f['fooled_fraction'], '.3f')}, {f['generations']} generations)"
        )
    if check.get("kind") == "scaling":
        return f"{check['id']}: {check['attack']} (image-scaling audit, n={check['n']})"
    cascade = ", cascade" if check["cascade"] else ""
    return f"{check['id']}: {check['attack']} ({check['norm']}{cascade}, n={check['n']})"


def _rows(check: dict[str, Any]) -> tuple[tuple[tuple[str, str, str], ...], list[dict[str, Any]]]:
    """The columns and rows of a check's table: per eps, per class or per scaler."""
    kind = check.get("kind")
    if kind == "fooling":
        return _FOOLING_COLUMNS, list(check["fooling"]["classes"])
    if kind == "scaling":
        rows = [{**r, "vulnerable": "yes" if r["vulnerable"] else "no"} for r in check["scaling"]]
        return _SCALING_COLUMNS, rows
    return (_VERIFY_COLUMNS if kind == "verify" else _COLUMNS), list(check["results"])


def _check_notes(check: dict[str, Any]) -> list[str]:
    notes = []
    if check.get("kind") == "fooling":
        f = check["fooling"]
        notes.append(
            f"{check['id']} {check['attack']}: fooled_fraction {_fmt(f['fooled_fraction'], '.3f')} "
            f"(at 0.9999: {_fmt(f['fooled_fraction_0.9999'], '.3f')}) median_confidence "
            f"{_fmt(f['median_confidence'], '.4f')} queries {f['queries']} "
            f"seconds {check['seconds']:.1f}"
        )
    for r in check.get("scaling", []):
        notes.append(f"{check['id']} {r['scaler']}: {r['advice']}")
    if check.get("minimum_norm"):
        mn = check["minimum_norm"]
        notes.append(
            f"{check['id']} {check['attack']}: success_rate "
            f"{_fmt(mn['success_rate'], '.3f')} mean_l2 {_fmt(mn['mean_l2'], '.3f')} "
            f"median_l2 {_fmt(mn['median_l2'], '.3f')} attacked {mn['attacked']} "
            f"seconds {check['seconds']:.1f}"
        )
    intervals = [r for r in check.get("intervals", []) if r["safe_up_to"] is not None]
    if intervals:
        safe = sorted(r["safe_up_to"] for r in intervals)
        adv = sorted(r["adversarial_at"] for r in intervals if r["adversarial_at"] is not None)
        notes.append(
            f"{check['id']} robustness intervals over {len(intervals)} images: median proved "
            f"safe up to {safe[len(safe) // 2]:.4g}, median adversarial at "
            f"{_fmt(adv[len(adv) // 2] if adv else None, '.4g')} (L∞)"
        )
    if check.get("passed") is not None:
        notes.append(
            f"{check['id']} criterion {check['criterion']}: "
            f"{'passed' if check['passed'] else 'FAILED'}"
        )
    return notes


def _headline(report: dict[str, Any]) -> list[str]:
    """The clean accuracy, then one line per threat model: the figures a team quotes."""
    lines = [
        f"clean accuracy {report['clean_accuracy']:.3f} (n = {report['data']['n']}) · "
        f"{report['timings']['total_seconds']:.1f} s · {report['passes']['forward']} forward / "
        f"{report['passes']['backward']} backward passes"
    ]
    for t in report.get("threat_models") or []:
        verdict = ""
        if t.get("passed") is not None:
            verdict = f" · fail-under {t['fail_under']:g}: {'passed' if t['passed'] else 'FAILED'}"
        lines.append(
            f"robust accuracy {t['threat']}: {t['robust_accuracy']:.3f} (n = {t['n']}, worst "
            f"case over {len(t['attacks'])} check{'s' if len(t['attacks']) != 1 else ''} of "
            f"suite {report['suite']['name']})" + verdict
        )
    return lines


def _before_after(report: dict[str, Any]) -> list[str]:
    """`undefended → defended` robust accuracy per check and eps, when a defense ran."""
    before = report.get("undefended")
    if not before:
        return []
    name = report["model"].get("defense", "defense")
    lines = [
        f"{name}: clean accuracy {before['clean_accuracy']:.3f} → "
        f"{report['clean_accuracy']:.3f}, robust accuracy (worst case) "
        f"{before['robust_accuracy']:.3f} → {report['robust_accuracy']:.3f}"
    ]
    for check in report["checks"]:
        for r in check["results"]:
            old = next(
                (b["robust_accuracy"] for b in before["checks"].get(check["id"], [])
                 if b["eps"] == r["eps"]),
                None,
            )  # fmt: skip
            lines.append(
                f"{name} {check['id']} eps={r['eps']:g} robust_accuracy "
                f"{_fmt(old, '.3f')} → {_fmt(r.get('robust_accuracy'), '.3f')}"
            )
    return lines


def _normalization(norm: dict[str, list[float]] | None) -> str:
    if not norm:
        return "none (the model takes [0, 1] pixels)"
    return f"mean {norm['mean']} std {norm['std']}"


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the per-check results, the headline accuracies and the flags: tables on a
    terminal, plain `check attack norm key=value …` lines otherwise."""
    console = console or Console()
    for flag in report["flags"]:  # flags first: they say whether the numbers can be trusted
        console.print(
            "[yellow]warning[/] " + escape(f"[{flag['name']}] {flag['message']}"), highlight=False
        )
    model, data = report["model"], report["data"]
    defense = f" behind {model['defense']}" if model.get("defense") else ""
    console.print(
        escape(
            f"Bastion report · model {model.get('source', '?')} "
            f"({model.get('format', '?')}){defense} · data {data['spec']} ({data['n']} "
            f"samples) · suite {report['suite']['name']} · seed {report['seed']} · "
            f"normalization {_normalization(report.get('normalization'))}"
        ),
        highlight=False,
    )
    for check in report["checks"]:
        columns, rows = _rows(check)
        if console.is_terminal:
            table = Table(title=_title(check), title_justify="left")
            for header, _, _ in columns:
                table.add_column(header, justify="right")
            for r in rows:
                table.add_row(*(_fmt(r.get(key), spec) for _, key, spec in columns))
            console.print(table)
        else:
            for r in rows:
                figures = " ".join(f"{key}={_fmt(r.get(key), spec)}" for _, key, spec in columns)
                where = check["norm"] or check.get("kind")
                console.print(f"{check['id']} {check['attack']} {where} {figures}", highlight=False)
        for note in _check_notes(check):
            console.print(escape(note), highlight=False)
    for line in _headline(report):
        console.print(escape(line), highlight=False)
    for line in _before_after(report):
        console.print(escape(line), highlight=False)
