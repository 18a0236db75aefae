"""The `scaling` check: an image-scaling audit per resizer, one resumable item per resizer.

For each scaler of the check, `scaling_audit` runs on the check's first n images (the
model's input size; the attack images are `ratio`× larger and scaled down by the scaler
in front of the model): attack success, PSNR/SSIM to the source, success left after the
selective median filter, Decamouflage's detection and false-positive rates, and advice.
One extra attack on the first (source, target) pair of different classes is kept for the
report (source | attack image | what the model sees) when the source is at most
`EXAMPLE_PIXELS` on its long side; larger ones would bloat results.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from bastion.errors import ConfigError
from bastion.suites.executor import Outcome, Progress, Work, WorkEnv
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject, decode, encode
from bastion.suites.kinds import Column, Table
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import CheckEntry, ScalingRow
from bastion.suites.results_log import Item, item_key
from bastion.suites.suite import Check, unknown_params, validate_generative

if TYPE_CHECKING:
    from bastion.suites.run_context import RunContext, RunState

SCALING_PARAMS: JsonObject = {"scalers": ["cv2.linear", "cv2.area"], "ratio": 4, "pairs": 8}
SCALING_N = 32  # images a scaling check audits when it sets no n
COLUMNS = (
    Column("scaler", "scaler", "s"),
    Column("vulnerable", "vulnerable", "s"),
    Column("attack success", "attack_success_rate", ".3f"),
    Column("PSNR", "psnr_source", ".2f"),
    Column("after median", "success_after_median", ".3f"),
    Column("detection", "detection_rate", ".3f"),
    Column("false pos.", "false_positive_rate", ".3f"),
)

EXAMPLE_PIXELS = 256
_SUMMARY = (
    "scaler", "input_size", "source_size", "pairs", "attack_success_rate", "psnr_source",
    "ssim_source", "psnr_target", "success_after_median", "median_benign_agreement",
    "detection_rate", "false_positive_rate", "vulnerable", "advice",
)  # fmt: skip


class _Counting(torch.nn.Module):
    """The model, counting the images sent to it (the audit does not count its queries)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += x.shape[0]
        return self.model(x)


class ScalingKind:
    name = "scaling"
    robustness = False
    metrics = ("detection_rate",)
    threat_twins = False
    sees_defense = True

    def attack_name(self, raw: JsonObject, where: str) -> str:
        return "ScalingAttack"

    def default_norm(self, attack: str) -> str:
        return ""

    def bounded(self, check: Check) -> bool:
        return False

    def validate(self, check: Check) -> None:
        from bastion.attacks.scalers import get_scaler

        validate_generative(check, 4)
        unknown_params(check, tuple(SCALING_PARAMS))
        p = {**SCALING_PARAMS, **check.params}
        scalers = p["scalers"]
        if not isinstance(scalers, list) or not scalers:
            raise ConfigError(f"check {check.id!r}: scalers must be a non-empty list of names")
        for name in scalers:
            get_scaler(str(name))  # raises ConfigError naming the known scalers
        for key, low in (("ratio", 2), ("pairs", 1)):
            value = p[key]
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"check {check.id!r}: {key} must be an integer >= {low}")

    def run(self, ctx: RunContext, check: Check) -> None:
        _run(ctx, check)

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        """`scaling`: per scaler (in the check's order) vulnerable?, attack success,
        PSNR/SSIM to the source, success after the median filter, detection rate,
        false-positive rate and advice; `vulnerable` is true when any scaler is. A
        `detection_rate` criterion must hold for every scaler. `results` stays empty."""
        mine = [r for r in items if r.get("kind") == "scaling" and r["check"] == check.id]
        # items are keyed `scaling|ID||B` with B the scaler's place in the check
        mine.sort(key=lambda r: int(r["key"].rsplit("|", 1)[1]))
        rows = [decode(ScalingRow, r["audit"]) for r in mine]
        crit = check.criterion
        return check_entry(
            check,
            n=min(check.n or SCALING_N, total),
            scaling=rows,
            vulnerable=any(r.vulnerable for r in rows),
            seconds=sum(r["seconds"] for r in mine),
            forward=sum(r["forward"] for r in mine),
            passed=None
            if crit is None
            else bool(rows) and all(crit.holds(getattr(r, crit.metric)) for r in rows),
        )

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        return []  # the scaling examples have their own section

    def table(self, entry: CheckEntry) -> Table:
        title = f"{entry.id}: {entry.attack} (image-scaling audit, n={entry.n})"
        rows: list[JsonObject] = []
        for r in entry.scaling or []:
            row = encode(r)
            assert isinstance(row, dict)
            rows.append({**row, "vulnerable": "yes" if r.vulnerable else "no"})
        return Table(title, COLUMNS, rows)

    def notes(self, entry: CheckEntry) -> list[str]:
        return [f"{entry.id} {r.scaler}: {r.advice}" for r in entry.scaling or []]

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        from bastion.suites.html_report import scaling_view

        return {"template": "kind_scaling.html", "scaling": scaling_view(entry, figures, names)}


