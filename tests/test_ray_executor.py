"""Ray scale-out: the report of a run on Ray workers equals a single-process run's in every
number; an interrupted Ray run resumes (with Ray or without); a worker killed mid-task has
its item retried, nothing lost or counted twice; a task gets only the data shards its item
reads; `workers` caps the tasks in flight on a Ray the executor joined; `bastion report
--workers 2` runs.

A local Ray with 2 CPUs is started once for the module and shut down after it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runner import Interrupt  # tests/ is on sys.path
from torch import nn

from bastion.suites.executor import Outcome, Progress, WorkEnv
from bastion.suites.report_model import without_timings
from bastion.suites.runner import run_suite
from bastion.suites.suite import Check, Suite

ray = pytest.importorskip("ray")

# FGSM at two eps (one wave), then PGD cascaded on what FGSM left standing (one wave per eps)
SUITE = Suite(
    "ray-tiny",
    (
        Check("fgsm", "FGSM", (0.05, 0.1)),
        Check("pgd", "PGD", (0.05, 0.1), params={"steps": 5}, cascade=True),
    ),
)
N, BATCH = 48, 16  # 3 batches: 6 items per check


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers take the driver's count
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the models below live in this test module, which the workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


def _report(model: Any, data: Any, out: Path, **kw: Any) -> object:
    report = run_suite(model, data, SUITE, n=N, batch_size=BATCH, seed=1, gallery=4, out=out, **kw)
    return without_timings(json.loads(report.to_json()))


def _items(out: Path) -> list[dict[str, Any]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "item"]


def _rows(out: Path) -> dict[str, object]:
    return {r["key"]: without_timings(r.get("rows")) for r in _items(out)}  # per-image seconds out


@pytest.fixture(scope="module")
def single(demo, digits, tmp_path_factory) -> tuple[object, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("single")
    return _report(demo, digits, out), out


def _ray_executor() -> Any:
    from bastion.suites.ray_executor import RayExecutor

    # shards of 10 digits (64 float32 pixels and a label each) across batches of 16: an item
    # reads two or three shards, and no task gets the whole dataset
    return RayExecutor(workers=2, shard_bytes=10 * (64 * 4 + 8))


def test_two_workers_give_the_single_process_report_bit_for_bit(
    demo, digits, single, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    want, want_out = single
    got = _report(demo, digits, tmp_path, executor=_ray_executor())
    assert got == want
    # the per-item rows too, and every item once
    keys = [r["key"] for r in _items(tmp_path)]
    assert len(keys) == len(set(keys)) == 3 + 12  # clean pass + 2 checks × 2 eps × 3 batches
    assert _rows(tmp_path) == _rows(want_out)
    # the cascade held: PGD attacked only points FGSM left standing at that eps
    rows = {r["key"]: r.get("rows") for r in _items(tmp_path)}
    broken: set[int] = set()
    attacked: set[int] = set()
    for b in range(3):
        fgsm = rows[f"attack|fgsm|0.1|{b}"]
        broken |= {i for i, s in zip(fgsm["index"], fgsm["success"], strict=True) if s}
        attacked |= set(rows[f"attack|pgd|0.1|{b}"]["index"])
    assert broken and attacked and not broken & attacked


@pytest.mark.parametrize("with_ray", [False, True], ids=["resume-in-process", "resume-on-ray"])
def test_an_interrupted_ray_run_resumes_to_the_same_report(
    demo, digits, single, tmp_path, with_ray
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyboardInterrupt):
        _report(demo, digits, tmp_path, executor=_ray_executor(), progress=Interrupt(after=2))
    done = [r["key"] for r in _items(tmp_path)]
    pgd = [k for k in done if k.startswith("attack|pgd")]
    assert 2 <= len(pgd) < 6  # stopped part-way through the cascaded check
    executor = _ray_executor() if with_ray else None
    got = _report(demo, digits, tmp_path, resume=True, executor=executor)
    assert got == single[0]
    keys = [r["key"] for r in _items(tmp_path)]
    assert len(keys) == len(set(keys)) == 15
    assert all(k in keys for k in done)  # finished items were kept, not redone


class KillOnce(nn.Module):
    """The demo model, except that the first forward pass in a process other than the
    driver's kills that process (SIGKILL): a worker dying mid-task, once."""

    def __init__(self, inner: nn.Module, marker: Path) -> None:
        super().__init__()
        self.inner = inner
        self.marker = str(marker)
        self.driver = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() != self.driver:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def test_a_killed_worker_has_its_item_retried_and_nothing_is_counted_twice(
    demo, digits, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "killed"
    model = KillOnce(demo, marker)
    want = _report(model, digits, tmp_path / "single")  # in the driver: nobody is killed
    assert not marker.exists()
    got = _report(model, digits, tmp_path / "ray", executor=_ray_executor())
    assert marker.exists()  # a worker did die mid-task
    assert got == want
    keys = [r["key"] for r in _items(tmp_path / "ray")]
    assert len(keys) == len(set(keys)) == 15
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "single")


