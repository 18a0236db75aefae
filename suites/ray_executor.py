"""`RayExecutor`: a run's items as Ray tasks, on the workers of this machine or a cluster.

The run's model (and the device) goes into Ray's object store once per run (`ray.put`);
each task carries a reference to it, and a worker process deserialises it once and keeps it
(keyed by the reference), so the model is loaded once per worker, not once per item. The
data goes in too, once, in shards of consecutive samples (`shard_bytes` each); a task names
the shards its item reads as arguments, so a node fetches only those (and keeps them for
its other tasks) instead of the whole dataset. Every task sets torch's thread count to the
driver's (float reductions differ across thread counts; the same count gives the same
numbers). The driver yields items as they finish, and the runner writes them to
results.jsonl at once. A worker that dies mid-task has its task retried on another
(`max_retries`); only a finished task's result reaches the log, so nothing is lost or
counted twice. On an interrupt (Ctrl-C) the tasks still pending are cancelled and the log
holds every finished item: `--resume`, with Ray or without, finishes the run.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from bastion.errors import BastionError, ConfigError
from bastion.suites.executor import (
    ExecutorSession,
    Outcome,
    Progress,
    Samples,
    Shard,
    Work,
    WorkEnv,
)

__all__ = ["RayExecutor"]

_ENVS: dict[str, WorkEnv] = {}  # in a worker process: the run's environment it has loaded
SHARD_BYTES = 32 * 2**20  # the data goes to the object store in shards of about this size


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is in the [ray] and [test] extras
        raise ConfigError(
            "Ray is not installed; pip install 'bastion[ray]' to run on Ray workers"
        ) from None
    return ray


def _env(refs: list[Any]) -> WorkEnv:
    """The run's model and device in this worker: loaded from the object store the first time."""
    key = refs[0].hex()
    env = _ENVS.get(key)
    if env is None:
        _ENVS.clear()  # one run at a time per worker: drop an earlier run's model
        env = _ray().get(refs[0])
        dev = torch.device(env.dev.type)  # Ray maps the GPUs it gives a task to cuda:0…
        for model in (env.model, env.bpda_model):
            if isinstance(model, torch.nn.Module):
                model.to(dev).eval()
        env = dataclasses.replace(env, dev=dev)
        _ENVS[key] = env
    return env


def _compute(refs: list[Any], work: Work, threads: int, *shards: Shard) -> Outcome:
    """The Ray task: one item at the driver's thread count, on the shards it reads (Ray
    resolves them before the task starts, from this node's object store when they are
    there already)."""
    torch.set_num_threads(threads)
    env = _env(refs)
    return work(dataclasses.replace(env, samples=Samples(shards, env.samples.shape)), None)


class RaySession:
    """A `RayExecutor` bound to one run: the model in the object store once, the samples
    in shards of consecutive rows; each task gets the shards its item reads."""

    def __init__(self, executor: RayExecutor, env: WorkEnv) -> None:
        ray = _ray()
        self._ray = ray
        self._options = executor.task_options()
        self._limit = executor.concurrency()
        samples = env.samples
        per = max(1, executor.shard_bytes // max(1, _row_bytes(samples)))
        shards = samples.split(per)
        self._shard_refs = [ray.put(s) for s in shards]
        self._starts = [s.start for s in shards]
        self._env_ref = ray.put(dataclasses.replace(env, samples=Samples((), samples.shape)))
        self._threads = torch.get_num_threads()
        self._remote = ray.remote(_compute)
        self._pending: dict[Any, Work] = {}

    def shards_of(self, work: Work) -> list[int]:
        """Which shards hold the rows `work` reads (positions in the session's shard list)."""
        idx = sorted(set(work.indices))
        return sorted({bisect.bisect_right(self._starts, i) - 1 for i in idx})

    def map(
        self, works: Sequence[Work], progress: Progress | None = None
    ) -> Iterator[tuple[Work, Outcome]]:
        ray = self._ray
        task = self._remote.options(**self._options)
        todo = iter(works)
        pending: dict[Any, Work] = {}
        self._pending = pending

        def submit() -> bool:
            work = next(todo, None)
            if work is None:
                return False
            shards = [self._shard_refs[k] for k in self.shards_of(work)]
            pending[task.remote([self._env_ref], work, self._threads, *shards)] = work
            return True

        while (self._limit is None or len(pending) < self._limit) and submit():
            pass
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    work = pending.pop(ref)
                    submit()  # before the driver folds this one in: keep the worker busy
                    yield work, self._result(ref)
        finally:
            self._cancel()

    def _result(self, ref: Any) -> Outcome:
        """The task's outcome; a `BastionError` it raised is raised here as itself."""
        try:
            outcome: Outcome = self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), BastionError):
                raise exc.cause from None
            raise
        return outcome

    def _cancel(self) -> None:
        """Cancel the tasks still pending (after an interrupt or an error they are not wanted)."""
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending = {}

    def close(self) -> None:
        self._cancel()
        self._env_ref = None
        self._shard_refs = []