def _run(run: RunContext, check: Check) -> None:
    """Audit every scaler of the check (or reload its finished items): one item per
    scaler, independent of each other, so they go to the run's executor together."""
    p = {**SCALING_PARAMS, **check.params}
    n = min(check.n or SCALING_N, len(run.data))
    scalers = [str(s) for s in p["scalers"]]
    pairs = int(p["pairs"])
    task = run.sink.task(f"{check.id} (scaling audit)", len(scalers) * pairs)
    done = 0
    works: list[Work] = []
    for b, scaler in enumerate(scalers):
        key = item_key("scaling", check.id, None, b)
        if run.log.get(key) is not None:  # finished before (resume)
            done += 1
            continue
        ratio = int(p["ratio"])
        works.append(ScalingWork(key, check, tuple(range(n)), scaler, ratio, pairs, run.seed))

    def advance(k: int, m: int) -> None:
        task.update(done * pairs + k)

    task.update(done * pairs)
    for _ in run.execute(works, advance):
        done += 1
        task.update(done * pairs)
    task.close()
    examples: dict[str, Any] = {}
    for b, scaler in enumerate(scalers):
        rec = run.log.get(item_key("scaling", check.id, None, b))
        if rec is not None and rec["example"] is not None:
            examples[scaler] = rec["example"]
    run.figures[check.id] = examples


@dataclass(frozen=True)
class ScalingWork:
    """One scaling item: `scaling_audit` of `scaler` on the images `indices` (the check's
    first n), and the report's example, computed wherever the executor runs it."""

    key: str
    check: Check
    indices: tuple[int, ...]
    scaler: str
    ratio: int
    pairs: int
    seed: int

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        from bastion.defenses.scaling_defenses import scaling_audit

        start = time.perf_counter()
        images, _ = env.samples.take(self.indices)
        model = _Counting(env.attacked())
        audit = scaling_audit(
            model, images, self.scaler, ratio=self.ratio, pairs=self.pairs, seed=self.seed,
            progress=progress,
        )  # fmt: skip
        record = {
            "kind": "scaling",
            "check": self.check.id,
            "attack": self.check.attack,
            "eps": None,
            "audit": {k: audit[k] for k in _SUMMARY},
            "example": _example(model, images, self.scaler, self.ratio),
            "seconds": time.perf_counter() - start,
            "forward": model.count,
            "backward": 0,
        }
        return Outcome(record)


def _example(
    model: Callable[[Any], Any], images: torch.Tensor, scaler: str, ratio: int
) -> dict[str, Any] | None:
    """The attack on the first pair of differently classified images, as 8-bit lists."""
    from bastion.attacks.scaling import ScalingAttack, classify

    h, w = images.shape[2], images.shape[3]
    if ratio * max(h, w) > EXAMPLE_PIXELS:
        return None
    small = [
        np.round(img * 255).astype(np.uint8)
        for img in images.detach().cpu().double().numpy().transpose(0, 2, 3, 1)
    ]
    preds = classify(model, [img / 255.0 for img in small])
    j = next((k for k in range(1, len(small)) if preds[k] != preds[0]), 1)
    source = cv2.resize(small[0], (ratio * w, ratio * h), interpolation=cv2.INTER_CUBIC)
    source = source.reshape(ratio * h, ratio * w, small[0].shape[2])
    res = ScalingAttack(scaler)(source, small[j], model=model, target_label=preds[j])
    attack = res.attack.reshape(source.shape)
    seen = res.scaled.reshape(small[j].shape)
    return {
        "source": source.tolist(),
        "attack": attack.tolist(),
        "seen": seen.tolist(),
        "source_class": preds[0],
        "target_class": res.target_class,
        "predicted_class": res.predicted_class,
        "success": res.success,
        "psnr_source": res.psnr_source,
    }


KIND = ScalingKind()