VERIFY = Suite(
    "ray-verify",
    (
        Check("pgd", "PGD", (0.05,), params={"steps": 5}),
        Check(
            "verified",
            "Verifier",
            (0.002, 0.3),
            kind="verify",
            n=8,
            params={"timeout": 30},
        ),
    ),
)


def test_a_verify_check_distributes_its_regions_to_the_same_report(demo, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def report(out: Path, **kw: Any) -> object:
        rep = run_suite(demo, digits, VERIFY, n=16, batch_size=8, seed=2, out=out, **kw)
        return without_timings(json.loads(rep.to_json()))

    want = report(tmp_path / "single")
    got = report(tmp_path / "ray", executor=_ray_executor())
    assert got == want
    verify = [r for r in _items(tmp_path / "ray") if r["kind"] == "verify"]
    assert sorted(r["key"] for r in verify) == ["verify|verified||0", "verify|verified||1"]
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "single")


def test_report_workers_2_on_the_embedded_default(tmp_path: Path) -> None:
    from bastion.cli import main

    suite = tmp_path / "tiny.toml"
    suite.write_text('[[check]]\nid = "fgsm"\nattack = "fgsm"\neps = [0.05, 0.1]\n')
    args = ["report", "--suite", str(suite), "--n", "32", "--batch-size", "16", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one"), "--threads", "1"]) in (0, 1)
    code = main([*args, "--out", str(tmp_path / "two"), "--threads", "1", "--workers", "2"])
    assert code in (0, 1)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert without_timings(one) == without_timings(two)
    assert len(_items(tmp_path / "two")) == 2 + 4  # clean pass: 2 batches; FGSM: 2 eps × 2


def test_bad_worker_counts_are_refused() -> None:
    from bastion.errors import ConfigError
    from bastion.suites.ray_executor import RayExecutor

    with pytest.raises(ConfigError, match="workers"):
        RayExecutor(workers=0)
    with pytest.raises(ConfigError, match="num_cpus"):
        RayExecutor(num_cpus=0)


@dataclass(frozen=True)
class Probe:
    """An item that reports what its task was shipped: the rows it holds, the rows it reads,
    and when it ran (in which process)."""

    key: str
    indices: tuple[int, ...]
    sleep: float = 0.0

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        start = time.time()
        x, y = env.samples.take(self.indices)
        time.sleep(self.sleep)
        return Outcome({"held": len(env.samples), "x": x, "y": y, "span": (start, time.time())})


def test_a_task_is_shipped_only_the_shards_its_item_reads(digits) -> None:  # type: ignore[no-untyped-def]
    from bastion.suites.ray_executor import RayExecutor

    env = WorkEnv.of(nn.Identity(), digits, torch.device("cpu"))
    row = 64 * 4 + 8  # bytes of one digit and its label
    session = RayExecutor(shard_bytes=100 * row).session(env)
    try:
        works = [Probe("a", (5, 0, 99)), Probe("b", (150, 101, 7)), Probe("c", ())]
        got = {w.key: o.record for w, o in session.map(works)}
    finally:
        session.close()
    assert got["a"]["held"] == 100  # one shard of 100 of the 360 digits
    assert got["b"]["held"] == 200  # two
    assert got["c"]["held"] == 0
    for w in works[:2]:
        idx = list(w.indices)
        assert torch.equal(got[w.key]["x"], digits.x[idx])  # in the item's order
        assert torch.equal(got[w.key]["y"], digits.y[idx])


def test_samples_take_rows_by_dataset_index_from_shards(digits) -> None:  # type: ignore[no-untyped-def]
    from bastion.suites.executor import Samples

    whole = Samples.of(digits)
    shards = whole.split(7)
    assert sum(len(s) for s in shards) == len(digits) and len(shards) == -(-len(digits) // 7)
    some = Samples((shards[2], shards[5], shards[6]), whole.shape)
    idx = [44, 14, 20, 35, 15]  # shards 6, 2, 2, 5, 2
    x, y = some.take(idx)
    assert torch.equal(x, digits.x[idx]) and torch.equal(y, digits.y[idx])
    assert some.take([])[0].shape == (0, *digits.x.shape[1:])
    for missing in ([13], [21], [49], [10_000]):
        with pytest.raises(LookupError):
            some.take(missing)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_caps_the_tasks_in_flight_on_a_joined_ray(digits, workers) -> None:  # type: ignore[no-untyped-def]
    from bastion.suites.ray_executor import RayExecutor

    executor = RayExecutor("auto", workers=workers)  # joins the module's Ray (2 CPUs)
    session = executor.session(WorkEnv.of(nn.Identity(), digits, torch.device("cpu")))
    try:
        works = [Probe(str(i), (i,), sleep=0.3) for i in range(6)]
        spans = [o.record["span"] for _, o in session.map(works)]
    finally:
        session.close()
    executor.shutdown()
    assert ray.is_initialized()  # a Ray it joined keeps running
    assert _most_at_once(spans) == workers


SCALING = Suite(
    "ray-scaling",
    (Check("scaling", "ScalingAttack", (), norm="", kind="scaling", n=8, params={"pairs": 2}),),
)


def test_a_scaling_check_distributes_its_scalers_to_the_same_report(demo, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def report(out: Path, **kw: Any) -> object:
        rep = run_suite(demo, digits, SCALING, n=16, batch_size=8, seed=3, out=out, **kw)
        return without_timings(json.loads(rep.to_json()))

    want = report(tmp_path / "single")
    got = report(tmp_path / "ray", executor=_ray_executor())
    assert got == want
    scaling = [r for r in _items(tmp_path / "ray") if r["kind"] == "scaling"]
    assert sorted(r["key"] for r in scaling) == ["scaling|scaling||0", "scaling|scaling||1"]
    assert {r["key"]: r["audit"] for r in scaling} == {
        r["key"]: r["audit"] for r in _items(tmp_path / "single") if r["kind"] == "scaling"
    }


NICE_PROBE = """
import os, sys, torch
from bastion.data import load_data
from bastion.suites.executor import Outcome, WorkEnv
from bastion.suites.ray_executor import RayExecutor

class Nice:
    key, indices = "nice", ()
    def __call__(self, env, progress):
        return Outcome({"nice": os.nice(0)})

import ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
with RayExecutor(workers=1, niceness=int(sys.argv[1])) as ex:
    env = WorkEnv.of(torch.nn.Identity(), load_data("digits"), torch.device("cpu"))
    ((_, out),) = ex.session(env).map([Nice()])
    print(out.record["nice"])
"""


@pytest.mark.parametrize("niceness", [0, 7])
def test_the_workers_of_a_ray_it_starts_run_at_its_niceness(niceness: int) -> None:
    """Ray's default (15) would put the workers below every other process on a shared
    machine; a Ray the executor starts (here, apart from the module's) uses `niceness`."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", NICE_PROBE, str(niceness)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.split()[-1] == str(os.nice(0) + niceness)
