"""Durable writes: whole or not at all, no temporary file left behind, and not readable by others."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liverfat.files import durable_path, durable_write, write_and_start_sync


def test_durable_write_makes_missing_folders_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "results" / "7" / "1.2.3" / "result.json"
    durable_write(target, b"{}\n")
    durable_write(target, b'{"again": true}\n')
    assert target.read_bytes() == b'{"again": true}\n'
    assert list(target.parent.iterdir()) == [target]


def test_write_and_start_sync_names_the_file_at_once_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target, tmp_dir = tmp_path / "instances" / "1.2" / "3.dcm", tmp_path / "tmp"
    tmp_dir.mkdir()
    with ThreadPoolExecutor(2) as pool:
        syncing = write_and_start_sync(target, b"DICM", tmp_dir, pool)
        assert target.read_bytes() == b"DICM"  # named before its fsyncs end: readers here see it whole
        syncing.wait()
    assert target.read_bytes() == b"DICM" and list(tmp_dir.iterdir()) == []


def test_write_and_start_sync_leaves_nothing_when_the_rename_fails(tmp_path: Path) -> None:
    other_file_system = Path("/dev/shm")
    if not other_file_system.is_dir() or os.stat(other_file_system).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    target = tmp_path / "instances" / "3.dcm"
    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError):  # a rename across file systems (EXDEV)
        write_and_start_sync(target, b"DICM", other_file_system, pool)
    assert not target.exists()
    assert not [path for path in other_file_system.iterdir() if path.name.startswith(".3.dcm.")]


def test_a_failed_fsync_raises_from_wait_and_removes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, tmp_dir = tmp_path / "3.dcm", tmp_path / "tmp"  # no folder to make: the first fsync is the file's
    tmp_dir.mkdir()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with ThreadPoolExecutor(2) as pool:
        syncing = write_and_start_sync(target, b"DICM", tmp_dir, pool)
        with pytest.raises(OSError, match="Input/output error"):
            syncing.wait()
    assert not target.exists() and list(tmp_dir.iterdir()) == []


def test_durable_path_gives_a_writer_the_target_suffix_and_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out" / "liver_mask.nii.gz"
    with durable_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".liver_mask.nii.gz") and tmp != target
        tmp.write_bytes(b"mask")
    assert target.read_bytes() == b"mask"
    assert list(target.parent.iterdir()) == [target]


def test_durable_path_leaves_the_old_target_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "liver_mask.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), durable_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process's umask for one test; the old one comes back after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o640), (0o027, 0o640), (0o077, 0o600), (0o000, 0o640)])
def test_files_are_not_readable_by_others_whatever_the_umask_and_a_stricter_umask_is_honoured(
    tmp_path: Path, umask: Callable[[int], int], mask: int, expected: int
) -> None:
    umask(mask)
    written = tmp_path / "spool" / "instances" / "1.dcm"
    durable_write(written, b"DICM")
    named = tmp_path / "out" / "liver_mask.nii.gz"
    with durable_path(named) as tmp:
        tmp.write_bytes(b"mask")
    assert [stat.S_IMODE(path.stat().st_mode) for path in (written, named)] == [expected, expected]


def test_durable_path_keeps_the_mode_when_the_writer_replaces_the_file(
    tmp_path: Path, umask: Callable[[int], int]
) -> None:
    umask(0o022)
    target = tmp_path / "preview.png"
    with durable_path(target) as tmp:
        tmp.unlink()  # as a writer that writes elsewhere and renames: its file is 0666 less the umask, 0644
        tmp.write_bytes(b"png")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
