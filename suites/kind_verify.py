"""The `verify` check: verified accuracy and robustness intervals, item by item.

For each correctly classified image and each L∞ eps (increasing), the verifier answers
SAFE / UNSAFE / UNKNOWN; once an eps is UNSAFE every larger one is too (the same
counterexample lies in the larger ball), so it is not asked again. With `interval`, the
robustness interval of the image is then narrowed by bisection: `safe_up_to` is the
largest eps proved SAFE, `adversarial_at` the smallest L∞ distance of a real adversarial
example (a verifier counterexample, or any attack of the suite that ran before). Items of
a few images each go to results.jsonl as they finish, so a run resumes exactly.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bastion.errors import ConfigError
from bastion.suites.executor import Outcome, Progress, Work, WorkEnv
from bastion.suites.formatting import cell
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject, encode
from bastion.suites.kind_attack import COLUMNS as ATTACK_COLUMNS
from bastion.suites.kinds import Column, Table
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import CheckEntry, Interval, VerifyResult
from bastion.suites.results_log import Item, item_key
from bastion.suites.suite import Check, check_criterion, check_eps

if TYPE_CHECKING:
    from bastion.suites.run_context import RunContext, RunState

_PER_ITEM = 4  # images per results.jsonl item
VERIFY_PARAMS: JsonObject = {
    "timeout": 10.0,
    "engine": "auto",
    "interval": False,
    "interval_steps": 6,
}
COLUMNS = (
    ATTACK_COLUMNS[0],
    Column("verified acc", "verified_accuracy", ".3f"),
    Column("robust acc ≤", "robust_accuracy", ".3f"),
    Column("unsafe", "unsafe", "d"),
    Column("unknown", "unknown", "d"),
)


class VerifyKind:
    name = "verify"
    robustness = True
    metrics = ("verified_accuracy", "robust_accuracy")
    threat_twins = False  # runs at its own eps only
    sees_defense = False  # cannot see through a preprocessing defense

    def attack_name(self, raw: JsonObject, where: str) -> str:
        return "Verifier"

    def default_norm(self, attack: str) -> str:
        return "linf"

    def bounded(self, check: Check) -> bool:
        return True

    def validate(self, check: Check) -> None:
        from bastion.verify.verifier import ENGINES

        if check.norm != "linf":
            raise ConfigError(
                f"check {check.id!r}: {check.attack} does not support norm "
                f"{check.norm!r}; use one of linf"
            )
        check_eps(check)
        unknown = set(check.params) - set(VERIFY_PARAMS)
        if unknown:
            raise ConfigError(
                f"check {check.id!r}: unknown verify parameter(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(VERIFY_PARAMS)}"
            )
        p = {**VERIFY_PARAMS, **check.params}
        if not float(str(p["timeout"])) > 0:
            raise ConfigError(f"check {check.id!r}: timeout must be > 0 seconds")
        if p["engine"] not in ENGINES:
            raise ConfigError(f"check {check.id!r}: engine must be one of {', '.join(ENGINES)}")
        if not 1 <= int(str(p["interval_steps"])) <= 30:
            raise ConfigError(f"check {check.id!r}: interval_steps must be in 1..30")

    def run(self, ctx: RunContext, check: Check) -> None:
        _run(ctx, check)

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        return _summarise(check, state, items, total)

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        """The counterexamples found in this run, at the smallest eps with any."""
        # by eps, then dataset index: the same whichever order the items finished in
        found = sorted(
            (k for k in ctx.shots if k[0] == check.id), key=lambda k: (k[1] or 0.0, k[2])
        )
        if not found:
            return []
        eps0 = found[0][1]
        picks = [k[2] for k in found if k[1] == eps0][: ctx.keep]
        return ctx.gallery_items(check, eps0, picks)

    def table(self, entry: CheckEntry) -> Table:
        title = f"{entry.id}: {entry.attack} ({entry.norm}, n={entry.n})"
        return Table(title, COLUMNS, [vars(r).copy() for r in entry.results])

    def notes(self, entry: CheckEntry) -> list[str]:
        intervals = [r for r in entry.intervals or [] if r.safe_up_to is not None]
        if not intervals:
            return []
        safe = sorted(r.safe_up_to for r in intervals if r.safe_up_to is not None)
        adv = sorted(r.adversarial_at for r in intervals if r.adversarial_at is not None)
        return [
            f"{entry.id} robustness intervals over {len(intervals)} images: median proved "
            f"safe up to {safe[len(safe) // 2]:.4g}, median adversarial at "
            f"{cell(adv[len(adv) // 2] if adv else None, '.4g')} (L∞)"
        ]

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        return {"template": "kind_verify.html"}


def _run(run: RunContext, check: Check) -> None:
    """Verify the check's first n images at every eps; fold UNSAFE into the run state. The
    items (a few images each) are independent: they go to the run's executor together."""
    if not isinstance(run.model, torch.nn.Module):
        raise ConfigError(
            f"check {check.id!r}: the verifier needs the model as an nn.Module "
            "(or a TorchScript/torch.export/ONNX file), not a plain callable"
        )
    params = {**VERIFY_PARAMS, **check.params}
    n = min(check.n or len(run.data), len(run.data))
    groups = [torch.arange(s, min(s + _PER_ITEM, n)) for s in range(0, n, _PER_ITEM)]
    task = run.sink.task(f"{check.id} (verifier)", len(groups))
    broken = run.state.broken(check.norm)
    attacked = run.state.broken("linf")  # the attacks that ran before bound the interval
    done = 0

    def fold(rec: Item) -> None:
        nonlocal done
        for i, at in zip(rec["rows"]["index"], rec["rows"]["adversarial_at"], strict=True):
            if at is not None:
                broken[i] = min(float(broken[i]), at)
        done += 1
        task.update(done)

    works: list[Work] = []
    for b, idx in enumerate(groups):
        key = item_key("verify", check.id, None, b)
        rec = run.log.get(key)
        if rec is not None:  # finished before (resume)
            fold(rec)
            continue
        correct = run.state.correct[idx].tolist()
        works.append(
            VerifyWork(key, check, params, idx.tolist(), correct, attacked[idx].tolist(), run.seed)
        )
    for _, rec in run.execute(works):
        fold(rec)
    task.close()


