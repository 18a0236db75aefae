"""The runner: executes a suite against a model and data, item by item, and builds a Report.

The unit of work is one (check, eps, batch) item, seeded by (seed, dataset index) through
the attacks, written to results.jsonl as it finishes; a run is the merge of its items, which
is what makes `resume` exact. Points the model already misclassifies are never attacked;
`cascade` checks attack only points still robust (AutoAttack's scheme). With a defense
(`defense="raw_isp"` or the suite's `defense` key) every check runs against the defended
model; an adaptive suite's `ID-bpda` twins attack it with BPDA gradients. The same suite
runs on the undefended model first (into `out/undefended`), for the report's before/after
table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.attacks.base import Attack
from bastion.data import Dataset
from bastion.errors import ConfigError, InvalidInputError
from bastion.modes import eval_mode
from bastion.results import distances
from bastion.suites.gallery import GalleryItem
from bastion.suites.progress import NoProgress, ProgressSink
from bastion.suites.report import Report, build_report
from bastion.suites.results_log import ResultsLog, item_key
from bastion.suites.sanity import run_sanity_checks
from bastion.suites.suite import Check, Suite, load_suite
from bastion.suites.threat_report import check_fail_under, resolve_threats
from bastion.threats import FailUnder, ThreatModel, default_threats, parse_fail_under, parse_threats
from bastion.validation import check_images, check_labels, check_logits

Model = Callable[[torch.Tensor], torch.Tensor]
Shot = tuple[str, float | None, int]
"""An adversarial image kept for the gallery: (check id, eps, dataset index)."""


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
    fail_under: float | str | FailUnder | list[float | str | FailUnder] | None = None,
    junit: str | Path | None = None,
    defense: str | None = None,
    adaptive: bool | None = None,
    threats: list[str | ThreatModel] | tuple[str | ThreatModel, ...] | None = None,
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
    check (see `Suite.with_defense`).
    """
    started = time.perf_counter()
    suite_obj = load_suite(suite) if isinstance(suite, str) else suite
    if defense is not None or adaptive is not None:
        suite_obj = suite_obj.with_defense(
            defense or suite_obj.defense, suite_obj.adaptive if adaptive is None else adaptive
        )
    if eps:
        suite_obj = suite_obj.with_eps(tuple(float(e) for e in eps))
    asked = parse_threats(list(threats)) if threats else suite_obj.threats
    suite_obj = suite_obj.at_threats(asked or default_threats(data.spec, tuple(data.x.shape[1:])))
    threat_models = resolve_threats(
        suite_obj, asked, default_threats(data.spec, tuple(data.x.shape[1:]))
    )
    criteria = _fail_under(fail_under) or suite_obj.fail_under
    check_fail_under(criteria, threat_models)
    norm_info = normalization(model)
    for name, value in (("batch_size", batch_size), ("n", n if n is not None else 1)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if gallery < 0:
        raise ConfigError(f"gallery must be >= 0, got {gallery}")
    if n is not None:
        data = data.subset(n)
    dev = torch.device(device) if device is not None else _model_device(model)
    if isinstance(model, torch.nn.Module):
        model = model.to(dev)
    check_images(data.x)
    check_labels(data.y, len(data))
    info = dict(model_info or {})
    info.setdefault("sha256", _fingerprint(model))
    bpda_model = None
    undefended = None
    if suite_obj.defense is not None:
        # the same suite on the model alone first: the report's before/after table
        undefended = run_suite(
            model, data, suite_obj.with_defense(None), batch_size=batch_size, device=dev,
            seed=seed, out=Path(out) / "undefended" if out is not None else None,
            resume=resume, progress=progress, model_info=model_info, gallery=0,
            threats=threat_models,
        )  # fmt: skip
        defense_name = suite_obj.defense
        model, bpda_model = _defended(model, defense_name), _defended(model, defense_name, True)
        info.update(defense=suite_obj.defense, adaptive=suite_obj.adaptive)
    header = {
        "model_sha256": info["sha256"],
        "data": data.spec,
        "split": data.split,
        "n": len(data),
        "suite": suite_obj.to_dict(),
        "seed": seed,
        "batch_size": batch_size,
        "threats": [str(t) for t in threat_models],
        "normalization": norm_info,
    }
    run = _Run(
        model,
        data,
        dev,
        seed,
        batch_size,
        progress or NoProgress(),
        ResultsLog(Path(out) if out is not None else None, header, resume),
        keep=math.ceil(gallery / max(1, sum(c.robustness for c in suite_obj.checks))),
        bpda_model=bpda_model,
    )
    try:
        with eval_mode(model):
            run.clean_pass()
            for check in suite_obj.checks:
                run.run_check(check)
            flags, sanity = run_sanity_checks(model, data, run.state.correct, batch_size, dev, seed)
            shown = run.gallery(suite_obj, gallery)
    finally:
        run.log.close()
    report = build_report(
        suite_obj,
        data,
        run.state,
        list(run.log.items.values()),
        flags,
        sanity,
        info,
        seed,
        dev,
        started,
        threats=threat_models,
        fail_under=criteria,
        normalization=norm_info,
    )
    report.gallery = shown
    report.figures = run.figures
    report.data["gallery"] = [
        {k: v for k, v in asdict(g).items() if k not in ("clean", "adv")} for g in shown
    ]
    if undefended is not None:
        report.data["undefended"] = _robustness_summary(undefended.data)
    if criteria:
        report.data["fail_under"] = [str(f) for f in criteria]
    if out is not None:
        report.write(out, junit=junit)
    return report


def _fail_under(
    value: float | str | FailUnder | list[float | str | FailUnder] | None,
) -> tuple[FailUnder, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(v if isinstance(v, FailUnder) else parse_fail_under(v) for v in values)


def normalization(model: Model) -> dict[str, list[float]] | None:
    """The mean/std of a `bastion.Normalized` model (what report.json records), else None."""
    from bastion.normalized import Normalized

    if isinstance(model, Normalized):
        return {
            "mean": model.mean.flatten().cpu().tolist(),
            "std": model.std.flatten().cpu().tolist(),
        }
    return None


def _robustness_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Clean and robust accuracy of a report, per check and eps (the "before" column)."""
    return {
        "clean_accuracy": data["clean_accuracy"],
        "robust_accuracy": data["robust_accuracy"],
        "threat_models": [
            {k: t[k] for k in ("threat", "robust_accuracy", "n")} for t in data["threat_models"]
        ],
        "checks": {
            c["id"]: [
                {"eps": r["eps"], "robust_accuracy": r["robust_accuracy"]} for r in c["results"]
            ]
            for c in data["checks"]
        },
    }


def _defended(model: Model, defense: str, bpda: bool = False) -> torch.nn.Module:
    """`model` behind `defense` (only "raw_isp" so far, checked by the suite): exact
    gradients through the torch ISP, or with `bpda` the same outputs with an identity
    backward pass (Athalye et al. 2018)."""
    from bastion.defenses.raw_isp import RawISP

    assert defense == "raw_isp"
    return RawISP(bpda=bpda).wrap(model)


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


def _name(names: list[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else str(k)


@dataclass
class _Run:
    """One run's context: the model and data, where results go, what is known so far."""

    model: Model
    data: Dataset
    dev: torch.device
    seed: int
    batch_size: int
    sink: ProgressSink
    log: ResultsLog
    keep: int  # adversarial images kept per item for the gallery
    bpda_model: Model | None = None  # the defended model with BPDA gradients (adaptive twins)
    state: RunState = field(init=False)
    shots: dict[Shot, torch.Tensor] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # fooling / scaling images per check

    def __post_init__(self) -> None:
        self.state = RunState(len(self.data), self.data.y.clone().long())

    def clean_pass(self) -> None:
        batches = _batches(len(self.data), self.batch_size)
        task = self.sink.task("clean accuracy", len(batches))
        for b, idx in enumerate(batches):
            key = item_key("clean", "", None, b)
            rec = self.log.get(key)
            if rec is None:
                start = time.perf_counter()
                with torch.no_grad():
                    logits = self._forward_checked(self.data.x[idx].to(self.dev))
                rec = self.log.put(
                    key,
                    {
                        "kind": "clean",
                        "index": idx.tolist(),
                        "pred": logits.argmax(1).cpu().tolist(),
                        "conf": logits.double().softmax(1).amax(1).cpu().tolist(),
                        "seconds": time.perf_counter() - start,
                        "forward": len(idx),
                        "backward": 0,
                    },
                )
            self.state.pred[rec["index"]] = torch.tensor(rec["pred"])
            self.state.conf[rec["index"]] = torch.tensor(rec["conf"], dtype=torch.float64)
            task.update(b + 1)
        task.close()

    def _forward_checked(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits, with a clear error when it cannot take this data."""
        shape = "×".join(map(str, x.shape[1:]))
        spec = self.data.spec
        try:
            logits = self.model(x)
        except RuntimeError as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise InvalidInputError(
                f"the model cannot take {shape} images from {spec!r} ({first[:160]}); give "
                "data of the size and channel count the model was trained on"
            ) from None
        check_logits(logits, x.shape[0])
        top = int(self.data.y.max()) if len(self.data) else 0
        if top >= logits.shape[1]:
            raise InvalidInputError(
                f"{spec!r} has labels up to {top} but the model has only "
                f"{logits.shape[1]} outputs; check --data"
            )
        return logits

    def attacked_model(self, check: Check) -> Model:
        """The model an attack check queries: the BPDA view for adaptive twins."""
        return self.bpda_model if check.bpda and self.bpda_model is not None else self.model

    def run_check(self, check: Check) -> None:
        if check.kind == "verify":
            from bastion.suites.verify_check import run_verify_check

            run_verify_check(self, check)
            return
        if check.kind == "fooling":
            from bastion.suites.fooling_check import run_fooling_check

            run_fooling_check(self, check)
            return
        if check.kind == "scaling":
            from bastion.suites.scaling_check import run_scaling_check

            run_scaling_check(self, check)
            return
        n = min(check.n or len(self.data), len(self.data))
        batches = _batches(n, self.batch_size)
        eps_list: list[float | None] = [*sorted(check.eps)] if check.spec.bounded else [None]
        task = self.sink.task(f"{check.id} ({check.attack})", len(batches) * len(eps_list))
        broken = self.state.broken(check.norm)
        done = 0
        for eps in eps_list:
            attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=self.seed)
            for b, idx in enumerate(batches):
                key = item_key("attack", check.id, eps, b)
                rec = self.log.get(key)
                if rec is None:
                    todo = idx[self.state.correct[idx]]
                    if check.cascade and eps is not None:
                        todo = todo[~(broken[todo] <= eps)]

                    def advance(k: int, m: int, base: int = done) -> None:
                        task.update(base + k / m)

                    rec = self.log.put(key, self._attack_item(attack, todo, check, eps, advance))
                _apply(rec, broken, eps)
                done += 1
                task.update(done)
        task.close()

    def _attack_item(
        self,
        attack: Attack,
        todo: torch.Tensor,
        check: Check,
        eps: float | None,
        advance: Callable[[int, int], None],
    ) -> dict[str, Any]:
        start = time.perf_counter()
        fields = ("pred_adv", "success", "l0", "l2", "linf", "queries", "gradients")
        rows: dict[str, list[Any]] = {
            "index": todo.tolist(),
            "label": self.data.y[todo].tolist(),
            "pred_clean": self.state.pred[todo].tolist(),
            **{f: [] for f in fields},
        }
        forward = backward = 0
        if len(todo):
            result = attack(
                self.attacked_model(check),
                self.data.x[todo].to(self.dev),
                self.data.y[todo].to(self.dev),
                indices=todo.to(self.dev),
                progress=advance,
            )
            values = {
                "pred_adv": result.pred_adv,
                "success": result.success,
                "queries": result.queries,
                "gradients": result.gradients,
                **{k: result.distances[k] for k in ("l0", "l2", "linf")},
            }
            rows.update({k: v.cpu().tolist() for k, v in values.items()})
            forward, backward = int(result.queries.sum()), int(result.gradients.sum())
            for j in result.success.nonzero().flatten()[: self.keep].tolist():
                self.shots[(check.id, eps, rows["index"][j])] = result.x_adv[j].cpu()
        return {
            "kind": "attack",
            "check": check.id,
            "attack": check.attack,
            "eps": eps,
            "seed": self.seed,
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "forward": forward,
            "backward": backward,
        }

    def gallery(self, suite: Suite, size: int) -> list[GalleryItem]:
        """A few successes per check, at its smallest eps with any. Images kept during this
        run are shown as they are; for items loaded on resume the attack is re-run on the
        chosen samples alone (attacks are per-sample deterministic: the same images)."""
        if size <= 0:
            return []
        out: list[GalleryItem] = []
        items = list(self.log.items.values())
        for check in suite.checks:
            if not check.robustness:  # fooling and scaling images have their own sections
                continue
            if check.kind == "verify":  # counterexamples found in this run, smallest eps
                mine = (k for k in self.shots if k[0] == check.id)
                found = sorted(mine, key=lambda k: k[1] or 0.0)
                if found:
                    eps0 = found[0][1]
                    picks = [k[2] for k in found if k[1] == eps0][: self.keep]
                    out += self._gallery_items(check, eps0, picks)
                continue
            recs = sorted(
                (r for r in items if r.get("check") == check.id),
                key=lambda r: (r["eps"] is None, r["eps"] or 0.0),
            )
            for rec in recs:
                rows = rec["rows"]
                picks = [i for i, s in zip(rows["index"], rows["success"], strict=True) if s]
                if picks:
                    out += self._gallery_items(check, rec["eps"], picks[: self.keep])
                    break
        return out[:size]

    def _gallery_items(
        self, check: Check, eps: float | None, picks: list[int]
    ) -> list[GalleryItem]:
        missing = [i for i in picks if (check.id, eps, i) not in self.shots]
        if missing and check.kind == "attack":
            idx = torch.tensor(missing)
            attack = check.spec.build(eps=eps, norm=check.norm, params=check.params, seed=self.seed)
            result = attack(
                self.attacked_model(check),
                self.data.x[idx].to(self.dev),
                self.data.y[idx].to(self.dev),
                indices=idx.to(self.dev),
            )
            for j in result.success.nonzero().flatten().tolist():
                self.shots[(check.id, eps, missing[j])] = result.x_adv[j].cpu()
        shown = [i for i in picks if (check.id, eps, i) in self.shots]
        if not shown:
            return []
        x = self.data.x[shown]
        adv = torch.stack([self.shots[(check.id, eps, i)] for i in shown])
        with torch.no_grad():
            probs = self.model(adv.to(self.dev)).double().softmax(1).cpu()
        dist = distances(x, adv)
        names, state = self.data.classes, self.state
        return [
            GalleryItem(
                check=check.id,
                attack=check.attack,
                eps=float(eps) if eps is not None else float(dist["l2"][j]),
                index=i,
                label=_name(names, int(self.data.y[i])),
                clean_pred=_name(names, int(state.pred[i])),
                clean_conf=float(state.conf[i]),
                adv_pred=_name(names, int(probs[j].argmax())),
                adv_conf=float(probs[j].max()),
                l2=float(dist["l2"][j]),
                linf=float(dist["linf"][j]),
                clean=x[j].permute(1, 2, 0).numpy(),
                adv=adv[j].permute(1, 2, 0).numpy(),
            )
            for j, i in enumerate(shown)
        ]


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
