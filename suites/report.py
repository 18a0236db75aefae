"""The report model: one dict (what report.json holds) and the writers that render it."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import bastion
from bastion.errors import ConfigError
from bastion.fileio import write_atomic

if TYPE_CHECKING:
    from bastion.data import Dataset
    from bastion.suites.runner import RunState
    from bastion.suites.suite import Check, Suite
    from bastion.threats import FailUnder, ThreatModel


@dataclass
class Report:
    """A finished run: `data` is the JSON record; `gallery` the images for the HTML page;
    `figures` the images of fooling and scaling checks by check id (HTML only)."""

    data: dict[str, Any]
    gallery: list[Any] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def clean_accuracy(self) -> float:
        return float(self.data["clean_accuracy"])

    @property
    def passed(self) -> bool | None:
        return self.data.get("passed")

    @property
    def flags(self) -> list[dict[str, str]]:
        return list(self.data.get("flags", []))

    @property
    def threat_models(self) -> list[dict[str, Any]]:
        """The headline entries: `{threat, norm, eps, robust_accuracy, n, attacks, …}`."""
        return list(self.data.get("threat_models", []))

    def robust_accuracy(self, attack: str | None = None, eps: float | str | None = None) -> float:
        """Robust accuracy at a threat model (`"linf:8/255"`: worst case over the suite's
        attacks), the first threat model's (no arguments), or one check's (by id or attack
        class name) at `eps` (its largest eps when None)."""
        from bastion.suites.threat_report import find_threat
        from bastion.threats import parse_eps

        if attack is not None and ":" in attack:
            if eps is not None:
                raise ConfigError(f"give the radius inside the threat model ({attack}), not eps")
            return float(find_threat(self.threat_models, attack)["robust_accuracy"])
        eps = None if eps is None else parse_eps(eps)
        if attack is None:
            if eps is None:
                return float(self.data["robust_accuracy"])
            rows = [r for rows in self.data["robust_accuracy_by_norm"].values() for r in rows]
        else:
            checks = [
                c
                for c in self.data["checks"]
                if attack.lower() in (c["id"].lower(), c["attack"].lower())
                and c.get("kind", "attack") in ("attack", "verify")
            ]
            if not checks:
                names = ", ".join(c["id"] for c in self.data["checks"])
                raise ConfigError(f"no check {attack!r} in this report; checks: {names}")
            rows = [r for c in checks for r in c["results"]]
        if eps is None:
            eps = max(r["eps"] for r in rows)
        match = [r["robust_accuracy"] for r in rows if math.isclose(r["eps"], eps, rel_tol=1e-6)]
        if not match:
            have = ", ".join(sorted({f"{r['eps']:g}" for r in rows}))
            raise ConfigError(f"eps {eps:g} was not evaluated; evaluated eps: {have}")
        return float(min(match))

    def verified_accuracy(self, check: str = "verify", eps: float | None = None) -> float:
        """Verified accuracy of a `verify` check (by id) at `eps` (its largest when None)."""
        entry = next((c for c in self.data["checks"] if c["id"] == check), None)
        if entry is None or entry.get("kind") != "verify":
            names = ", ".join(c["id"] for c in self.data["checks"] if c.get("kind") == "verify")
            raise ConfigError(f"no verify check {check!r} in this report; verify checks: {names}")
        rows = entry["results"]
        eps = max(r["eps"] for r in rows) if eps is None else eps
        match = [r for r in rows if math.isclose(r["eps"], eps, rel_tol=1e-6)]
        if not match:
            raise ConfigError(f"eps {eps:g} was not verified; verified eps: "
                              + ", ".join(f"{r['eps']:g}" for r in rows))  # fmt: skip
        return float(match[0]["verified_accuracy"])

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, allow_nan=False)

    def write(
        self, out: str | os.PathLike[str], *, junit: str | os.PathLike[str] | None = None
    ) -> dict[str, Path]:
        """Write report.json and report.html into `out` (atomically); optionally JUnit XML."""
        from bastion.suites.html_report import write_html
        from bastion.suites.junit import write_junit

        out_dir = Path(out)
        paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
        write_atomic(paths["json"], self.to_json())
        write_html(self.data, self.gallery, paths["html"], figures=self.figures)
        if junit is not None:
            paths["junit"] = Path(junit)
            write_junit(self.data, paths["junit"])
        return paths


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2)


def _check_results(
    check: Check, state: RunState, items: list[dict[str, Any]], n: int
) -> list[dict[str, Any]]:
    """Per-eps figures of one check over its first n samples."""
    correct = state.correct[:n]
    mine = [r for r in items if r.get("kind") == "attack" and r["check"] == check.id]
    out = []
    for eps in sorted(check.eps):
        recs = [r for r in mine if r["eps"] is None or math.isclose(r["eps"], eps)]
        broken = torch.zeros(n, dtype=torch.bool)
        attacked = torch.zeros(n, dtype=torch.bool)
        l2s: list[float] = []
        linfs: list[float] = []
        for rec in recs:
            rows = rec["rows"]
            for i, s, l2, linf in zip(
                rows["index"], rows["success"], rows["l2"], rows["linf"], strict=True
            ):
                attacked[i] = True
                if s and (rec["eps"] is not None or l2 <= eps):
                    broken[i] = True
                    l2s.append(l2)
                    linfs.append(linf)
        robust = correct & ~broken & (attacked | ~torch.tensor(check.cascade).expand(n))
        bounded = recs and recs[0]["eps"] is not None
        out.append(
            {
                "eps": eps,
                "robust_accuracy": float(robust.double().mean()) if n else 0.0,
                "success_rate": float(broken.sum() / attacked.sum()) if attacked.any() else None,
                "attacked": int(attacked.sum()),
                "mean_l2": _mean(l2s),
                "median_l2": _median(l2s),
                "mean_linf": _mean(linfs),
                "seconds": sum(r["seconds"] for r in recs) if bounded else None,
                "forward": sum(r["forward"] for r in recs) if bounded else None,
                "backward": sum(r["backward"] for r in recs) if bounded else None,
            }
        )
    return out


def _check_entry(
    check: Check, state: RunState, items: list[dict[str, Any]], total: int
) -> dict[str, Any]:
    if check.kind == "verify":
        from bastion.suites.verify_report import verify_entry

        return verify_entry(check, state, items, total)
    if check.kind == "fooling":
        from bastion.suites.fooling_report import fooling_entry

        return fooling_entry(check, items)
    if check.kind == "scaling":
        from bastion.suites.scaling_report import scaling_entry
        from bastion.suites.suite import SCALING_N

        return scaling_entry(check, items, min(check.n or SCALING_N, total))
    n = min(check.n or total, total)
    mine = [r for r in items if r.get("kind") == "attack" and r["check"] == check.id]
    results = _check_results(check, state, items, n)
    entry: dict[str, Any] = {
        **check.to_dict(),
        "n": n,
        "results": results,
        "seconds": sum(r["seconds"] for r in mine),
        "forward": sum(r["forward"] for r in mine),
        "backward": sum(r["backward"] for r in mine),
    }
    if not check.bounded:
        rows = [
            (s, l2)
            for r in mine
            for s, l2 in zip(r["rows"]["success"], r["rows"]["l2"], strict=True)
        ]
        l2s = [l2 for s, l2 in rows if s]
        entry["minimum_norm"] = {
            "attacked": len(rows),
            "success_rate": len(l2s) / len(rows) if rows else None,
            "mean_l2": _mean(l2s),
            "median_l2": _median(l2s),
        }
    entry["passed"] = None
    if check.criterion is not None:
        crit = check.criterion
        rows_at = [r for r in results if crit.eps is None or math.isclose(r["eps"], crit.eps)]
        entry["passed"] = all(crit.holds(r[crit.metric]) for r in rows_at)
    return entry


def _environment(dev: torch.device) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bastion": bastion.__version__,
        "platform": platform.platform(),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }


def build_report(
    suite: Suite,
    data: Dataset,
    state: RunState,
    items: list[dict[str, Any]],
    flags: list[dict[str, str]],
    sanity: dict[str, Any],
    model_info: dict[str, Any],
    seed: int,
    dev: torch.device,
    started: float,
    threats: tuple[ThreatModel, ...] = (),
    fail_under: tuple[FailUnder, ...] = (),
    normalization: dict[str, list[float]] | None = None,
) -> Report:
    from bastion.suites.evaluation_flags import evaluation_flags
    from bastion.suites.threat_report import threat_entries

    n = state.n
    correct = state.correct
    checks = [_check_entry(c, state, items, n) for c in suite.checks]
    threat_models = threat_entries(suite, state, checks, threats, fail_under)
    flags = [
        *flags,
        *evaluation_flags(suite, state, items, checks, threat_models, len(data.classes)),
    ]
    # each figure is taken over the samples its checks evaluated (checks may use a subset)
    sizes = {c.id: min(c.n or n, n) for c in suite.checks if c.robustness}
    by_norm: dict[str, list[dict[str, float]]] = {}
    worst = correct.clone()
    for norm, broken in state.broken_at.items():
        mine = [c for c in suite.checks if c.norm == norm]
        m = max(sizes[c.id] for c in mine)
        eps_values = sorted({e for c in mine for e in c.eps})
        by_norm[norm] = [
            {
                "eps": e,
                "n": m,
                "robust_accuracy": float((correct & (broken > e))[:m].double().mean()),
            }
            for e in eps_values
        ]
        worst &= broken > max(eps_values)
    common = min(sizes.values(), default=n)
    clean_items = [r for r in items if r.get("kind") == "clean"]
    criteria = [c["passed"] for c in checks + threat_models if c["passed"] is not None]
    forward = sum(r["forward"] for r in items) + sanity.get("forward", 0)
    backward = sum(r["backward"] for r in items) + sanity.get("backward", 0)
    data_dict = {
        "bastion_version": bastion.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": _environment(dev),
        "model": model_info,
        "data": {
            "spec": data.spec,
            "split": data.split,
            "n": n,
            "classes": list(data.classes),
            "shape": list(data.x.shape[1:]),
        },
        "suite": suite.to_dict(),
        "seed": seed,
        "normalization": normalization,
        "clean_accuracy": float(correct.double().mean()) if n else 0.0,
        "threat_models": threat_models,
        "robust_accuracy": (
            threat_models[0]["robust_accuracy"]
            if threat_models
            else float(worst[:common].double().mean())
            if common
            else 0.0
        ),
        "robust_accuracy_n": threat_models[0]["n"] if threat_models else common,
        "robust_accuracy_by_norm": by_norm,
        "checks": checks,
        "flags": flags,
        "sanity": sanity,
        "timings": {
            "total_seconds": time.perf_counter() - started,
            "clean_seconds": sum(r["seconds"] for r in clean_items),
            "attack_seconds": sum(c["seconds"] for c in checks),
        },
        "passes": {"forward": forward, "backward": backward},
        "passed": all(criteria) if criteria else None,
    }
    return Report(data=data_dict)
