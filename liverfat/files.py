"""Durable file writes: every file the node and ``liverfat analyze`` write goes through here.

The spool's received instances, the model cache, the DICOM outputs, ``result.json`` and the saved mask
all take the same path: a temporary file in the same folder (or a given one on the same file system),
fsync, rename over the target, fsync of the folder that holds the new name (and of the parent of every
folder made for it). After return the file survives a crash or power loss, and a reader never sees half
of it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def durable_write(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``target`` so that after return it survives a crash or power loss.

    ``tmp_dir`` (default: the target's folder) holds the temporary file; it must be on the same file system.
    """
    _make_folder(target.parent)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir or target.parent, prefix=f".{target.name}.", suffix=".part")
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


@contextmanager
def durable_path(target: Path) -> Iterator[Path]:
    """A temporary path for a writer that wants a file name (SimpleITK); durable as ``target`` when the block ends.

    The temporary name ends with the target's name, so a writer that picks the format by suffix
    (``.nii.gz``) picks the target's. If the block raises, the temporary file is removed and
    ``target`` is left as it was.
    """
    _make_folder(target.parent)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=f".{target.name}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
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
