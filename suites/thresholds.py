"""Pass thresholds on robust accuracy, and the explanation a failing one prints.

A threshold is `min_accuracy` for one check (by id or attack name) at one eps, or for the
worst case over the suite. When it fails, the explanation names the model, data and run,
prints the robustness table (every check and eps: robust accuracy, success rate, points
attacked), says which attack broke it at which eps, and where the full report is. It is
what the pytest plugin shows instead of a bare `assert 0.31 >= 0.4`.

Pure Python over the report model: no torch, so the plugin can use it at any time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bastion.suites.formatting import NORM_LABELS, fmt_eps
from bastion.suites.json_codec import JsonObject
from bastion.suites.report_model import AttackResult, CheckEntry, ReportData, VerifyResult


class RobustnessFailure(AssertionError):
    """A robustness threshold the test asked for is not met; the message explains why."""


class SanityFlagWarning(UserWarning):
    """A check's evaluation may not be trustworthy (gradient masking, a random model, …)."""


@dataclass(frozen=True)
class Threshold:
    """`robust accuracy >= min_accuracy` for one check at one eps (its largest when None),
    or for the worst case over the suite (`attack=None`)."""

    min_accuracy: float
    attack: str | None = None
    eps: float | None = None

    def subject(self) -> str:
        """What is measured: `pgd at eps 0.1`, or the worst case over the suite."""
        if self.attack is None:
            what = "worst case over the suite"
            return what + (f" at eps {_eps(self.eps)}" if self.eps is not None else "")
        return self.attack + (f" at eps {_eps(self.eps)}" if self.eps is not None else "")

    def to_dict(self, value: float | None = None) -> JsonObject:
        return {
            "min_accuracy": self.min_accuracy,
            "attack": self.attack,
            "eps": self.eps,
            "value": value,
            "passed": None if value is None else value >= self.min_accuracy,
        }


class RobustAccuracy(float):
    """A robust accuracy that remembers where it came from, so that a failing
    `assert report.robust_accuracy("pgd", eps=0.1) >= 0.4` can print the whole table."""

    report: ReportData
    attack: str | None
    eps: float | None
    location: Callable[[], str | None] | None

    def __new__(
        cls,
        value: float,
        *,
        report: ReportData,
        attack: str | None = None,
        eps: float | None = None,
        location: Callable[[], str | None] | None = None,
    ) -> RobustAccuracy:
        self = super().__new__(cls, value)
        self.report, self.attack, self.eps, self.location = report, attack, eps, location
        return self


def _eps(value: float | None) -> str:
    return "-" if value is None else fmt_eps(value)


