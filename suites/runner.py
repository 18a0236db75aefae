"""The runner: executes a suite against a model and data, item by item, and builds a Report.

The unit of work is one (check, eps, batch) item, seeded by (seed, dataset index) through
the attacks, written to results.jsonl as it finishes; a run is the merge of its items, which
is what makes `resume` exact. Each check runs through its kind (`kinds.py`) in a public
`RunContext`; the items are computed by the run's executor (executor.py: in this process
by default, or `RayExecutor` on Ray workers, the same report either way). Points the
model already misclassifies are never attacked; `cascade` checks attack only points still
robust (AutoAttack's scheme). With a defense
(`defense="raw_isp"` or the suite's `defense` key) every check runs against the defended
model; an adaptive suite's `ID-bpda` twins attack it with BPDA gradients. The same suite
runs on the undefended model first (into `out/undefended`), for the report's before/after
table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bastion.data import Dataset
from bastion.errors import ConfigError
from bastion.modes import eval_mode
from bastion.suites.defense_plan import defended_model, with_defense_checks, without_defense_checks
from bastion.suites.executor import Executor, InProcessExecutor, WorkEnv
from bastion.suites.json_codec import JsonObject, encode
from bastion.suites.progress import NoProgress, ProgressSink
from bastion.suites.report import Report
from bastion.suites.report_builder import RunOutcome, build_report
from bastion.suites.report_model import Normalization
from bastion.suites.results_log import ResultsLog
from bastion.suites.run_context import Model, RunContext, RunState
from bastion.suites.sanity import run_sanity_checks
from bastion.suites.suite import Suite, load_suite
from bastion.suites.threat_report import check_fail_under, resolve_threats
from bastion.threats import FailUnder, ThreatModel, default_threats, parse_fail_under, parse_threats
from bastion.validation import check_images, check_labels

__all__ = ["RunConfig", "RunState", "normalization", "run_suite"]

FailUnderArg = float | str | FailUnder | list[float | str | FailUnder] | None


@dataclass(frozen=True)
class RunConfig:
    """How a suite runs, resolved: the expanded suite, its threat models and criteria, the
    run's settings. `run_suite` builds one from its arguments; the undefended re-run of a
    defended suite is the same config with `undefended()`."""

    suite: Suite
    threats: tuple[ThreatModel, ...]
    fail_under: tuple[FailUnder, ...]
    batch_size: int = 128
    device: torch.device | None = None
    seed: int = 0
    out: Path | None = None
    resume: bool = False
    progress: ProgressSink | None = None
    model_info: JsonObject | None = None
    gallery: int = 8
    junit: Path | None = None
    profile: str | None = None  # the pytest plugin's profile (fast / full), recorded as is
    executor: Executor | None = None  # who computes the items (default: this process)
    baseline: Model | None = None  # the undefended model of a training-recipe defense

    def undefended(self) -> RunConfig:
        """The same run without the suite's defense, into `out/undefended`, no gallery, no
        criteria (the report's "before" column)."""
        return replace(
            self,
            suite=without_defense_checks(self.suite.with_defense(None)),
            fail_under=(),
            out=self.out / "undefended" if self.out is not None else None,
            gallery=0,
            junit=None,
            baseline=None,
            model_info=self._undefended_info(),
        )

    def _undefended_info(self) -> JsonObject:
        """The undefended run's model record: the bare model's (no defense label), or the
        baseline's (its `source` from the defended record's `baseline`, if given)."""
        info = {k: v for k, v in (self.model_info or {}).items() if k != "defense"}
        if self.baseline is None:
            return info
        return {"source": info["baseline"]} if "baseline" in info else {}


def run_suite(
    model: Model,
    data: Dataset,
    suite: str | Suite = "quick",
    *,
    eps: tuple[float, ...] | list[float] | None = None,
    n: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: ProgressSink | None = None,
    model_info: JsonObject | None = None,
    gallery: int = 8,
    fail_under: FailUnderArg = None,
    junit: str | Path | None = None,
    defense: str | None = None,
    adaptive: bool | None = None,
    threats: list[str | ThreatModel] | tuple[str | ThreatModel, ...] | None = None,
    profile: str | None = None,
    executor: Executor | None = None,
    baseline: Model | None = None,
) -> Report:
    """Run `suite` (a built-in name, a TOML path or a Suite) on `data` and return the Report.

    The headline is robust accuracy per threat model (`threats`, e.g. `["linf:8/255",
    "l2:0.5"]`; else the suite's own, else the data set's defaults), worst case over every
    attack of the suite. `eps` replaces the L∞ sweeps (curves) of the suite's checks.
    With `out`, per-item results stream to `out/results.jsonl` (resumable with `resume`)
    and report.json, report.html (and `junit` XML) are written there at the end.
    `fail_under` (`0.4`: every threat model; `"linf:8/255=0.4"`: one; or a list) makes the
    report fail when robust accuracy is below it.
    `defense="raw_isp"` runs the suite against `RawISP().wrap(model)` (overriding the
    suite's `defense` key); `adaptive=True` adds a BPDA twin of every gradient attack
    check (see `Suite.with_defense`). `profile` is recorded in the report (the pytest
    plugin's fast or full profile). `executor` computes the items: this process by default,
    or `RayExecutor(...)` (bastion.suites.ray_executor) on Ray workers, same report.
    `baseline` is the undefended model of a training-recipe defense (a distilled
    student's undistilled twin): the suite also runs on it (into `out/undefended`) for the
    defense table's undefended column, as a preprocessing defense's bare model does.
    """
    for name, value in (("batch_size", batch_size), ("n", n if n is not None else 1)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if gallery < 0:
        raise ConfigError(f"gallery must be >= 0, got {gallery}")
    suite_obj = load_suite(suite) if isinstance(suite, str) else suite
    if defense is not None or adaptive is not None:
        suite_obj = suite_obj.with_defense(
            defense or suite_obj.defense, suite_obj.adaptive if adaptive is None else adaptive
        )
    if eps:
        suite_obj = suite_obj.with_eps(tuple(float(e) for e in eps))
    defaults = default_threats(data.spec, tuple(data.x.shape[1:]))
    asked = parse_threats(list(threats)) if threats else suite_obj.threats
    suite_obj = suite_obj.at_threats(asked or defaults)
    threat_models = resolve_threats(suite_obj, asked, defaults)
    suite_obj, model_info = with_defense_checks(suite_obj, model, threat_models, model_info)
    criteria = _fail_under(fail_under) or suite_obj.fail_under
    check_fail_under(criteria, threat_models)
    config = RunConfig(
        suite=suite_obj,
        threats=threat_models,
        fail_under=criteria,
        batch_size=batch_size,
        device=torch.device(device) if device is not None else None,
        seed=seed,
        out=Path(out) if out is not None else None,
        resume=resume,
        progress=progress,
        model_info=model_info,
        gallery=gallery,
        junit=Path(junit) if junit is not None else None,
        profile=profile,
        executor=executor,
        baseline=baseline,
    )
    return run_config(model, data.subset(n) if n is not None else data, config)


def run_config(model: Model, data: Dataset, config: RunConfig) -> Report:
    """Run a resolved `RunConfig` on `data` (already cut to n) and return the Report; with
    `config.out`, write report.json, report.html (and JUnit XML) there."""
    started = time.perf_counter()
    dev = config.device or _model_device(model)
    if isinstance(model, torch.nn.Module):
        model = model.to(dev)
    check_images(data.x)
    check_labels(data.y, len(data))
    config = replace(config, device=dev)
    info: JsonObject = {**(config.model_info or {})}
    info.setdefault("sha256", _fingerprint(model))
    norm_info = normalization(model)  # of the model itself, not of a defense around it
    bpda_model = None
    undefended = None
    suite = config.suite
    if suite.defense is not None or config.baseline is not None:
        # the same suite on the model alone (or the baseline) first: the before/after table
        bare = config.baseline if config.baseline is not None else model
        undefended = run_config(bare, data, config.undefended()).model
    if suite.defense is not None:
        bpda_model = defended_model(model, suite.defense, bpda=True, seed=config.seed)
        model = defended_model(model, suite.defense, seed=config.seed)
        info.update(defense=suite.defense, adaptive=suite.adaptive)
    log = ResultsLog(config.out, _header(config, data, info, norm_info), config.resume)
    env = WorkEnv.of(model, data, dev, bpda_model)
    session = (config.executor or InProcessExecutor()).session(env)
    ctx = RunContext(
        model,
        data,
        dev,
        config.seed,
        config.batch_size,
        config.progress or NoProgress(),
        log,
        keep=math.ceil(config.gallery / max(1, sum(c.robustness for c in suite.checks))),
        bpda_model=bpda_model,
        executor=session,
    )
    try:
        with eval_mode(model):
            ctx.clean_pass()
            for check in suite.checks:
                ctx.run_check(check)
            flags, sanity = run_sanity_checks(
                model, data, ctx.state.correct, config.batch_size, dev, config.seed
            )
            shown = ctx.gallery(suite, config.gallery)
    finally:
        session.close()
        ctx.log.close()
    outcome = RunOutcome(
        suite=suite, data=data, state=ctx.state, items=ctx.log.ordered(),
        flags=flags, sanity=sanity, model_info=info, seed=config.seed, dev=dev,
        started=started, threats=config.threats, fail_under=config.fail_under,
        normalization=norm_info, gallery=shown, undefended=undefended, profile=config.profile,
    )  # fmt: skip
    report = Report(build_report(outcome), gallery=shown, figures=ctx.figures)
    if config.out is not None:
        report.write(config.out, junit=config.junit)
    return report


def _header(
    config: RunConfig, data: Dataset, info: JsonObject, norm: Normalization | None
) -> JsonObject:
    """The results.jsonl header: a resumed run must match it."""
    return {
        "model_sha256": info["sha256"],
        "data": data.spec,
        "split": data.split,
        "n": len(data),
        "suite": config.suite.to_dict(),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "threats": [str(t) for t in config.threats],
        "normalization": encode(norm) if norm is not None else None,
    }


def _fail_under(value: FailUnderArg) -> tuple[FailUnder, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(v if isinstance(v, FailUnder) else parse_fail_under(v) for v in values)


def normalization(model: Model) -> Normalization | None:
    """The mean/std of a `bastion.Normalized` model (what report.json records), else None."""
    from bastion.normalized import Normalized

    if isinstance(model, Normalized):
        return Normalization(
            mean=model.mean.flatten().cpu().tolist(), std=model.std.flatten().cpu().tolist()
        )
    return None


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _fingerprint(model: Model) -> str:
    from bastion.model_io import module_fingerprint

    if isinstance(model, torch.nn.Module):
        return module_fingerprint(model)
    return f"callable:{type(model).__qualname__}"
