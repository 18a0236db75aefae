"""Atomic file writes (a reader sees the old file or the new one, never half of one) and an
up-front check that an output folder can be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bastion.errors import ConfigError


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide reports from others
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_writable_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the folder `path` if needed and prove it writable by writing a file there.

    Meant to run before any work, so that an unwritable output folder (an existing file,
    /proc, a read-only mount or folder) is one `ConfigError` rather than a crash at the end.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{option} {target} is a file, not a folder; give a folder to write into")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".bastion-write-test.", dir=target):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot write into {option} {target} ({why}); choose a folder you can write to"
        ) from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