def _num(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _matches(check: CheckEntry, attack: str | None) -> bool:
    if attack is None:
        return True
    names = (check.id.lower(), check.attack.lower())
    return attack.lower() in names or _alias(attack) in names


def _alias(attack: str) -> str:
    # the aliases suites accept (pgd, cw); no import of the suite module (torch) here
    return {"cw": "carliniwagnerl2", "cw-l2": "carliniwagnerl2"}.get(attack.lower(), attack.lower())


def _success(r: AttackResult | VerifyResult) -> float | None:
    return r.success_rate if isinstance(r, AttackResult) else None


def _attacked(r: AttackResult | VerifyResult) -> float | None:
    return r.attacked if isinstance(r, AttackResult) else None


def robustness_table(report: ReportData, threshold: Threshold | None = None) -> list[str]:
    """One aligned line per (check, eps): robust accuracy, success rate, points attacked;
    rows that fall below the threshold are marked."""
    header = ("check", "attack", "norm", "eps", "robust acc", "success", "attacked", "")
    rows: list[tuple[str, ...]] = []
    for check in report.checks:
        relevant = threshold is not None and _matches(check, threshold.attack)
        for r in check.results:
            acc = r.robust_accuracy
            mark = ""
            if relevant and threshold is not None and acc < threshold.min_accuracy:
                mark = f"<- below {threshold.min_accuracy:g}"
            rows.append(
                (
                    check.id,
                    check.attack,
                    NORM_LABELS.get(str(check.norm), str(check.norm)),
                    _eps(r.eps),
                    _num(acc),
                    _num(_success(r)),
                    _num(_attacked(r), "d"),
                    mark,
                )
            )
    if threshold is not None and threshold.attack is None:
        for norm, points in report.robust_accuracy_by_norm.items():
            for p in points:
                below = p.robust_accuracy < threshold.min_accuracy
                rows.append(
                    (
                        "worst case",
                        "(all checks)",
                        NORM_LABELS.get(norm, norm),
                        _eps(p.eps),
                        _num(p.robust_accuracy),
                        "-",
                        _num(p.n, "d"),
                        f"<- below {threshold.min_accuracy:g}" if below else "",
                    )
                )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5, 6}
    return [
        "  ".join(
            (cell.rjust(w) if i in right else cell.ljust(w))
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def breaking_points(report: ReportData, threshold: Threshold) -> list[str]:
    """For each relevant check, the smallest eps at which its robust accuracy fell below."""
    lines = []
    for check in report.checks:
        if not _matches(check, threshold.attack):
            continue
        below = [
            r
            for r in sorted(check.results, key=lambda r: r.eps)
            if r.robust_accuracy < threshold.min_accuracy
        ]
        if not below:
            continue
        first = below[0]
        norm = NORM_LABELS.get(str(check.norm), str(check.norm))
        lines.append(
            f"{check.attack} (check {check.id!r}, {norm}) broke it at eps "
            f"{_eps(first.eps)}: robust accuracy {_num(first.robust_accuracy)} "
            f"< {threshold.min_accuracy:g}, success rate {_num(_success(first))}"
        )
    if not lines and threshold.attack is None:
        lines.append(
            "no single check falls below on its own; together they do (a point counts as "
            "robust only if no check broke it)"
        )
    return lines


def _context(report: ReportData) -> str:
    model, data = report.model, report.data
    sha = str(model.get("sha256") or "")
    parts = [
        f"model {model.get('source') or '?'}" + (f" (sha256 {sha[:12]}...)" if sha else ""),
        f"data {data.spec} ({data.split or '?'}, {data.n} samples)",
        f"suite {report.suite_name}",
        f"seed {report.seed}",
        f"device {report.environment.device}",
    ]
    if report.profile:
        parts.append(f"profile {report.profile}")
    return " · ".join(parts)


def explain(
    report: ReportData,
    threshold: Threshold,
    value: float,
    location: str | None = None,
    *,
    headline: bool = True,
) -> list[str]:
    """The lines that explain why `value` (robust accuracy) fails `threshold`: what broke it
    and where the report is first (pytest shortens long assertion explanations), then the
    run's context and the robustness table."""
    lines = []
    if headline:
        lines.append(
            f"robust accuracy {value:.3f} is below the required {threshold.min_accuracy:g}: "
            f"{threshold.subject()}"
        )
    lines += breaking_points(report, threshold)
    if location:
        lines.append(f"report: {location}")
    lines += ["", _context(report), f"clean accuracy {_num(report.clean_accuracy)}", ""]
    lines += robustness_table(report, threshold)
    for flag in report.flags:
        lines.append(f"warning [{flag.name}]: {flag.message}")
    return lines


def compare_repr(op: str, left: object, right: object) -> list[str] | None:
    """`pytest_assertrepr_compare` for comparisons of a RobustAccuracy with a number."""
    if isinstance(left, RobustAccuracy) and op in (">=", ">") and _is_number(right):
        acc, bound, text = left, float(right), f"{float(left):.3f} {op} {right}"  # type: ignore[arg-type]
    elif isinstance(right, RobustAccuracy) and op in ("<=", "<") and _is_number(left):
        acc, bound, text = right, float(left), f"{left} {op} {float(right):.3f}"  # type: ignore[arg-type]
    else:
        return None
    threshold = Threshold(bound, acc.attack, acc.eps)
    location = acc.location() if acc.location is not None else None
    return [
        f"robust accuracy of {threshold.subject()}: {text}",
        *explain(acc.report, threshold, float(acc), location, headline=False),
    ]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
