"""The runner: executes a suite against a model and data, item by item, and builds a Report.

The unit of work is one (check, eps, batch) item, seeded by (seed, dataset index) through
the attacks, written to results.jsonl as it finishes; a run is the merge of its items, which
is what makes `resume` exact. Points the model already misclassifies are never attacked;
`cascade` checks attack only points still robust (AutoAttack's scheme).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.attacks.base import eval_mode
from bastion.data import Dataset
from bastion.errors import ConfigError, InvalidInputError
from bastion.suites.gallery import GalleryItem
from bastion.suites.progress import NoProgress, ProgressSink
from bastion.suites.report import Report, build_report
from bastion.suites.results_log import ResultsLog, item_key
from bastion.suites.sanity import run_sanity_checks
from bastion.suites.suite import Check, Suite, load_suite
from bastion.validation import check_images, check_labels, check_logits

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RunState:
    """What the finished items say so far, per dataset sample."""

    n: int
    label: torch.Tensor
    pred: torch.Tensor = field(init=False)
    conf: torch.Tensor = field(init=False)
    # smallest eps (per norm) at which some check broke the sample; inf if none did
    broken_at: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pred = torch.full((self.n,), -1, dtype=torch.long)
        self.conf = torch.zeros(self.n, dtype=torch.float64)

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.label

    def broken(self, norm: str) -> torch.Tensor:
        return self.broken_at.setdefault(norm, torch.full((self.n,), math.inf, dtype=torch.float64))


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
    model_info: dict[str, Any] | None = None,
    gallery: int = 8,
    fail_under: float | None = None,
    junit: str | Path | None = None,
) -> Report:
    """Run `suite` (a built-in name, a TOML path or a Suite) on `data` and return the Report.

    With `out`, per-item results stream to `out/results.jsonl` (resumable with `resume`)
    and report.json, report.html (and `junit` XML) are written there at the end.
    `fail_under` makes the report fail when the worst-case robust accuracy is below it.
    """
    started = time.perf_counter()
    suite_obj = load_suite(suite) if isinstance(suite, str) else suite
    if eps:
        suite_obj = suite_obj.with_eps(tuple(float(e) for e in eps))
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if n is not None:
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        data = data.subset(n)
    dev = torch.device(device) if device is not None else _model_device(model)
    if isinstance(model, torch.nn.Module):
        model = model.to(dev)
    check_images(data.x)
    check_labels(data.y, len(data))
    info = dict(model_info or {})
    info.setdefault("sha256", _fingerprint(model))
    header = {
        "model_sha256": info["sha256"],
        "data": data.spec,
        "split": data.split,
        "n": len(data),
        "suite": suite_obj.to_dict(),
        "seed": seed,
        "batch_size": batch_size,
    }
    log = ResultsLog(Path(out) if out is not None else None, header, resume)
    sink = progress or NoProgress()
    state = RunState(len(data), data.y.clone().long())
    try:
        with eval_mode(model):
            _clean_pass(model, data, state, log, batch_size, dev, sink)
            for check in suite_obj.checks:
                _run_check(model, data, state, log, check, batch_size, dev, seed, sink)
            flags, sanity = run_sanity_checks(model, data, state.correct, batch_size, dev, seed)
            items = list(log.items.values())
            shown = _gallery(model, data, suite_obj, state, items, seed, dev, gallery)
            report = build_report(
                suite_obj, data, state, items, flags, sanity, info, seed, dev, started
            )
    finally:
        log.close()
    report.gallery = shown
    report.data["gallery"] = [
        {k: v for k, v in asdict(g).items() if k not in ("clean", "adv")} for g in shown
    ]
    if fail_under is not None:
        report.data["fail_under"] = fail_under
        report.data["passed"] = report.passed is not False and (
            report.robust_accuracy() >= fail_under)
    if out is not None:
        report.write(out, junit=junit)
    return report


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


def _batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _clean_pass(
    model: Model,
    data: Dataset,
    state: RunState,
    log: ResultsLog,
    batch_size: int,
    dev: torch.device,
    sink: ProgressSink,
) -> None:
    batches = _batches(len(data), batch_size)
    task = sink.task("clean accuracy", len(batches))
    for b, idx in enumerate(batches):
        key = item_key("clean", "", None, b)
        rec = log.get(key)
        if rec is None:
            start = time.perf_counter()
            with torch.no_grad():
                logits = _forward_checked(model, data, data.x[idx].to(dev))
            probs = logits.double().softmax(1)
            rec = log.put(
                key,
                {
                    "kind": "clean",
                    "index": idx.tolist(),
                    "pred": logits.argmax(1).cpu().tolist(),
                    "conf": probs.amax(1).cpu().tolist(),
                    "seconds": time.perf_counter() - start,
                    "forward": len(idx),
                    "backward": 0,
                },
            )
        state.pred[rec["index"]] = torch.tensor(rec["pred"])
        state.conf[rec["index"]] = torch.tensor(rec["conf"], dtype=torch.float64)
        task.update(b + 1)
    task.close()


def _forward_checked(model: Model, data: Dataset, x: torch.Tensor) -> torch.Tensor:
    """The model's logits, with a clear error when it cannot take this data."""
    shape = "×".join(map(str, x.shape[1:]))
    try:
        logits = model(x)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(
            f"the model cannot take {shape} images from {data.spec!r} "
            f"({first[:160]}); give data of the size and channel count "
            "the model was trained on"
        ) from None
    check_logits(logits, x.shape[0])
    if data.num_classes and int(data.y.max()) >= logits.shape[1]:
        raise InvalidInputError(
            f"{data.spec!r} has labels up to {int(data.y.max())} but the "
            f"model has only {logits.shape[1]} outputs; check --data"
        )
    return logits


