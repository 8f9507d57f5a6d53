"""Durable file writes: every file the node and ``liverfat analyze`` write goes through here.

The spool's received instances, the model cache, the DICOM outputs, ``result.json`` and the saved mask
all take the same path: a temporary file in the same folder (or a given one on the same file system),
fsync, rename over the target, fsync of the folder that holds the new name (and of the parent of every
folder made for it). After return the file survives a crash or power loss, and a reader never sees half
of it.

Every file is created with mode ``FILE_MODE`` (0640) less the process's umask: received CT, results,
research outputs and their tables hold patient data, so others get nothing, whatever umask a shell
had (022 still gives 0640), while a stricter umask is honoured (077 gives 0600). The group may
read: the PACS administrators' group on a node (the systemd unit's ``UMask=0027`` gives the
folders and the index the same rule), a research team's group for ``liverfat analyze --out``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path

FILE_MODE = 0o640
"""The mode every file is created with, less the umask: owner reads and writes, group reads, others nothing."""


def durable_write(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``target`` so that after return it survives a crash or power loss.

    ``tmp_dir`` (default: the target's folder) holds the temporary file; it must be on the same file system.
    """
    _make_folder(target.parent)
    fd, tmp_name = _create(tmp_dir or target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_and_sync_at_once(target: Path, data: bytes, tmp_dir: Path, pool: Executor) -> None:
    """Write ``data`` to ``target``, then fsync the file and its folder at the same time (the folder's on ``pool``).

    For a writer whose own durable record, made after this returns, says which files are whole
    (the spool's index): unlike ``durable_write``, the file takes its name before its data is on
    disk, so that the two fsyncs can run at once; on ext4 they then share one journal commit, one
    wait for the disk instead of two. After return both data and name survive a crash; a crash
    before can leave ``target`` with part of its data, a file no record points at.
    """
    _make_folder(target.parent)
    fd, tmp_name = _create(tmp_dir, prefix=f".{target.name}.", suffix=".part")
    written = Path(tmp_name)
    try:
        try:
            _write_all(fd, data)
            os.replace(written, target)
            written = target
            folder_synced = pool.submit(_fsync_dir, target.parent)
            try:
                os.fsync(fd)
            finally:
                folder_synced.result()
        finally:
            os.close(fd)
    except BaseException:
        written.unlink(missing_ok=True)
        raise


@contextmanager
def durable_path(target: Path) -> Iterator[Path]:
    """A temporary path for a writer that wants a file name (SimpleITK); durable as ``target`` when the block ends.

    The temporary name ends with the target's name, so a writer that picks the format by suffix
    (``.nii.gz``) picks the target's. If the block raises, the temporary file is removed and
    ``target`` is left as it was.
    """
    _make_folder(target.parent)
    fd, tmp_name = _create(target.parent, prefix=".", suffix=f".{target.name}")
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file rather than writing into it made it 0666 less umask
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _create(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of a random name in ``folder``, opened for writing, mode ``FILE_MODE`` less the umask.

    Like ``tempfile.mkstemp`` (which always makes 0600), but the kernel applies the umask to our
    mode at creation: no window in which the file has another mode, and no umask read (not thread-safe).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(name, flags, FILE_MODE), name
        except FileExistsError:
            continue


def _make_folder(folder: Path) -> None:
    """Make ``folder`` and any missing parents, each recorded durably in the folder above it."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until done: unlike a buffered file object, no extra objects or copies per call."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
