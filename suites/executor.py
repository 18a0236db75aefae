"""Who computes a run's items: the executor abstraction and the in-process default.

The unit of work is one item (a check, an eps, a batch): a picklable `Work` that, given the
run's `WorkEnv` (model, data, device), returns an `Outcome` (the results.jsonl record and the
gallery images it kept). The runner and the kinds have one code path: they hand the items
that may run side by side to `ExecutorSession.map` and fold the outcomes into the log and
the run state as they arrive, in any order. `InProcessExecutor` (the default) computes them
here, one after another; `RayExecutor` (ray_executor.py) as Ray tasks on many workers.
Dependencies are the caller's business: a cascaded check hands over one eps at a time,
after the earlier checks' items are folded in (see kind_attack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bastion.data import Dataset

Progress = Callable[[int, int], None]
"""Progress inside one item: (steps done, steps in all)."""


@dataclass(frozen=True)
class WorkEnv:
    """What every item of a run needs: shipped to each worker once per run."""

    model: Callable[[torch.Tensor], torch.Tensor]
    data: Dataset
    dev: torch.device
    bpda_model: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Outcome:
    """A finished item: its results.jsonl record (without `type`/`key`) and the adversarial
    images it kept for the gallery, keyed by (check id, eps, dataset index)."""

    record: dict[str, Any]
    shots: dict[tuple[str, float | None, int], torch.Tensor] = field(default_factory=dict)


class Work(Protocol):
    """One item: its results.jsonl key and how to compute it (picklable)."""

    @property
    def key(self) -> str: ...

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome: ...


class ExecutorSession(Protocol):
    """An executor bound to one run's `WorkEnv`."""

    def map(
        self, works: Sequence[Work], progress: Progress | None = None
    ) -> Iterator[tuple[Work, Outcome]]:
        """Compute `works` (independent of each other); yield each as it finishes."""
        ...

    def close(self) -> None: ...


class Executor(Protocol):
    """Makes a session per run (a defended suite has two runs: undefended and defended)."""

    def session(self, env: WorkEnv) -> ExecutorSession: ...


class InProcessSession:
    """Computes items here, in order, with progress inside each item."""

    def __init__(self, env: WorkEnv) -> None:
        self.env = env

    def map(
        self, works: Sequence[Work], progress: Progress | None = None
    ) -> Iterator[tuple[Work, Outcome]]:
        for work in works:
            yield work, work(self.env, progress)

    def close(self) -> None:
        pass


class InProcessExecutor:
    """The default executor: every item in this process."""

    def session(self, env: WorkEnv) -> ExecutorSession:
        return InProcessSession(env)
