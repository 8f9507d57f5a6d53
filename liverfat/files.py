"""Durable file writes shared by the spool, the model cache and the result folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def durable_write(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``target`` so that after return it survives a crash or power loss.

    Temporary file in ``tmp_dir`` (default: the target's folder; it must be on the same file
    system), fsync, rename over ``target``, fsync of the folder that holds the new name (and of
    its parent when the folder is new). A reader never sees a half-written file.
    """
    folder = target.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir or folder, prefix=f".{target.name}.", suffix=".part")
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
    _fsync_dir(folder)


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