def _row_bytes(samples: Samples) -> int:
    """Bytes of one sample (image and label) as shipped."""
    if not samples.shards:
        return 1
    s = samples.shards[0]
    return int(s.x[:1].nbytes + s.y[:1].nbytes) if len(s) else 1


class RayExecutor:
    """Run items as Ray tasks.

    `address`: None starts a local Ray with `workers` CPUs-worth of workers (or joins the
    Ray already initialised in this process); "auto" joins the cluster `RAY_ADDRESS` names
    or one running on this machine, else starts a local one; any other string is a Ray
    address ("ray://host:10001", "host:6379"). `workers` is how many tasks run at a time:
    the size of a Ray this executor starts, and on a Ray it joins the most tasks it keeps
    in flight (the rest of the cluster stays free for others). Each task asks for
    `num_cpus` CPUs and `num_gpus` GPUs; `max_retries` is how often a task whose worker died
    is retried. The data goes to the object store in shards of about `shard_bytes`; a task
    gets only the shards its item reads. `niceness` is the nice value of the workers of a
    Ray this executor starts: Ray's own default, 15, puts them below every other process
    on the machine (on a shared machine they then get a fraction of a core while the
    driver waits); 0 runs them like the driver. Use as a context manager (or call
    `shutdown`) to stop a Ray this executor started.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        shard_bytes: int = SHARD_BYTES,
        niceness: int = 0,
    ) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigError(
                f"a task needs num_cpus > 0 and num_gpus >= 0, got {num_cpus} and {num_gpus}"
            )
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        if shard_bytes < 1:
            raise ConfigError(f"shard_bytes must be >= 1, got {shard_bytes}")
        self.address = address
        self.workers = workers
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.shard_bytes = shard_bytes
        self.niceness = niceness
        self._started = False

    def task_options(self) -> dict[str, Any]:
        """The resources and retries of every task."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
        }

    def concurrency(self) -> int | None:
        """The most tasks kept in flight: `workers` on a Ray this executor joined (one it
        started has exactly that many CPUs' worth already), else no limit."""
        return self.workers if not self._started else None

    def start(self) -> None:
        """Connect to (or start) Ray, once."""
        ray = _ray()
        if ray.is_initialized():
            return
        quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address is None or (self.address == "auto" and not _cluster_known()):
            local = {"num_cpus": (self.workers or os.cpu_count() or 1) * self.num_cpus}
            if self.num_gpus:
                local["num_gpus"] = (self.workers or 1) * self.num_gpus
            system = {"worker_niceness": self.niceness}
            ray.init(include_dashboard=False, _system_config=system, **local, **quiet)
        else:
            try:
                ray.init(address=self.address, **quiet)
            except ConnectionError as exc:
                raise ConfigError(
                    f"cannot reach a Ray cluster at {self.address!r} ({exc}); start one "
                    "with `ray start --head` or pass --workers N for a local one"
                ) from None
        self._started = True

    def session(self, env: WorkEnv) -> ExecutorSession:
        self.start()
        return RaySession(self, env)

    def shutdown(self) -> None:
        """Stop the Ray this executor started (a Ray it joined keeps running)."""
        if self._started:
            _ray().shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _cluster_known() -> bool:
    """Whether "auto" has a cluster to join: RAY_ADDRESS, or a Ray started on this machine."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import find_gcs_addresses

        return bool(find_gcs_addresses())
    except Exception:  # noqa: BLE001 - a private helper; without it, start a local Ray
        return False
