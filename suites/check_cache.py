"""Reuse of finished checks: within a test session, and across sessions in a directory.

A check is identified by everything that decides its result: the model (weights via
`module_fingerprint`, plus the source of its module classes), the evaluated data (spec,
split, size and a digest of the tensors), the suite after every override (eps, fast
profile), the seed, device and batch size, and the Bastion and PyTorch versions. The
cache key is the SHA-256 of that record; a directory cache stores one JSON file per key
holding the record and the report dict (without gallery images), written atomically, so
parallel workers can share one directory. Models that are not `nn.Module`s have no
fingerprint and are never cached.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch

import bastion
from bastion.data import Dataset
from bastion.errors import ConfigError
from bastion.fileio import write_atomic
from bastion.model_io import module_fingerprint
from bastion.suites.report import Report
from bastion.suites.report_model import ReportData

CACHE_FORMAT = "bastion-check-cache/2"  # 2: the typed report (schema_version 2)


def _code_digest(model: torch.nn.Module) -> str:
    """A digest of the source of the model's own module classes (torch's are versioned)."""
    digest = hashlib.sha256()
    classes = {type(m) for m in model.modules()}
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if cls.__module__.split(".")[0] == "torch":
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # defined in a REPL or a C extension: name only
            source = ""
        digest.update(f"{cls.__module__}.{cls.__qualname__}\n{source}\n".encode())
    return digest.hexdigest()


def _data_digest(data: Dataset) -> str:
    digest = hashlib.sha256()
    for t in (data.x, data.y):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def check_key(
    *,
    kind: str,
    model: object,
    fingerprint: str | None,
    data: Dataset,
    config: dict[str, Any],
) -> dict[str, Any] | None:
    """The record that identifies a check, or None when the model cannot be fingerprinted.

    `config` holds the kind-specific settings (for a suite: the suite dict, seed, device,
    batch size); every value must be JSON."""
    if fingerprint is None or not isinstance(model, torch.nn.Module):
        return None
    return {
        "kind": kind,
        "bastion": bastion.__version__,
        "torch": torch.__version__,
        "model": {"sha256": fingerprint, "code": _code_digest(model)},
        "data": {
            "spec": data.spec,
            "split": data.split,
            "n": len(data),
            "sha256": _data_digest(data),
        },
        **config,
    }


def model_fingerprint(model: object) -> str | None:
    return module_fingerprint(model) if isinstance(model, torch.nn.Module) else None


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class CheckCache:
    """Finished reports by key digest: in memory for the session, and in `directory`."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, Report] = {}

    def get(self, digest: str, key: dict[str, Any]) -> tuple[Report, str] | None:
        """The cached report and where it came from (`session` or `directory`)."""
        if digest in self._memory:
            return self._memory[digest], "session"
        if self.directory is None:
            return None
        path = self.directory / f"{digest}.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # absent or corrupt: recompute and overwrite
        if (
            not isinstance(stored, dict)
            or stored.get("format") != CACHE_FORMAT
            or stored.get("key") != key
            or not isinstance(stored.get("report"), dict)
        ):
            return None
        try:
            report = Report(ReportData.from_dict(stored["report"]))
        except ConfigError:
            return None  # written by another version: recompute and overwrite
        self._memory[digest] = report
        return report, "directory"

    def put(self, digest: str, key: dict[str, Any], report: Report) -> None:
        self._memory[digest] = report
        if self.directory is not None:
            record = {"format": CACHE_FORMAT, "key": key, "report": report.model.to_dict()}
            write_atomic(
                self.directory / f"{digest}.json", json.dumps(record, indent=1, allow_nan=False)
            )
