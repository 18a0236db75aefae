"""results.jsonl: the run's header, then one JSON line per finished unit of work.

An item is written (and flushed) as soon as it finishes, so an interrupted run loses at most
the item in flight; `resume=True` reloads the finished items of a run with the same header
and redoes nothing. A torn last line from an interrupted write is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from bastion.errors import ConfigError
from bastion.fileio import write_atomic

FILENAME = "results.jsonl"
Item = dict[str, Any]
"""One results.jsonl record as read back (its keys are the writing kind's own)."""


def item_key(kind: str, check: str, eps: float | None, batch: int) -> str:
    return f"{kind}|{check}|{'' if eps is None else repr(float(eps))}|{batch}"


class ResultsLog:
    """Append-only log of finished items, keyed by `item_key`."""

    def __init__(self, out: Path | None, header: dict[str, Any], resume: bool) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self._asked: dict[str, None] = {}  # keys in the order the run asked for them
        self._file: TextIO | None = None
        if out is None:
            if resume:
                raise ConfigError("resume needs an output directory: pass --out DIR")
            return
        path = out / FILENAME
        out.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            self._load(path, header)
        # rewritten atomically: drops a torn last line, keeps the log valid JSON lines
        records = [{"type": "header", **header}, *self.items.values()]
        write_atomic(path, "".join(_line(r) for r in records))
        self._file = path.open("a", encoding="utf-8")

    def _load(self, path: Path, header: dict[str, Any]) -> None:
        lines = path.read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by an interrupted write
        if not records or records[0].get("type") != "header":
            raise ConfigError(
                f"{path} is not a Bastion results log; remove it or choose another --out directory"
            )
        old = {k: v for k, v in records[0].items() if k != "type"}
        if old != header:
            changed = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            raise ConfigError(
                f"cannot resume: {path} belongs to a different run (changed: "
                f"{', '.join(changed)}); rerun without --resume to start afresh"
            )
        for rec in records[1:]:
            if rec.get("type") == "item":
                self.items[rec["key"]] = rec

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(_line(record))
        self._file.flush()

    def get(self, key: str) -> dict[str, Any] | None:
        self._asked.setdefault(key)
        return self.items.get(key)

    def ordered(self) -> list[dict[str, Any]]:
        """The items in the order the run asked for them (then any others): the same for a
        run, a resumed run and a run whose items finished out of order on many workers, so
        sums over items come out the same to the last bit."""
        first = [self.items[k] for k in self._asked if k in self.items]
        return first + [r for k, r in self.items.items() if k not in self._asked]

    def put(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"type": "item", "key": key, **record}
        self.items[key] = rec
        if self._file is not None:
            self._write(rec)
        return rec

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"
