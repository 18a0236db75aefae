"""Atomic writes: whole files only, no leftovers, ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bastion.errors import ConfigError
from bastion.fileio import require_writable_dir, write_atomic


def test_write_atomic_replaces_whole_files_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_write_atomic_uses_the_umask_not_mkstemp_private_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "r.html", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    write_atomic(target, "kept")
    with pytest.raises(TypeError):
        write_atomic(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_require_writable_dir_creates_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    out = require_writable_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_require_writable_dir_refuses_a_file(tmp_path: Path, where: str) -> None:
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    with pytest.raises(ConfigError, match="--out") as exc:
        require_writable_dir(target)
    assert "\n" not in str(exc.value) and str(target) in str(exc.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_require_writable_dir_refuses_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            require_writable_dir(ro)
        with pytest.raises(ConfigError, match="Permission denied"):
            require_writable_dir(ro / "sub")
    finally:
        ro.chmod(0o755)