def _run_check(
    model: Model,
    data: Dataset,
    state: RunState,
    log: ResultsLog,
    check: Check,
    batch_size: int,
    dev: torch.device,
    seed: int,
    sink: ProgressSink,
) -> None:
    n = min(check.n or len(data), len(data))
    batches = _batches(n, batch_size)
    eps_list: list[float | None] = [*sorted(check.eps)] if check.spec.bounded else [None]
    total = len(batches) * len(eps_list)
    task = sink.task(f"{check.id} ({check.attack})", total)
    broken = state.broken(check.norm)
    done = 0
    for eps in eps_list:
        attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=seed)
        for b, idx in enumerate(batches):
            key = item_key("attack", check.id, eps, b)
            rec = log.get(key)
            if rec is None:
                todo = idx[state.correct[idx]]
                if check.cascade and eps is not None:
                    todo = todo[~(broken[todo] <= eps)]

                def advance(k: int, m: int, base: int = done) -> None:
                    task.update(base + k / m)

                rec = log.put(
                    key, _attack_item(model, data, attack, todo, dev, advance, check, eps)
                )
            _apply(rec, broken, eps)
            done += 1
            task.update(done)
    task.close()


def _attack_item(
    model: Model,
    data: Dataset,
    attack: Any,
    todo: torch.Tensor,
    dev: torch.device,
    advance: Callable[[int, int], None],
    check: Check,
    eps: float | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    rows: dict[str, list[Any]] = {
        "index": todo.tolist(),
        "pred_adv": [],
        "success": [],
        "l0": [],
        "l2": [],
        "linf": [],
        "queries": [],
        "gradients": [],
    }
    forward = backward = 0
    if len(todo):
        result = attack(
            model,
            data.x[todo].to(dev),
            data.y[todo].to(dev),
            indices=todo.to(dev),
            progress=advance,
        )
        rows.update(
            pred_adv=result.pred_adv.cpu().tolist(),
            success=result.success.cpu().tolist(),
            l0=result.distances["l0"].cpu().tolist(),
            l2=result.distances["l2"].cpu().tolist(),
            linf=result.distances["linf"].cpu().tolist(),
            queries=result.queries.cpu().tolist(),
            gradients=result.gradients.cpu().tolist(),
        )
        forward, backward = int(result.queries.sum()), int(result.gradients.sum())
    return {
        "kind": "attack",
        "check": check.id,
        "attack": check.attack,
        "eps": eps,
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "forward": forward,
        "backward": backward,
    }


def _apply(rec: dict[str, Any], broken: torch.Tensor, eps: float | None) -> None:
    """Fold an item's successes into the per-sample smallest breaking eps."""
    rows = rec["rows"]
    if not rows["index"]:
        return
    idx = torch.tensor(rows["index"])
    success = torch.tensor(rows["success"], dtype=torch.bool)
    at = (
        torch.full((len(idx),), float(eps), dtype=torch.float64)
        if eps is not None
        else torch.tensor(rows["l2"], dtype=torch.float64)
    )
    at = torch.where(success, at, torch.full_like(at, math.inf))
    broken[idx] = torch.minimum(broken[idx], at)


def _gallery(
    model: Model,
    data: Dataset,
    suite: Suite,
    state: RunState,
    items: list[dict[str, Any]],
    seed: int,
    dev: torch.device,
    size: int,
) -> list[Any]:
    """Re-run each check on a few of its successes to show them (attacks are per-sample
    deterministic, so this reproduces the recorded adversarial images)."""
    if size <= 0:
        return []
    per_check = max(1, math.ceil(size / max(len(suite.checks), 1)))
    chosen: list[tuple[Check, float | None, list[int]]] = []
    for check in suite.checks:
        picks: list[int] = []
        for rec in sorted(
            (r for r in items if r.get("check") == check.id),
            key=lambda r: (r["eps"] is None, r["eps"] or 0.0),
        ):
            rows = rec["rows"]
            hits = [i for i, s in zip(rows["index"], rows["success"], strict=True) if s]
            if hits:
                picks = hits[:per_check]
                chosen.append((check, rec["eps"], picks))
                break
    out: list[Any] = []
    names = data.classes
    for check, eps, picks in chosen:
        idx = torch.tensor(picks)
        attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=seed)
        x = data.x[idx].to(dev)
        result = attack(model, x, data.y[idx].to(dev), indices=idx.to(dev))
        with torch.no_grad():
            conf_adv = model(result.x_adv).double().softmax(1).amax(1).cpu()
        for j, i in enumerate(picks):
            if not bool(result.success[j]):
                continue
            out.append(
                GalleryItem(
                    check=check.id,
                    attack=check.attack,
                    eps=float(eps) if eps is not None else float(result.distances["l2"][j]),
                    index=i,
                    label=_name(names, int(data.y[i])),
                    clean_pred=_name(names, int(state.pred[i])),
                    clean_conf=float(state.conf[i]),
                    adv_pred=_name(names, int(result.pred_adv[j])),
                    adv_conf=float(conf_adv[j]),
                    l2=float(result.distances["l2"][j]),
                    linf=float(result.distances["linf"][j]),
                    clean=x[j].permute(1, 2, 0).cpu().numpy(),
                    adv=result.x_adv[j].permute(1, 2, 0).cpu().numpy(),
                )
            )
    return out[:size]


def _name(names: list[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else str(k)
