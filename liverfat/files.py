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
from concurrent import futures
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
    fsync_folder(target.parent)


def write_and_start_sync(target: Path, data: bytes, tmp_dir: Path, pool: Executor) -> SyncingWrite:
    """Write ``data`` to ``target``, name it, and start the fsyncs of the file and of its folder on ``pool``.

    For a writer that makes its own durable record of the file (the spool's index) while these run,
    and waits for both (``SyncingWrite.wait``) before it counts the file as safe: unlike
    ``durable_write``, the file takes its name before its data is on disk, so that the two fsyncs (and
    the writer's record) run at once; on ext4 they share one journal commit, one wait for the disk
    instead of several. Until ``wait`` returns, a crash can leave ``target`` missing or with part of
    its data. Readers in this process see the whole file at once (the page cache).
    """
    _make_folder(target.parent)
    fd, tmp_name = _create(tmp_dir, prefix=f".{target.name}.", suffix=".part")
    written = Path(tmp_name)
    try:
        _write_all(fd, data)
        os.replace(written, target)
    except BaseException:
        os.close(fd)
        written.unlink(missing_ok=True)
        raise
    return SyncingWrite(target, fd, pool)


class SyncingWrite:
    """A file written and named whose data and folder are being fsynced; ``wait`` or ``discard`` it exactly once."""

    def __init__(self, target: Path, fd: int, pool: Executor) -> None:
        self.target = target
        self._fd = fd
        try:
            self._syncs = [pool.submit(os.fsync, fd), pool.submit(fsync_folder, target.parent)]
        except BaseException:  # the pool shut down: nothing runs on the descriptor
            os.close(fd)
            target.unlink(missing_ok=True)
            raise

    def wait(self) -> None:
        """Return once data and name are on disk; raise the fsync's ``OSError`` otherwise, the file removed."""
        try:
            futures.wait(self._syncs)
        finally:
            os.close(self._fd)
        for sync in self._syncs:
            if sync.exception() is not None:
                self.target.unlink(missing_ok=True)
                sync.result()

    def discard(self) -> None:
        """Remove the file, once its fsyncs have ended (they hold its descriptor)."""
        try:
            futures.wait(self._syncs)
        finally:
            os.close(self._fd)
            self.target.unlink(missing_ok=True)


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
    fsync_folder(target.parent)


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
        fsync_folder(new.parent)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until done: unlike a buffered file object, no extra objects or copies per call."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
