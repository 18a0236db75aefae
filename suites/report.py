"""The Report of a run: the typed model (`ReportData`, what report.json holds), the
gallery images and check figures for the HTML, and the lookups a user asks of it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bastion.errors import ConfigError
from bastion.fileio import write_atomic
from bastion.suites.json_codec import JsonObject
from bastion.suites.report_model import CheckEntry, Flag, ReportData, ThreatEntry

if TYPE_CHECKING:
    from bastion.suites.gallery import GalleryItem

Figures = dict[str, object]
"""Images of fooling and scaling checks by check id (HTML only; see each kind's render)."""


@dataclass
class Report:
    """A finished run: `model` is the typed record (report.json); `gallery` the images
    for the HTML page; `figures` the images of fooling and scaling checks by check id."""

    model: ReportData
    gallery: list[GalleryItem] = field(default_factory=list)
    figures: Figures = field(default_factory=dict)

    @property
    def data(self) -> JsonObject:
        """report.json as a fresh dict (read it; change the run through `model`)."""
        return self.model.to_dict()

    @property
    def clean_accuracy(self) -> float:
        return self.model.clean_accuracy

    @property
    def passed(self) -> bool | None:
        return self.model.passed

    @property
    def flags(self) -> list[Flag]:
        return list(self.model.flags)

    @property
    def threat_models(self) -> list[ThreatEntry]:
        """The headline entries (threat, norm, eps, robust_accuracy, n, attacks, …)."""
        return list(self.model.threat_models)

    def robust_accuracy(self, attack: str | None = None, eps: float | str | None = None) -> float:
        """Robust accuracy at a threat model (`"linf:8/255"`: worst case over the suite's
        attacks), the first threat model's (no arguments), or one check's (by id or attack
        class name) at `eps` (its largest eps when None)."""
        from bastion.suites.threat_report import find_threat
        from bastion.threats import parse_eps

        if attack is not None and ":" in attack:
            if eps is not None:
                raise ConfigError(f"give the radius inside the threat model ({attack}), not eps")
            return find_threat(self.model.threat_models, attack).robust_accuracy
        eps = None if eps is None else parse_eps(eps)
        rows: list[tuple[float, float]]
        if attack is None:
            if eps is None:
                return self.model.robust_accuracy
            rows = [
                (r.eps, r.robust_accuracy)
                for points in self.model.robust_accuracy_by_norm.values()
                for r in points
            ]
        else:
            checks = [c for c in self.model.checks if _names(c, attack) and c.robustness]
            if not checks:
                names = ", ".join(c.id for c in self.model.checks)
                raise ConfigError(f"no check {attack!r} in this report; checks: {names}")
            rows = [(r.eps, r.robust_accuracy) for c in checks for r in c.results]
        if eps is None:
            eps = max(e for e, _ in rows)
        match = [a for e, a in rows if math.isclose(e, eps, rel_tol=1e-6)]
        if not match:
            have = ", ".join(sorted({f"{e:g}" for e, _ in rows}))
            raise ConfigError(f"eps {eps:g} was not evaluated; evaluated eps: {have}")
        return float(min(match))

    def verified_accuracy(self, check: str = "verify", eps: float | None = None) -> float:
        """Verified accuracy of a `verify` check (by id) at `eps` (its largest when None)."""
        from bastion.suites.report_model import VerifyResult

        verified = {
            c.id: rows
            for c in self.model.checks
            if (rows := [r for r in c.results if isinstance(r, VerifyResult)])
        }
        rows = verified.get(check, [])
        if not rows:
            names = ", ".join(verified)
            raise ConfigError(f"no verify check {check!r} in this report; verify checks: {names}")
        eps = max(r.eps for r in rows) if eps is None else eps
        match = [r for r in rows if math.isclose(r.eps, eps, rel_tol=1e-6)]
        if not match:
            raise ConfigError(f"eps {eps:g} was not verified; verified eps: "
                              + ", ".join(f"{r.eps:g}" for r in rows))  # fmt: skip
        return match[0].verified_accuracy

    def to_json(self) -> str:
        return self.model.to_json()

    def write(
        self, out: str | os.PathLike[str], *, junit: str | os.PathLike[str] | None = None
    ) -> dict[str, Path]:
        """Write report.json and report.html into `out` (atomically); optionally JUnit XML."""
        from bastion.suites.html_report import write_html
        from bastion.suites.junit import write_junit

        out_dir = Path(out)
        paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
        write_atomic(paths["json"], self.to_json())
        write_html(self.model, self.gallery, paths["html"], figures=self.figures)
        if junit is not None:
            paths["junit"] = Path(junit)
            write_junit(self.model, paths["junit"])
        return paths


def _names(check: CheckEntry, attack: str) -> bool:
    return attack.lower() in (check.id.lower(), check.attack.lower())


def mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2)
