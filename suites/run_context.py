"""The run context a check kind runs in: the model and data, the results log, what the
finished items say per sample (`RunState`), and the images kept for the report.

The unit of work is one item (a check, an eps, a batch), written to results.jsonl as it
finishes; a kind's `run` asks `ctx.log.get(key)` first and only computes what is missing,
which is what makes `resume` exact. It computes them as picklable `Work` items through
`ctx.execute` (the run's executor: this process, or Ray workers; see executor.py), which
writes each to the log as it arrives. Points the model already misclassifies are never
attacked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bastion.data import Dataset
from bastion.errors import BastionError, InvalidInputError
from bastion.results import distances
from bastion.suites.executor import (
    ExecutorSession,
    InProcessSession,
    Outcome,
    Progress,
    Work,
    WorkEnv,
)
from bastion.suites.gallery import GalleryItem
from bastion.suites.kinds import kind_of
from bastion.suites.progress import ProgressSink
from bastion.suites.results_log import Item, ResultsLog, item_key
from bastion.suites.suite import Check, Suite
from bastion.validation import check_logits

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


def batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """Dataset indices 0…n-1 in batches of `batch_size`."""
    return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def class_name(names: list[str], k: int) -> str:
    return names[k] if 0 <= k < len(names) else str(k)


@dataclass
class RunContext:
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
    executor: ExecutorSession | None = None  # computes the items (default: in this process)
    state: RunState = field(init=False)
    shots: dict[Shot, torch.Tensor] = field(default_factory=dict)
    figures: dict[str, object] = field(default_factory=dict)  # fooling / scaling images

    def __post_init__(self) -> None:
        self.state = RunState(len(self.data), self.data.y.clone().long())
        if self.executor is None:
            self.executor = InProcessSession(self.env)

    @property
    def env(self) -> WorkEnv:
        """What the items of this run need (what an executor ships to its workers)."""
        return WorkEnv.of(self.model, self.data, self.dev, self.bpda_model)

    def execute(
        self, works: list[Work], progress: Progress | None = None
    ) -> Iterator[tuple[Work, Item]]:
        """Compute independent `works` with the run's executor; each finished one is written
        to results.jsonl and its gallery images kept before it is yielded (as it arrives)."""
        assert self.executor is not None
        outcome: Outcome
        for work, outcome in self.executor.map(works, progress):
            self.shots.update(outcome.shots)
            yield work, self.log.put(work.key, outcome.record)

    def clean_pass(self) -> None:
        """The model's label and confidence on every sample (one item per batch)."""
        parts = batches(len(self.data), self.batch_size)
        task = self.sink.task("clean accuracy", len(parts))
        for b, idx in enumerate(parts):
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
        except BastionError:
            raise
        except Exception as exc:  # the first forward: a shape guard, an assert, a bad reshape
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
        kind_of(check).run(self, check)

    def gallery(self, suite: Suite, size: int) -> list[GalleryItem]:
        """A few successes per robustness check, at its smallest eps with any (each kind
        picks its own; fooling and scaling images have their own sections)."""
        if size <= 0:
            return []
        out: list[GalleryItem] = []
        for check in suite.checks:
            out += kind_of(check).gallery(self, check)
        return out[:size]

    def gallery_items(self, check: Check, eps: float | None, picks: list[int]) -> list[GalleryItem]:
        """Gallery items of the kept shots of `check` at `eps` for dataset indices `picks`."""
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
                label=class_name(names, int(self.data.y[i])),
                clean_pred=class_name(names, int(state.pred[i])),
                clean_conf=float(state.conf[i]),
                adv_pred=class_name(names, int(probs[j].argmax())),
                adv_conf=float(probs[j].max()),
                l2=float(dist["l2"][j]),
                linf=float(dist["linf"][j]),
                clean=x[j].permute(1, 2, 0).numpy(),
                adv=adv[j].permute(1, 2, 0).numpy(),
            )
            for j, i in enumerate(shown)
        ]
