"""The `fooling` check: one evolved fooling image per class, as one resumable item.

`FoolingEvolution` (Nguyen et al. 2015) runs with the check's parameters over
`FOOLING_PARAMS` and the run's seed; the item in results.jsonl holds the per-class figures
and each class's best image in 8 bits (exact for the direct encoding, whose pixels are
k/255), so a resumed run reports and shows the same images without evolving again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from bastion.errors import ConfigError
from bastion.suites.formatting import cell
from bastion.suites.gallery import GalleryItem
from bastion.suites.json_codec import JsonObject, decode
from bastion.suites.kinds import Column, Table
from bastion.suites.report_builder import check_entry
from bastion.suites.report_model import CheckEntry, FoolingClass, FoolingSummary
from bastion.suites.results_log import Item, item_key
from bastion.suites.suite import Check, unknown_params, validate_generative

if TYPE_CHECKING:
    from bastion.attacks.fooling import FoolingEvolution
    from bastion.suites.run_context import RunContext, RunState

FOOLING_PARAMS: JsonObject = {"encoding": "direct", "generations": 100, "population": 100}
# further FoolingEvolution keywords a suite may set (cppn_params, chunk and seed it may not)
_FOOLING_EXTRA = (
    "init_size", "mutation_rate", "halve_every", "eta_m", "crossover_rate", "eta_c",
    "target_confidence", "time_budget",
)  # fmt: skip
COLUMNS = (
    Column("class", "name", "s"),
    Column("confidence", "confidence", ".4f"),
    Column("predicted", "predicted", "d"),
    Column("generation", "generation", "d"),
)


def fooling_attack(check: Check, seed: int) -> FoolingEvolution:
    """The check's `FoolingEvolution` (its parameters over `FOOLING_PARAMS`)."""
    from bastion.attacks.fooling import FoolingEvolution

    try:
        return FoolingEvolution(**{**FOOLING_PARAMS, **check.params, "seed": seed})  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"check {check.id!r}: bad fooling parameters: {exc}") from None


class FoolingKind:
    name = "fooling"
    robustness = False
    metrics = ("fooled_fraction",)
    threat_twins = False
    sees_defense = True

    def attack_name(self, raw: JsonObject, where: str) -> str:
        return "FoolingEvolution"

    def default_norm(self, attack: str) -> str:
        return ""

    def bounded(self, check: Check) -> bool:
        return False

    def validate(self, check: Check) -> None:
        validate_generative(check, 1)
        unknown_params(check, (*FOOLING_PARAMS, *_FOOLING_EXTRA))
        fooling_attack(check, 0)  # raises ConfigError on bad values

    def run(self, ctx: RunContext, check: Check) -> None:
        _run(ctx, check)

    def summarise(self, check: Check, state: RunState, items: list[Item], total: int) -> CheckEntry:
        """`fooling.fooled_fraction`: classes labelled as themselves with >= 99 % confidence
        on their evolved image (also at 99.99 %); per class the confidence, the model's
        label and the generation that found the image. `results` stays empty: no eps, no
        robust accuracy."""
        rec = next(
            (r for r in items if r.get("kind") == "fooling" and r["check"] == check.id), None
        )
        res: JsonObject = rec["result"] if rec is not None else {}
        classes = res.get("classes", [])
        fooling = FoolingSummary(
            fooled_fraction=_number(res.get("fooled_0.99")),
            fooled_fraction_strict=_number(res.get("fooled_0.9999")),
            median_confidence=_number(res.get("median_confidence")),
            generations=_count(res.get("generations")),
            queries=_count(res.get("queries")),
            classes=[decode(FoolingClass, c) for c in classes] if isinstance(classes, list) else [],
        )
        crit = check.criterion
        return check_entry(
            check,
            fooling=fooling,
            seconds=rec["seconds"] if rec is not None else 0.0,
            forward=rec["forward"] if rec is not None else 0,
            backward=rec["backward"] if rec is not None else 0,
            passed=None if crit is None else crit.holds(fooling.fooled_fraction),
        )

    def gallery(self, ctx: RunContext, check: Check) -> list[GalleryItem]:
        return []  # the fooling images have their own section

    def table(self, entry: CheckEntry) -> Table:
        f = entry.fooling
        assert f is not None
        title = (
            f"{entry.id}: {entry.attack} (fooled at 0.99: "
            f"{cell(f.fooled_fraction, '.3f')}, {f.generations} generations)"
        )
        rows: list[JsonObject] = [
            {"name": c.name, "confidence": c.confidence, "predicted": c.predicted,
             "generation": c.generation}
            for c in f.classes
        ]  # fmt: skip
        return Table(title, COLUMNS, rows)

    def notes(self, entry: CheckEntry) -> list[str]:
        f = entry.fooling
        assert f is not None
        return [
            f"{entry.id} {entry.attack}: fooled_fraction {cell(f.fooled_fraction, '.3f')} "
            f"(at 0.9999: {cell(f.fooled_fraction_strict, '.3f')}) median_confidence "
            f"{cell(f.median_confidence, '.4f')} queries {f.queries} "
            f"seconds {entry.seconds:.1f}"
        ]

    def html(self, entry: CheckEntry, figures: object, names: list[str]) -> dict[str, object]:
        from bastion.suites.html_report import fooling_view

        return {"template": "kind_fooling.html", "fooling": fooling_view(entry, figures, names)}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _count(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _run(run: RunContext, check: Check) -> None:
    """Evolve (or reload) the check's fooling images; keep them for the report's gallery."""
    key = item_key("fooling", check.id, None, 0)
    rec = run.log.get(key)
    if rec is None:
        attack = fooling_attack(check, run.seed)
        task = run.sink.task(f"{check.id} (fooling images)", max(attack.generations, 1))

        def advance(done: int, total: int, best: torch.Tensor) -> None:
            task.update(done)

        result = attack(run.model, input_shape=tuple(run.data.x.shape[1:]), progress=advance)
        task.close()
        names = [
            run.data.classes[k] if k < len(run.data.classes) else str(k)
            for k in range(result.num_classes)
        ]
        summary = result.to_dict(names)
        rec = run.log.put(
            key,
            {
                "kind": "fooling",
                "check": check.id,
                "attack": check.attack,
                "eps": None,
                "result": {k: v for k, v in summary.items() if k != "seconds"},
                "pixels": _pixels(result.images),
                "seconds": result.seconds,
                "forward": result.queries,
                "backward": result.gradients,
            },
        )
    run.figures[check.id] = [np.asarray(p, dtype=np.float64) / 255.0 for p in rec["pixels"]]


def _pixels(images: torch.Tensor) -> list[list[list[list[int]]]]:
    """N×C×H×W floats in [0, 1] as nested H×W×C 8-bit lists (JSON)."""
    hwc = images.detach().cpu().permute(0, 2, 3, 1).double()
    values: list[list[list[list[int]]]] = torch.round(hwc.clamp(0, 1) * 255).long().tolist()
    return values


KIND = FoolingKind()
