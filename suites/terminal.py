"""The terminal summary: rich tables on a terminal, plain lines when piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the per-check tables, the headline accuracies and the flags."""
    console = console or Console()
    model, data = report["model"], report["data"]
    console.print(
        f"[bold]Bastion report[/] · model {model.get('source', '?')} "
        f"({model.get('format', '?')}) · data {data['spec']} ({data['n']} samples) "
        f"· suite {report['suite']['name']} · seed {report['seed']}"
    )
    for check in report["checks"]:
        table = Table(
            title=f"{check['id']}: {check['attack']} ({check['norm']}"
            f"{', cascade' if check['cascade'] else ''}, n={check['n']})",
            title_justify="left",
        )
        for col in ("eps", "robust acc", "success", "attacked", "mean L2", "mean L∞", "seconds"):
            table.add_column(col, justify="right")
        for r in check["results"]:
            table.add_row(
                f"{r['eps']:g}",
                _fmt(r["robust_accuracy"]),
                _fmt(r["success_rate"]),
                str(r["attacked"]),
                _fmt(r["mean_l2"]),
                _fmt(r["mean_linf"]),
                _fmt(r["seconds"], ".2f"),
            )
        console.print(table)
        if check.get("minimum_norm"):
            mn = check["minimum_norm"]
            console.print(
                f"  {check['attack']}: success {_fmt(mn['success_rate'])}, "
                f"mean L2 {_fmt(mn['mean_l2'])}, median L2 {_fmt(mn['median_l2'])} "
                f"over {mn['attacked']} attacked, {check['seconds']:.1f} s"
            )
        if check.get("passed") is not None:
            verdict = "[green]passed[/]" if check["passed"] else "[red]FAILED[/]"
            console.print(f"  criterion {check['criterion']}: {verdict}")
    console.print(
        f"[bold]clean accuracy {report['clean_accuracy']:.3f}[/] · "
        f"[bold]robust accuracy (worst case over the suite) "
        f"{report['robust_accuracy']:.3f}[/] · "
        f"{report['timings']['total_seconds']:.1f} s · "
        f"{report['passes']['forward']} forward / {report['passes']['backward']} "
        "backward passes"
    )
    for flag in report["flags"]:
        console.print(
            "[yellow]warning[/] " + escape(f"[{flag['name']}] {flag['message']}"), highlight=False
        )
