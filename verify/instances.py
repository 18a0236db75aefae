"""VNN-COMP benchmark lists: `instances.csv` rows (onnx, vnnlib, timeout) and known answers.

    >>> for inst in read_instances("vnncomp2021/mnistfc/mnistfc_instances.csv"):
    ...     inst.onnx, inst.vnnlib, inst.timeout, inst.expected   # Path, Path, 120.0, 'unsat'

Paths are resolved relative to the csv's folder, as the competition scripts do. When a
`reference_results.csv` lies next to it (columns `onnx,vnnlib,consensus,…`, as in
`shared/data/vnncomp2021`), each instance carries its row and the consensus verdict in
VNN-COMP 2022 words: `unsat` (the property holds) or `sat` (violated). A row is found by
the paths as written, then relative to the reference file's folder, then by the two file
names when only one row has them.

`decide_instance(inst)` gives one instance's verdict within its own timeout; the network
and its onnxruntime replay are loaded once per process and file (the last few are kept),
so a batch run, in one process or as tasks on many, reads each network once per process.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.errors import DataError

if TYPE_CHECKING:
    from bastion.verify.network import Network
    from bastion.verify.verdict import Verdict

__all__ = ["Instance", "decide_instance", "read_instances", "replay_for"]

_VERDICTS = {"holds": "unsat", "unsat": "unsat", "violated": "sat", "sat": "sat"}


@dataclass(frozen=True)
class Instance:
    """One benchmark instance: a network, a property and the time allowed (seconds)."""

    onnx: Path
    vnnlib: Path
    timeout: float
    expected: str | None = None  # "sat" / "unsat" from the reference results, when known
    reference: Mapping[str, str] = field(default_factory=dict)  # that reference row

    @property
    def name(self) -> str:
        """`network.onnx:property.vnnlib`, how result lines name the instance."""
        return f"{self.onnx.name}:{self.vnnlib.name}"


class _Reference:
    """The rows of a reference results file, looked up by an instance's two paths.

    First by the paths as the instances csv writes them, then by the paths relative to the
    reference file's folder (the benchmark folder), then by the two file names alone when
    exactly one row has them (cifar10_resnet's csv says `onnx/resnet_2b.onnx`, its
    reference `resnet_2b.onnx`); no row, or several, give none.
    """

    def __init__(self, path: Path | None) -> None:
        self.folder = path.parent.resolve() if path is not None else None
        rows: list[dict[str, str]] = []
        if path is not None:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and not {"onnx", "vnnlib"} <= set(rows[0]):
                raise DataError(
                    f"{path} has no onnx and vnnlib columns; is it a reference results file?"
                )
        self.by_path = {(_norm(r["onnx"]), _norm(r["vnnlib"])): r for r in rows}
        by_name: dict[tuple[str, str], list[dict[str, str]]] = {}
        for r in rows:
            by_name.setdefault((_name(r["onnx"]), _name(r["vnnlib"])), []).append(r)
        self.by_name = {k: v[0] for k, v in by_name.items() if len(v) == 1}

    def row(self, cells: list[str], onnx: Path, vnnlib: Path) -> dict[str, str]:
        """The reference row of an instance whose csv cells are `cells[:2]`, else {}."""
        hit = self.by_path.get((_norm(cells[0]), _norm(cells[1])))
        if hit is None and self.folder is not None:
            try:
                key = tuple(p.resolve().relative_to(self.folder).as_posix() for p in (onnx, vnnlib))
            except ValueError:  # not under the benchmark folder
                key = ()
            hit = self.by_path.get(key) if len(key) == 2 else None
        if hit is None:
            hit = self.by_name.get((_name(cells[0]), _name(cells[1])))
        return hit or {}


def _norm(path: str) -> str:
    return Path(path.strip()).as_posix()


def _name(path: str) -> str:
    return Path(path.strip()).name


def read_instances(
    path: str | os.PathLike[str], *, reference: str | os.PathLike[str] | None = None
) -> list[Instance]:
    """The rows of a VNN-COMP `instances.csv` (with or without a header row).

    `reference` defaults to `reference_results.csv` beside the csv, if it exists. Raises
    `DataError` naming the line for a malformed row or a file that does not exist.
    """
    csv_path = Path(path).expanduser()
    try:
        with csv_path.open(newline="") as f:
            rows = [row for row in csv.reader(f)]
    except OSError as exc:
        raise DataError(f"cannot read {csv_path} ({exc.strerror}); check the path") from None
    ref_path = (
        Path(reference) if reference is not None else csv_path.parent / "reference_results.csv"
    )
    known = _Reference(ref_path if (reference is not None or ref_path.exists()) else None)
    out = []
    for line, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or (line == 1 and cells[:2] == ["onnx", "vnnlib"]):
            continue
        if len(cells) != 3:
            raise DataError(f"{csv_path} line {line}: expected onnx,vnnlib,timeout, got {row}")
        try:
            timeout = float(cells[2])
        except ValueError:
            raise DataError(
                f"{csv_path} line {line}: timeout {cells[2]!r} is not a number"
            ) from None
        onnx, vnnlib = (csv_path.parent / cells[0]), (csv_path.parent / cells[1])
        for p in (onnx, vnnlib):
            if not p.is_file():
                raise DataError(f"{csv_path} line {line}: {p} does not exist")
        ref = known.row(cells, onnx, vnnlib)
        verdict = _VERDICTS.get(ref.get("consensus", "").strip().lower())
        out.append(Instance(onnx, vnnlib, timeout, verdict, ref))
    return out


def replay_for(path: str | os.PathLike[str]) -> Callable[[Any], Any] | None:
    """onnxruntime on an ONNX file (the model as given), else None (the extracted network)."""
    from bastion.model_formats import detect_format
    from bastion.verify.decide import onnx_replay

    return onnx_replay(path) if detect_format(path) == "onnx" else None


@functools.lru_cache(maxsize=4)
def _loaded(path: str, mtime_ns: int, size: int) -> tuple[Network, Callable[[Any], Any] | None]:
    from bastion.verify.extract import load_network

    return load_network(path), replay_for(path)


def decide_instance(
    inst: Instance, *, timeout: float | None = None, engine: str = "auto", seed: int = 0
) -> Verdict:
    """The verdict for one instance within `timeout` seconds (default: the instance's own),
    its counterexample replayed on the file as given (onnxruntime for ONNX)."""
    from bastion.verify.decide import decide_file
    from bastion.verify.vnnlib import read_vnnlib

    try:
        stat = inst.onnx.stat()
    except OSError as exc:
        raise DataError(f"cannot read {inst.onnx} ({exc.strerror}); check the path") from None
    network, replay = _loaded(os.fspath(inst.onnx), stat.st_mtime_ns, stat.st_size)
    props = read_vnnlib(inst.vnnlib, network.input_shape, network.num_outputs)
    limit = timeout if timeout is not None else inst.timeout
    return decide_file(network, props, timeout=limit, engine=engine, seed=seed, replay=replay)
