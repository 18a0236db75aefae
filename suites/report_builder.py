"""Build the typed report (`ReportData`) from a finished run: the results.jsonl items, the
per-sample state, the flags; every number of report.json is computed here once."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import torch

import bastion
from bastion.suites.json_codec import JsonObject
from bastion.suites.kinds import kind_of
from bastion.suites.report_model import (
    CheckEntry,
    DataInfo,
    Environment,
    Flag,
    Normalization,
    NormPoint,
    Passes,
    ReportData,
    Timings,
    Undefended,
)

if TYPE_CHECKING:
    from bastion.data import Dataset
    from bastion.suites.gallery import GalleryItem
    from bastion.suites.results_log import Item
    from bastion.suites.run_context import RunState
    from bastion.suites.suite import Check, Suite
    from bastion.threats import FailUnder, ThreatModel


def check_entry(check: Check, **figures: object) -> CheckEntry:
    """A check's report entry: its definition, with `figures` (results, n, parts) set."""
    entry = CheckEntry(
        id=check.id,
        kind=check.kind,
        attack=check.attack,
        norm=check.norm or None,
        eps=list(check.eps),
        params=dict(check.params),
        n=check.n,
        cascade=check.cascade,
        criterion=str(check.criterion) if check.criterion else None,
        bpda=check.bpda,
        threats=(list(check.threat_norms) or True) if check.threats else None,
    )
    for k, v in figures.items():
        setattr(entry, k, v)
    return entry


def environment(dev: torch.device) -> Environment:
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        bastion=bastion.__version__,
        platform=platform.platform(),
        device=str(dev),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        cuda=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    )


@dataclass
class RunOutcome:
    """What a finished run hands the report builder."""

    suite: Suite
    data: Dataset
    state: RunState
    items: list[Item]
    flags: list[Flag]
    sanity: dict[str, int | float]
    model_info: JsonObject
    seed: int
    dev: torch.device
    started: float
    threats: tuple[ThreatModel, ...]
    fail_under: tuple[FailUnder, ...]
    normalization: Normalization | None
    gallery: list[GalleryItem]
    undefended: ReportData | None = None
    profile: str | None = None


def build_report(run: RunOutcome) -> ReportData:
    """The report of a finished run (see the module docstring)."""
    from bastion.suites.defense_report import defense_comparison
    from bastion.suites.evaluation_flags import evaluation_flags
    from bastion.suites.threat_report import threat_entries

    suite, state, items = run.suite, run.state, run.items
    n = state.n
    correct = state.correct
    checks = [kind_of(c).summarise(c, state, items, n) for c in suite.checks]
    threat_models = threat_entries(suite, state, checks, run.threats, run.fail_under)
    flags = [
        *run.flags,
        *evaluation_flags(suite, state, items, checks, threat_models, len(run.data.classes)),
    ]
    # each figure is taken over the samples its checks evaluated (checks may use a subset)
    sizes = {c.id: min(c.n or n, n) for c in suite.checks if c.robustness}
    by_norm: dict[str, list[NormPoint]] = {}
    worst = correct.clone()
    for norm, broken in state.broken_at.items():
        mine = [c for c in suite.checks if c.norm == norm]
        m = max(sizes[c.id] for c in mine)
        eps_values = sorted({e for c in mine for e in c.eps})
        by_norm[norm] = [
            NormPoint(e, m, float((correct & (broken > e))[:m].double().mean())) for e in eps_values
        ]
        worst &= broken > max(eps_values)
    common = min(sizes.values(), default=n)
    clean_items = [r for r in items if r.get("kind") == "clean"]
    criteria = [c.passed for c in checks if c.passed is not None]
    criteria += [t.passed for t in threat_models if t.passed is not None]
    sanity = run.sanity
    forward = sum(r["forward"] for r in items) + int(sanity.get("forward", 0))
    backward = sum(r["backward"] for r in items) + int(sanity.get("backward", 0))
    if threat_models:
        robust, robust_n = threat_models[0].robust_accuracy, threat_models[0].n
    else:
        robust = float(worst[:common].double().mean()) if common else 0.0
        robust_n = common
    return ReportData(
        bastion_version=bastion.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        environment=environment(run.dev),
        model=run.model_info,
        data=DataInfo(
            spec=run.data.spec,
            split=run.data.split,
            n=n,
            classes=list(run.data.classes),
            shape=list(run.data.x.shape[1:]),
        ),
        suite=suite.to_dict(),
        seed=run.seed,
        normalization=run.normalization,
        clean_accuracy=float(correct.double().mean()) if n else 0.0,
        threat_models=threat_models,
        robust_accuracy=robust,
        robust_accuracy_n=robust_n,
        robust_accuracy_by_norm=by_norm,
        checks=checks,
        flags=flags,
        sanity=sanity,
        timings=Timings(
            total_seconds=time.perf_counter() - run.started,
            clean_seconds=sum(r["seconds"] for r in clean_items),
            attack_seconds=sum(c.seconds for c in checks),
        ),
        passes=Passes(forward, backward),
        passed=all(criteria) if criteria else None,
        gallery=[g.ref() for g in run.gallery],
        fail_under=[str(f) for f in run.fail_under] or None,
        undefended=Undefended.of(run.undefended) if run.undefended is not None else None,
        profile=run.profile,
        defense=defense_comparison(run, checks, threat_models),
    )
