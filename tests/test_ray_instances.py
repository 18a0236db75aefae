"""`bastion verify --instances` on Ray: the verdicts of a one-process run, each instance
under its own timeout, rows appended as they finish; an interrupted run resumes (with Ray
or without) and a torn last row is dropped; a worker killed mid-instance has that instance
retried, nothing lost or written twice.

A local Ray with 2 CPUs is started once for the module and shut down after it.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA

from bastion.cli import main
from bastion.suites.executor import ExecutorSession, Outcome, Progress, Work, WorkEnv
from bastion.suites.instance_runner import FIELDS, run_instances
from bastion.verify.instances import read_instances

ray = pytest.importorskip("ray")
MNISTFC = SHARED_DATA / "vnncomp2021" / "mnistfc"
pytestmark = pytest.mark.skipif(
    not MNISTFC.is_dir(), reason="VNN-COMP files not found in ../shared/data"
)
# quick instances of both verdicts (bounds, PGD, one exact proof) and a hard one whose own
# timeout of 2 s makes it unknown (at 120 s it is unknown too, on this machine)
PROPS = [
    ("prop_2_0.03", 60), ("prop_7_0.03", 60), ("prop_0_0.03", 60), ("prop_1_0.03", 2),
    ("prop_1_0.05", 60), ("prop_10_0.05", 60), ("prop_8_0.03", 60), ("prop_12_0.05", 60),
]  # fmt: skip
WANT = ["unsat", "sat", "unsat", "unknown", "sat", "unsat", "unsat", "sat"]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers take the driver's count
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillFirst below
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture
def instances_csv(tmp_path: Path) -> Path:
    path = tmp_path / "instances.csv"
    net = MNISTFC / "mnist-net_256x2.onnx"
    path.write_text("".join(f"{net},{MNISTFC / p}.vnnlib,{t}\n" for p, t in PROPS))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _verdicts(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(r["vnnlib"], r["result"]) for r in rows]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """The one-process run, through the command line."""
    tmp = tmp_path_factory.mktemp("single")
    net = MNISTFC / "mnist-net_256x2.onnx"
    (tmp / "i.csv").write_text("".join(f"{net},{MNISTFC / p}.vnnlib,{t}\n" for p, t in PROPS))
    out = tmp / "results.csv"
    assert main(["verify", "--instances", str(tmp / "i.csv"), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert [r["result"] for r in rows] == WANT
    return rows


def test_workers_give_the_one_process_verdicts_each_under_its_own_timeout(
    capsys: pytest.CaptureFixture[str],
    single: list[dict[str, str]],
    instances_csv: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "results.csv"
    args = ["verify", "--instances", str(instances_csv), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main([*args, "--workers", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("summary: 7/8 solved (4 unsat, 3 sat), 0 wrong")
    assert len(printed) == 9  # one line per instance as it finished, then the summary
    rows = _rows(out)  # rewritten in the csv's order at the end
    assert _verdicts(rows) == _verdicts(single)
    assert out.read_text().splitlines()[0] == ",".join(FIELDS)
    hard = rows[3]  # its own 2 s, not the others' 60 s (the verifier may overrun a little
    assert hard["result"] == "unknown" and float(hard["seconds"]) < 30  # on a loaded box)


def test_rows_are_appended_as_instances_finish(instances_csv: Path, tmp_path: Path) -> None:
    from bastion.suites.ray_executor import RayExecutor

    out = tmp_path / "results.csv"
    seen: list[int] = []

    def count(inst: Any, row: dict[str, str], resumed: bool) -> None:
        seen.append(len(_rows(out)))  # the file when this row is reported

    run_instances(read_instances(instances_csv), out=out, executor=RayExecutor(), on_row=count)
    assert seen == list(range(1, 9))


def _interrupted(instances_csv: Path, out: Path, after: int) -> dict[str, str]:
    """A Ray run stopped (KeyboardInterrupt) after `after` rows: the rows in the file (the
    seconds of each instance)."""
    from bastion.suites.ray_executor import RayExecutor

    def stop(inst: Any, row: dict[str, str], resumed: bool) -> None:
        if len(_rows(out)) >= after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_instances(read_instances(instances_csv), out=out, executor=RayExecutor(), on_row=stop)
    return {r["vnnlib"]: r["seconds"] for r in _rows(out)}


@pytest.mark.parametrize("with_ray", [False, True], ids=["resume-in-process", "resume-on-ray"])
def test_an_interrupted_ray_run_resumes_to_the_same_verdicts(
    single: list[dict[str, str]], instances_csv: Path, tmp_path: Path, with_ray: bool
) -> None:
    out = tmp_path / "results.csv"
    done = _interrupted(instances_csv, out, after=3)
    assert 3 <= len(done) < 8
    args = ["verify", "--instances", str(instances_csv), "--out", str(out), "--resume", "--quiet"]
    assert main([*args, "--workers", "2"] if with_ray else args) == 0
    rows = _rows(out)
    assert _verdicts(rows) == _verdicts(single)  # every instance once, in the csv's order
    kept = {r["vnnlib"]: r["seconds"] for r in rows}
    assert all(kept[v] == s for v, s in done.items())  # finished rows kept, not redone


def test_resume_drops_a_torn_last_row(
    single: list[dict[str, str]], instances_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.csv"
    rows = single[:2]
    text = (
        ",".join(FIELDS) + "\r\n" + "".join(",".join(r[f] for f in FIELDS) + "\r\n" for r in rows)
    )
    out.write_text(text + "mnist-net_256x2.onnx,prop_0_0.03.vnnlib,uns", newline="")
    seen: list[tuple[str, bool]] = []
    got = run_instances(
        read_instances(instances_csv),
        out=out,
        resume=True,
        on_row=lambda inst, row, resumed: seen.append((row["vnnlib"], resumed)),
    )
    assert [r["vnnlib"] for r in got] == [r["vnnlib"] for r in single]
    assert [v for v, resumed in seen if resumed] == ["prop_2_0.03.vnnlib", "prop_7_0.03.vnnlib"]
    assert _verdicts(_rows(out)) == _verdicts(single)
    assert out.read_bytes().count(b"\n") == 9 and b",uns\r" not in out.read_bytes()


@dataclass(frozen=True)
class KillFirst:
    """`inner`, except that the first item to start in a process other than the driver's
    kills that process (SIGKILL): a worker dying mid-instance, once."""

    inner: Any
    marker: str
    driver: int

    @property
    def key(self) -> str:
        return str(self.inner.key)

    @property
    def indices(self) -> Sequence[int]:
        return tuple(self.inner.indices)

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        if os.getpid() != self.driver:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, self.inner.key.encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        outcome: Outcome = self.inner(env, progress)
        return outcome


class KillingSession:
    def __init__(self, session: ExecutorSession, marker: Path) -> None:
        self.session, self.marker = session, str(marker)

    def map(
        self, works: Sequence[Work], progress: Progress | None = None
    ) -> Iterator[tuple[Work, Outcome]]:
        wrapped = [KillFirst(w, self.marker, os.getpid()) for w in works]
        for work, outcome in self.session.map(wrapped, progress):
            assert isinstance(work, KillFirst)
            yield work.inner, outcome

    def close(self) -> None:
        self.session.close()


def test_a_killed_worker_has_its_instance_retried_and_nothing_is_written_twice(
    single: list[dict[str, str]], instances_csv: Path, tmp_path: Path
) -> None:
    from bastion.suites.ray_executor import RayExecutor

    marker = tmp_path / "killed"

    class Killing(RayExecutor):
        def session(self, env: WorkEnv) -> ExecutorSession:
            return KillingSession(super().session(env), marker)

    out = tmp_path / "results.csv"
    appended: list[str] = []
    rows = run_instances(
        read_instances(instances_csv),
        out=out,
        executor=Killing(),
        on_row=lambda inst, row, resumed: appended.append(row["vnnlib"]),
    )
    assert marker.exists()  # a worker did die mid-instance
    killed = marker.read_text().split(":")[1]
    assert killed in appended  # … and its instance was retried
    assert sorted(appended) == sorted(r["vnnlib"] for r in single)  # each once
    assert _verdicts(rows) == _verdicts(_rows(out)) == _verdicts(single)


def test_ray_options_outside_instances_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["verify", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--workers and --ray apply to --instances only" in err and "Traceback" not in err


def test_a_bad_property_read_on_a_worker_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 0.5)\n")  # unbalanced
    csv_path = tmp_path / "instances.csv"
    csv_path.write_text(f"{MNISTFC / 'mnist-net_256x2.onnx'},{bad},60\n")
    args = ["verify", "--instances", str(csv_path), "--quiet", "--workers", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bastion: error:") and "bad.vnnlib" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
