"""The C library, through ctypes, loaded once: the workers' ``prctl`` and the heap's ``mallopt`` use it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """This process's C library (``errno`` kept for ``ctypes.get_errno``), or ``None`` where none is found."""
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name, use_errno=True)
