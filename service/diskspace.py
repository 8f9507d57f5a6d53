"""Whether the spool's disk is full, shared by the node's threads, its worker process and ``liverfat status``.

A node keeps a reserve file (``RESERVE_BYTES``) in its spool folder. When a write fails for
lack of space, or free space drops below ``FULL_BELOW_BYTES``, the reserve is deleted: its
space lets the index still record state (park a job, open itself after a restart, whose
``-shm`` file needs room), and its absence *is* the "disk full" state that every process of
the node sees. While it is absent, stores are answered 0xA700 and the worker takes no series.
The node tries to write the reserve again every ``PROBE_S``; once that works and
``RESUME_ABOVE_BYTES`` stay free, space has returned.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RESERVE_NAME = "reserve"
RESERVE_BYTES = 1 << 20
FULL_BELOW_BYTES = 256 << 10
RESUME_ABOVE_BYTES = 1 << 20
PROBE_S = 2.0
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# SQLite cannot grow an index's -shm file (it writes into each new page): on Linux, a full disk
SQLITE_IOERR_SHMSIZE = 4874


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says the disk (or the quota) is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", None) in (sqlite3.SQLITE_FULL,
                                                                                            SQLITE_IOERR_SHMSIZE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class DiskSpace:
    """The spool folder's reserve file and what its presence says (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reserve = root / RESERVE_NAME

    def is_full(self) -> bool:
        return not self.reserve.exists()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def release(self, why: str) -> None:
        """Enter the full state: give the reserve's space to the index."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return
        log.error("the spool's disk is full (%s): new instances are answered 0xA700 and no series is processed "
                  "until space returns; %s released for the index", why, self.reserve)  # fmt: skip

    def write(self, what: str, write: Callable[[], T]) -> T | None:
        """``write()``, or ``None`` when the disk is full: the full state is entered and the caller tries later."""
        try:
            return write()
        except (sqlite3.Error, OSError) as error:
            if not is_disk_full(error):
                raise
            self.release(f"{what}: {error}")
            return None

    def check(self) -> None:
        """Release the reserve when free space has dropped below ``FULL_BELOW_BYTES`` (a cheap statvfs)."""
        if not self.is_full():
            free = self.free_bytes()
            if free < FULL_BELOW_BYTES:
                self.release(f"{free // 1024} KiB free")

    def restore(self) -> bool:
        """Write the reserve again; whether space has returned (the reserve is whole and enough stays free)."""
        if not self.is_full():
            return True
        part = self.root / "tmp" / f"{RESERVE_NAME}.part"
        try:
            _allocate(part, RESERVE_BYTES)
            if self.free_bytes() < RESUME_ABOVE_BYTES:
                part.unlink()
                return False
            os.replace(part, self.reserve)
        except OSError as error:
            part.unlink(missing_ok=True)
            if is_disk_full(error):
                return False
            raise
        return True


def _allocate(path: Path, size: int) -> None:
    """A file of ``size`` bytes whose blocks are really allocated (fallocate, else zeros), fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            zeros = memoryview(bytes(size))
            while zeros:
                zeros = zeros[os.write(fd, zeros) :]
        os.fsync(fd)
    finally:
        os.close(fd)
