"""Who computes a run's items: the executor abstraction and the in-process default.

The unit of work is one item (a check, an eps, a batch; or a VNN-COMP instance): a picklable
`Work` that, given the run's `WorkEnv` (model, samples, device), returns an `Outcome` (the
results.jsonl record and the gallery images it kept). A `Work` names the dataset indices it
reads, so an executor can ship it only those rows (`Samples`). The runner and the kinds have
one code path: they hand the items that may run side by side to `ExecutorSession.map` and
fold the outcomes into the log and the run state as they arrive, in any order.
`InProcessExecutor` (the default) computes them here, one after another; `RayExecutor`
(ray_executor.py) as Ray tasks on many workers. Dependencies are the caller's business: a
cascaded check hands over one eps at a time, after the earlier checks' items are folded in
(see kind_attack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from bastion.data import Dataset

Progress = Callable[[int, int], None]
"""Progress inside one item: (steps done, steps in all)."""

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shard:
    """Consecutive samples `start`, `start + 1`, … of a run's dataset: images `x` and labels
    `y`, as tensors or (shipped to a worker, read in place from Ray's object store) arrays."""

    start: int
    x: torch.Tensor | np.ndarray
    y: torch.Tensor | np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Samples:
    """Rows of a run's dataset addressed by their dataset index: all of them (in this
    process) or the shards one item reads (on a worker). `shape` is one image's C×H×W."""

    shards: tuple[Shard, ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, data: Dataset) -> Samples:
        """The whole dataset, as it is (no copy)."""
        return cls((Shard(0, data.x, data.y),), tuple(data.x.shape[1:]))

    def split(self, size: int) -> list[Shard]:
        """The rows in shards of `size` consecutive samples, as arrays (what Ray ships)."""
        out = []
        for shard in self.shards:
            x, y = _array(shard.x), _array(shard.y)
            out += [
                Shard(shard.start + s, x[s : s + size], y[s : s + size])
                for s in range(0, len(shard), size)
            ]
        return out

    def __len__(self) -> int:
        """How many rows are held here (not the dataset's size)."""
        return sum(len(s) for s in self.shards)

    def take(self, index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the dataset indices `index`, in that order (CPU tensors).
        Raises `LookupError` for an index whose shard is not held here."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if not self.shards:
            if len(idx):
                raise LookupError(f"samples {idx.tolist()} are not among the rows held (none)")
            return torch.empty((0, *self.shape)), torch.empty(0, dtype=torch.long)
        if (len(self.shards) == 1 and self.shards[0].start == 0) or not len(idx):
            s = self.shards[0]
            return _rows(s.x, idx), _rows(s.y, idx)
        starts = torch.tensor([s.start for s in self.shards])
        which = torch.searchsorted(starts, idx, right=True) - 1
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        for k in which.unique().tolist():
            at = (which == k).nonzero().flatten()
            shard = self.shards[k] if k >= 0 else None
            local = idx[at] - (shard.start if shard is not None else 0)
            if shard is None or int(local.max()) >= len(shard):
                raise LookupError(f"samples {idx[at].tolist()} are not among the rows held")
            xs.append(_rows(shard.x, local))
            ys.append(_rows(shard.y, local))
            order.append(at)
        pos = torch.cat(order).argsort()
        return torch.cat(xs)[pos], torch.cat(ys)[pos]


def _array(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def _rows(a: torch.Tensor | np.ndarray, local: torch.Tensor) -> torch.Tensor:
    """Rows `local` of a tensor or an array (a copy: object-store arrays are read-only)."""
    if isinstance(a, torch.Tensor):
        return a[local]
    return torch.from_numpy(a[local.numpy()])


@dataclass(frozen=True)
class WorkEnv:
    """What the items of a run need: the model (None for items that bring their own, such
    as VNN-COMP instances), the samples they read, the device."""

    model: Model | None
    samples: Samples
    dev: torch.device
    bpda_model: Model | None = None

    @classmethod
    def of(
        cls, model: Model, data: Dataset, dev: torch.device, bpda_model: Model | None = None
    ) -> WorkEnv:
        """A suite run's environment: its model and its whole dataset."""
        return cls(model, Samples.of(data), dev, bpda_model)

    @classmethod
    def bare(cls) -> WorkEnv:
        """No model and no samples: for items that load what they need themselves."""
        return cls(None, Samples((), ()), torch.device("cpu"))

    def attacked(self, bpda: bool = False) -> Model:
        """The model an attack runs on: the BPDA twin when asked for and there is one."""
        model = self.bpda_model if bpda and self.bpda_model is not None else self.model
        assert model is not None, "this run has no model"
        return model


@dataclass
class Outcome:
    """A finished item: its results.jsonl record (without `type`/`key`) and the adversarial
    images it kept for the gallery, keyed by (check id, eps, dataset index)."""

    record: dict[str, Any]
    shots: dict[tuple[str, float | None, int], torch.Tensor] = field(default_factory=dict)


class Work(Protocol):
    """One item: its results.jsonl key, the dataset indices it reads (an executor ships it
    only those rows), and how to compute it (picklable)."""

    @property
    def key(self) -> str: ...

    @property
    def indices(self) -> Sequence[int]: ...

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
