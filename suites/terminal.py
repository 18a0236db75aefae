"""The terminal summary: rich tables on a terminal, one plain line per row when piped."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bastion.suites.defense_report import defense_lines
from bastion.suites.formatting import cell
from bastion.suites.kinds import kind_of
from bastion.suites.report_model import CheckEntry, Normalization, ReportData


def _criterion_note(check: CheckEntry) -> list[str]:
    if check.passed is None:
        return []
    return [f"{check.id} criterion {check.criterion}: {'passed' if check.passed else 'FAILED'}"]


def _headline(report: ReportData) -> list[str]:
    """The clean accuracy, then one line per threat model: the figures a team quotes."""
    lines = [
        f"clean accuracy {report.clean_accuracy:.3f} (n = {report.data.n}) · "
        f"{report.timings.total_seconds:.1f} s · {report.passes.forward} forward / "
        f"{report.passes.backward} backward passes"
    ]
    for t in report.threat_models:
        verdict = ""
        if t.passed is not None and t.fail_under is not None:
            verdict = f" · fail-under {t.fail_under:g}: {'passed' if t.passed else 'FAILED'}"
        lines.append(
            f"robust accuracy {t.threat}: {t.robust_accuracy:.3f} (n = {t.n}, worst "
            f"case over {len(t.attacks)} check{'s' if len(t.attacks) != 1 else ''} of "
            f"suite {report.suite_name})" + verdict
        )
    return lines


def _before_after(report: ReportData) -> list[str]:
    """`undefended → defended` robust accuracy per check and eps, when a defense ran."""
    before = report.undefended
    if before is None:
        return []
    name = str(report.model.get("defense", "defense"))
    lines = [
        f"{name}: clean accuracy {before.clean_accuracy:.3f} → "
        f"{report.clean_accuracy:.3f}, robust accuracy (worst case) "
        f"{before.robust_accuracy:.3f} → {report.robust_accuracy:.3f}"
    ]
    for check in report.checks:
        for r in check.results:
            lines.append(
                f"{name} {check.id} eps={r.eps:g} robust_accuracy "
                f"{cell(before.robust_at(check.id, r.eps), '.3f')} → "
                f"{cell(r.robust_accuracy, '.3f')}"
            )
    return lines


def _normalization(norm: Normalization | None) -> str:
    if norm is None:
        return "none (the model takes [0, 1] pixels)"
    return f"mean {norm.mean} std {norm.std}"


def print_summary(report: ReportData, console: Console | None = None) -> None:
    """Print the per-check results, the headline accuracies and the flags: tables on a
    terminal, plain `check attack norm key=value …` lines otherwise."""
    console = console or Console()
    for flag in report.flags:  # flags first: they say whether the numbers can be trusted
        console.print(
            "[yellow]warning[/] " + escape(f"[{flag.name}] {flag.message}"), highlight=False
        )
    model, data = report.model, report.data
    defense = f" behind {model['defense']}" if model.get("defense") else ""
    console.print(
        escape(
            f"Bastion report · model {model.get('source', '?')} "
            f"({model.get('format', '?')}){defense} · data {data.spec} ({data.n} "
            f"samples) · suite {report.suite_name} · seed {report.seed} · "
            f"normalization {_normalization(report.normalization)}"
        ),
        highlight=False,
    )
    for check in report.checks:
        kind = kind_of(check)
        view = kind.table(check)
        if console.is_terminal:
            table = Table(title=view.title, title_justify="left")
            for c in view.columns:
                table.add_column(c.header, justify="right")
            for r in view.rows:
                table.add_row(*(cell(r.get(c.key), c.spec) for c in view.columns))
            console.print(table)
        else:
            for r in view.rows:
                figures = " ".join(f"{c.key}={cell(r.get(c.key), c.spec)}" for c in view.columns)
                where = check.norm or check.kind
                console.print(f"{check.id} {check.attack} {where} {figures}", highlight=False)
        for note in [*kind.notes(check), *_criterion_note(check)]:
            console.print(escape(note), highlight=False)
    for line in _headline(report):
        console.print(escape(line), highlight=False)
    for line in _before_after(report):
        console.print(escape(line), highlight=False)
    for line in defense_lines(report):
        console.print(escape(line), highlight=False)