_NETWORK: list[Any] = []  # [weak reference to the model, its extracted network]: the last one


def _network(model: torch.nn.Module, shape: tuple[int, ...]) -> Any:
    """The verifier's network of `model`, extracted once per process and model."""
    from bastion.verify.extract import extract

    if not _NETWORK or _NETWORK[0]() is not model:
        _NETWORK[:] = [weakref.ref(model), extract(model, shape)]
    return _NETWORK[1]


@dataclass(frozen=True)
class VerifyWork:
    """One verify item: the images `index` at every eps of `check` (and their intervals),
    computed wherever the executor runs it. `correct` and `attacked` (the smallest L∞ eps
    an earlier attack broke each at) come from the items before it."""

    key: str
    check: Check
    params: dict[str, Any]
    index: list[int]
    correct: list[bool]
    attacked: list[float]
    seed: int

    @property
    def indices(self) -> list[int]:
        return self.index

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        from bastion.verify.region import verify_region

        start = time.perf_counter()
        check, params = self.check, self.params
        eps_list = sorted(check.eps)
        keys = ("index", "status", "engine", "seconds", "safe_up_to", "adversarial_at", "layers")
        rows: dict[str, list[Any]] = {k: [] for k in keys}
        shots: dict[tuple[str, float | None, int], torch.Tensor] = {}
        model = env.model
        assert isinstance(model, torch.nn.Module)  # _run refused anything else
        network = _network(model, env.samples.shape)
        images, labels = env.samples.take(self.index)

        def ask(x: torch.Tensor, label: int, eps: float) -> Any:
            return verify_region(
                model, x, eps=eps, label=label, engine=params["engine"],
                timeout=float(params["timeout"]), seed=self.seed, network=network,
            )  # fmt: skip

        for k, (i, correct, attacked) in enumerate(
            zip(self.index, self.correct, self.attacked, strict=True)
        ):
            rows["index"].append(i)
            if not correct:
                rows["status"].append(["MISCLASSIFIED"] * len(eps_list))
                rows["engine"].append([None] * len(eps_list))
                rows["seconds"].append(0.0)
                rows["safe_up_to"].append(None)
                rows["adversarial_at"].append(0.0)
                rows["layers"].append([])
                continue
            t0 = time.perf_counter()
            x, label = images[k].to(env.dev), int(labels[k])
            statuses: list[str] = []
            engines: list[str | None] = []
            safe, adv = 0.0, math.inf
            layers: list[dict[str, Any]] = []
            for eps in eps_list:
                if adv <= eps:
                    statuses.append("UNSAFE")
                    engines.append("inclusion")
                    continue
                v = ask(x, label, eps)
                layers = v.layers  # the bound statistics at the largest eps verified
                statuses.append(v.status)
                engines.append(v.engine)
                if v.status == "SAFE":
                    safe = eps
                elif v.status == "UNSAFE":
                    adv = min(adv, _distance(v.counterexample, x))
                    shots[(check.id, eps, i)] = v.counterexample.cpu()
            if params["interval"]:
                safe, adv = _bisect(ask, x, label, safe, min(adv, attacked), params)
            rows["status"].append(statuses)
            rows["engine"].append(engines)
            rows["seconds"].append(time.perf_counter() - t0)
            rows["safe_up_to"].append(safe)
            rows["adversarial_at"].append(adv if math.isfinite(adv) else None)
            rows["layers"].append(layers)
            if progress is not None:
                progress(len(rows["index"]), len(self.index))
        record = {
            "kind": "verify",
            "check": check.id,
            "attack": check.attack,
            "eps": None,
            "eps_list": eps_list,
            "rows": rows,
            "seconds": time.perf_counter() - start,
            "forward": 0,
            "backward": 0,
        }
        return Outcome(record, shots)


