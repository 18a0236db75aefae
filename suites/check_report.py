"""The Report of a check run from a test: tied to its entry in the session report, with
robust accuracies that explain themselves when an assertion on them fails, and `require`
for thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from bastion.errors import BastionError
from bastion.suites.report import Report
from bastion.suites.report_model import ReportData
from bastion.suites.session_report import Entry
from bastion.suites.thresholds import RobustAccuracy, RobustnessFailure, Threshold, explain
from bastion.threats import parse_eps


def surface(exc: BastionError) -> NoReturn:
    """Re-raise a mistake in the test's call (unknown suite, bad data spec) from the test's
    own line: the frames inside the runner say nothing the one-sentence message does not."""
    __tracebackhide__ = True
    raise exc.with_traceback(None) from None


@dataclass
class CheckReport(Report):
    """The Report of a check run from a test, tied to its entry in the session report."""

    entry: Entry | None = None
    locate: Callable[[], str | None] | None = None

    @property
    def cached(self) -> bool:
        return bool(self.entry and self.entry.cached)

    def location(self) -> str | None:
        """Where to read this check's full report (written on first call if need be)."""
        return self.locate() if self.locate is not None else None

    def robust_accuracy(
        self, attack: str | None = None, eps: float | str | None = None
    ) -> RobustAccuracy:
        value = super().robust_accuracy(attack, eps)
        eps = None if eps is None else parse_eps(eps)
        if eps is None and attack is not None:
            eps = _largest_eps(self.model, attack)
        return RobustAccuracy(
            value, report=self.model, attack=attack, eps=eps, location=self.location
        )

    def require(
        self, min_accuracy: float, attack: str | None = None, eps: float | None = None
    ) -> RobustAccuracy:
        """Fail the test unless robust accuracy (of `attack` at `eps`, or the worst case over
        the suite) is at least `min_accuracy`; the failure prints the robustness table."""
        __tracebackhide__ = True
        try:
            value = self.robust_accuracy(attack, eps)
        except BastionError as exc:
            surface(exc)
        threshold = Threshold(float(min_accuracy), attack, value.eps)
        if self.entry is not None:
            self.entry.threshold = threshold.to_dict(float(value))
        if value < min_accuracy:
            raise RobustnessFailure(
                "\n".join(explain(self.model, threshold, float(value), self.location()))
            )
        return value


def _largest_eps(report: ReportData, attack: str) -> float | None:
    eps = [
        r.eps
        for c in report.checks
        if attack.lower() in (c.id.lower(), c.attack.lower())
        for r in c.results
    ]
    return max(eps) if eps else None
