"""`bastion verify --instances`: VNN-COMP instances as work items on the run's executor.

Each instance is an `InstanceWork` with its own timeout; the executor computes them — here,
one after another, or as Ray tasks on many workers (`RayExecutor`) — and each finished row
goes to the results CSV at once, in one write (a row is in the file whole or not at all),
in the order the rows finish. `resume` skips the instances whose rows are in the file (a
torn last line, from a crash mid-write, is dropped first). When every instance is done the
CSV is rewritten, atomically, in the instances' order: a run on Ray and one in this process
leave the same file but for the times.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import DataError
from bastion.fileio import write_atomic
from bastion.suites.executor import Executor, InProcessExecutor, Outcome, Progress, WorkEnv
from bastion.verify.instances import Instance, decide_instance

__all__ = ["FIELDS", "InstanceWork", "ResultsCsv", "run_instances"]

FIELDS = ("onnx", "vnnlib", "result", "expected", "correct", "seconds", "engine", "reason")
Row = dict[str, str]


@dataclass(frozen=True)
class InstanceWork:
    """One instance (the `position`-th of the list) decided within `timeout` seconds (None:
    the instance's own); its outcome's record is the instance's results-CSV row."""

    position: int
    instance: Instance
    timeout: float | None
    engine: str
    seed: int
    indices: tuple[int, ...] = ()  # it reads no dataset rows: it loads its own files

    @property
    def key(self) -> str:
        return self.instance.name

    def __call__(self, env: WorkEnv, progress: Progress | None) -> Outcome:
        inst = self.instance
        v = decide_instance(inst, timeout=self.timeout, engine=self.engine, seed=self.seed)
        correct = (
            ""
            if inst.expected is None or v.vnncomp == "unknown"
            else str(v.vnncomp == inst.expected)
        )
        row = {
            "onnx": inst.onnx.name, "vnnlib": inst.vnnlib.name, "result": v.vnncomp,
            "expected": inst.expected or "", "correct": correct,
            "seconds": f"{v.seconds:.3f}", "engine": v.engine, "reason": v.reason,
        }  # fmt: skip
        return Outcome(row)


def _line(row: Row) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=FIELDS).writerow(row)
    return buf.getvalue()


class ResultsCsv:
    """A batch's results CSV: a header, then one row per finished instance, appended in
    one write each. `resume` keeps the rows already there (`done`, by instance name)."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        self.path = path
        self.done: dict[str, Row] = {}
        self.others: list[Row] = []  # rows of instances not in this run's list (kept)
        if resume and path.exists():
            self.done = self._read()
        else:
            write_atomic(path, ",".join(FIELDS) + "\r\n")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _read(self) -> dict[str, Row]:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn last row: drop it before appending
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        reader = csv.DictReader(io.StringIO(data.decode()))
        if data and tuple(reader.fieldnames or ()) != FIELDS:
            raise DataError(
                f"{self.path} is not a results CSV of bastion verify --instances (its header "
                f"is not {','.join(FIELDS)}); pass another --out or leave out --resume"
            )
        if not data:
            write_atomic(self.path, ",".join(FIELDS) + "\r\n")
        rows = [r for r in reader if all(r.get(f) is not None for f in FIELDS)]
        return {f"{r['onnx']}:{r['vnnlib']}": r for r in rows}

    def append(self, row: Row) -> None:
        os.write(self._fd, _line(row).encode())

    def rewrite(self, rows: Sequence[Row]) -> None:
        """The whole file at once (atomically): the header and `rows`, then `others`."""
        text = ",".join(FIELDS) + "\r\n" + "".join(_line(r) for r in [*rows, *self.others])
        write_atomic(self.path, text)

    def close(self) -> None:
        os.close(self._fd)


def run_instances(
    instances: Sequence[Instance],
    *,
    out: Path | None = None,
    resume: bool = False,
    executor: Executor | None = None,
    timeout: float | None = None,
    engine: str = "auto",
    seed: int = 0,
    on_row: Callable[[Instance, Row, bool], None] | None = None,
) -> list[Row]:
    """Decide `instances` on `executor` (default: this process) and return their rows in
    the list's order. `out`: the results CSV, appended to as rows finish (with `resume`,
    instances with a row there are not run again). `timeout` overrides every instance's
    own. `on_row(instance, row, resumed)` is called for every row as it is known."""
    results = ResultsCsv(out, resume=resume) if out is not None else None
    done = results.done if results is not None else {}
    rows: list[Row | None] = [done.get(inst.name) for inst in instances]
    if results is not None:
        names = {inst.name for inst in instances}
        results.others = [r for key, r in done.items() if key not in names]
    works = []
    for k, (inst, row) in enumerate(zip(instances, rows, strict=True)):
        if row is not None:
            if on_row is not None:
                on_row(inst, row, True)
            continue
        # the paths as absolute ones: a worker's working directory is not the driver's
        where = dataclasses.replace(inst, onnx=inst.onnx.resolve(), vnnlib=inst.vnnlib.resolve())
        works.append(InstanceWork(k, where, timeout, engine, seed))
    session = (executor or InProcessExecutor()).session(WorkEnv.bare())
    try:
        for work, outcome in session.map(works):
            assert isinstance(work, InstanceWork)
            row = {f: str(outcome.record[f]) for f in FIELDS}
            rows[work.position] = row
            if results is not None:
                results.append(row)
            if on_row is not None:
                on_row(instances[work.position], row, False)
    finally:
        session.close()
        if results is not None:
            results.close()
    final = [r for r in rows if r is not None]
    if results is not None:
        results.rewrite(final)
    return final
