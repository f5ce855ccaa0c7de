"""``statefile.fsync_dir``: the undo journal's durability rests on it, so real I/O errors
surface and only file systems without directory sync are let through."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cellmigrate import statefile


def test_syncs_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    statefile.fsync_dir(tmp_path)  # no error on a file system that supports it


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_an_io_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def failing(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(statefile.os, "fsync", failing)
    with pytest.raises(OSError) as info:
        statefile.fsync_dir(tmp_path)
    assert info.value.errno == code


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_no_directory_sync_support_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(statefile.os, "fsync", unsupported)
    statefile.fsync_dir(tmp_path)


def test_a_missing_directory_is_raised(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        statefile.fsync_dir(tmp_path / "gone")
