"""The defense table of a defended run: robust accuracy undefended | defended | adaptive per
threat model (report.json's `defense`, the terminal's and the page's defense table).

* **undefended** — the same suite on the model without the defense (a preprocessing
  defense: `undefended/`), or for a DVERGE ensemble an independently trained baseline
  ensemble under the same transfer attacks; none for a distilled model (Bastion has no
  undistilled twin of it);
* **defended** — worst case per sample over the checks that do not adapt to the defense:
  the suite's attacks as they are (for DVERGE: the paper's transfer attacks, its threat
  model);
* **adaptive** — worst case over every check, with those that adapt to the defense
  (`defense_plan.py`: logits / T, EOT, BPDA; for DVERGE the white-box attacks on the
  ensemble itself). It is the report's headline, and never above the defended column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bastion.suites.formatting import cell
from bastion.suites.report_model import (
    CheckEntry,
    DefenseComparison,
    DefenseRow,
    ReportData,
    ThreatEntry,
)
from bastion.suites.threat_report import evaluates
from bastion.threats import ThreatModel

if TYPE_CHECKING:
    from bastion.suites.report_builder import RunOutcome
    from bastion.suites.suite import Check


def defense_comparison(
    run: RunOutcome, checks: list[CheckEntry], threats: list[ThreatEntry]
) -> DefenseComparison | None:
    """The defense table of a finished run (None when the run had no defense)."""
    label = run.model_info.get("defense")
    if not label:
        return None
    robust = [c for c in run.suite.checks if c.robustness]
    transfer = any(c.kind == "transfer" for c in robust)
    adaptive = [c.id for c in robust if _adapts(c, transfer)]
    defended = [c.id for c in robust if c.id not in adaptive]
    by_id = {c.id: c for c in checks}
    rows = []
    for t in threats:
        threat = ThreatModel(t.norm, t.eps)
        mine = [c.id for c in robust if evaluates(c, threat)]
        d = [i for i in mine if i in defended]
        a = [i for i in mine if i in adaptive]
        rows.append(
            DefenseRow(
                threat=t.threat,
                n=t.n,
                undefended=_undefended(run.undefended, [by_id[i] for i in d], t),
                defended=_worst(run, d, t) if d else None,
                adaptive=t.robust_accuracy if a else None,
            )
        )
    return DefenseComparison(
        defense=str(label),
        undefended_by=_undefended_by(run.undefended, transfer),
        defended_by=defended,
        adaptive_by=adaptive,
        note=_note(robust, transfer),
        rows=rows,
    )


def _adapts(check: Check, transfer: bool) -> bool:
    """Whether a check adapts to the defense: an adaptive twin, a BPDA twin, or (against a
    DVERGE ensemble, whose threat model is transfer) any white-box check."""
    return check.kind == "adaptive" or check.bpda or (transfer and check.kind != "transfer")


def _worst(run: RunOutcome, ids: list[str], t: ThreatEntry) -> float:
    """Robust accuracy at `t`, worst case per sample over the checks `ids` only."""
    n = run.state.n
    broken = torch.zeros(n, dtype=torch.bool)
    for rec in run.items:
        if rec.get("kind") not in ("attack", "transfer") or rec.get("check") not in ids:
            continue
        rows, at = rec["rows"], rec["eps"]
        l2s = rows.get("l2") or [0.0] * len(rows["index"])
        for i, s, l2 in zip(rows["index"], rows["success"], l2s, strict=True):
            reach = l2 if at is None else at
            if s and i < n and reach <= t.eps * (1 + 1e-9):
                broken[i] = True
    return float((run.state.correct & ~broken).double().mean()) if n else 0.0


def _undefended(
    before: ReportData | None, defended: list[CheckEntry], t: ThreatEntry
) -> float | None:
    if before is not None:
        return next((b.robust_accuracy for b in before.threat_models if b.threat == t.threat), None)
    for c in defended:
        for row in c.transfer or []:
            if abs(row.eps - t.eps) <= 1e-9 * max(1.0, t.eps):
                return row.baseline_robust_accuracy
    return None


def _undefended_by(before: ReportData | None, transfer: bool) -> str | None:
    if before is not None:
        source = before.model.get("source")
        model = f"the baseline model {source}" if source else "the model without the defense"
        return f"the same suite on {model} (its report: undefended/)"
    if transfer:
        return "an independently trained baseline ensemble under the same transfer attacks"
    return None


def _note(robust: list[Check], transfer: bool) -> str:
    """One sentence on how the adaptive column adapts."""
    from bastion.suites.kind_adaptive import view_label

    views: dict[str, list[str]] = {}
    for c in robust:
        if c.kind == "adaptive":
            views.setdefault(view_label(c.params), []).append(c.id)
    parts = [f"{v} ({', '.join(ids)})" for v, ids in views.items()]
    if any(c.bpda for c in robust):
        parts.append("BPDA (" + ", ".join(c.id for c in robust if c.bpda) + ")")
    if transfer:
        white = [c.id for c in robust if c.kind != "transfer"]
        return (
            "the transfer attacks plus the white-box attacks on the ensemble itself "
            f"({', '.join(white)})"
        )
    if not parts:
        return "no adaptive check ran (with a preprocessing defense, add --adaptive for BPDA)"
    return "the suite's attacks plus " + "; ".join(parts)


def defense_lines(report: ReportData) -> list[str]:
    """The defense table as terminal lines (one per threat model)."""
    d = report.defense
    if d is None:
        return []
    out = [f"defense {d.defense}: robust accuracy undefended | defended | adaptive"]
    for r in d.rows:
        out.append(
            f"defense {r.threat}: {cell(r.undefended, '.3f')} | {cell(r.defended, '.3f')} | "
            f"{cell(r.adaptive, '.3f')} (n = {r.n})"
        )
    out.append(f"defense adaptive: {d.note}")
    if d.undefended_by is None:
        out.append("defense note: no undefended model to compare with (—)")
    return out