def _distance(cex: torch.Tensor, x: torch.Tensor) -> float:
    """L∞ distance in float64 (float32 subtraction can round it past eps)."""
    return float((cex.double().cpu() - x.double().cpu()).abs().max())


def _bisect(
    ask: Any, x: torch.Tensor, label: int, safe: float, adv: float, params: dict[str, Any]
) -> tuple[float, float]:
    """Narrow [safe, adv]: SAFE raises the lower end, UNSAFE lowers the upper end to the
    counterexample's distance, UNKNOWN ends the search (nothing more can be proved)."""
    hi = adv if math.isfinite(adv) else 1.0
    for _ in range(int(params["interval_steps"])):
        if hi - safe <= 1e-4:
            break
        mid = (safe + hi) / 2
        v = ask(x, label, mid)
        if v.status == "SAFE":
            safe = mid
        elif v.status == "UNSAFE":
            adv = min(adv, _distance(v.counterexample, x))
            hi = min(mid, adv)
        else:
            break
    return safe, adv


def _summarise(check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
    """Per eps: verified accuracy (SAFE over all n images), the fractions UNSAFE and
    UNKNOWN, and `robust_accuracy` (an upper bound: not UNSAFE and correctly classified);
    per image: the interval [safe_up_to, adversarial_at] and the per-layer bound statistics
    (unstable neurons, widths) at the largest eps verified."""
    n = min(check.n or total, total)
    mine = [r for r in items if r.get("kind") == "verify" and r["check"] == check.id]
    eps_list = sorted(check.eps)
    statuses: dict[int, list[str]] = {}
    intervals: list[dict[str, Any]] = []
    seconds = 0.0
    for rec in mine:
        rows = rec["rows"]
        seconds += rec["seconds"]
        for k, i in enumerate(rows["index"]):
            statuses[i] = rows["status"][k]
            intervals.append(
                {
                    "index": i,
                    "label": int(state.label[i]),
                    "safe_up_to": rows["safe_up_to"][k],
                    "adversarial_at": rows["adversarial_at"][k],
                    "seconds": rows["seconds"][k],
                    "layers": rows.get("layers", [[]] * len(rows["index"]))[k],
                }
            )
    results: list[VerifyResult] = []
    for j, eps in enumerate(eps_list):
        column = [statuses[i][j] for i in sorted(statuses)]
        count = {s: column.count(s) for s in ("SAFE", "UNSAFE", "UNKNOWN", "MISCLASSIFIED")}
        results.append(
            VerifyResult(
                eps=eps,
                verified_accuracy=count["SAFE"] / n if n else 0.0,
                robust_accuracy=(count["SAFE"] + count["UNKNOWN"]) / n if n else 0.0,
                unsafe=count["UNSAFE"],
                unknown=count["UNKNOWN"],
                misclassified=count["MISCLASSIFIED"],
                verified=len(column),
            )
        )
    return check_entry(
        check,
        n=n,
        results=results,
        intervals=[Interval(**r) for r in sorted(intervals, key=lambda r: r["index"])],
        seconds=seconds,
        passed=check_criterion(check, [encode(r) for r in results]),
    )


KIND = VerifyKind()
