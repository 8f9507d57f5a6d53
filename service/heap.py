"""Keep a worker's freed memory for its next series instead of faulting it in again each time.

A 300-slice series allocates a few GB of arrays one after another (the CT in HU, SimpleITK's
copies, the working grid, the network's row blocks and slabs, the masks). glibc serves every
allocation above its mmap threshold (at most 32 MiB unless told otherwise) with a fresh mapping
that it unmaps on free, so each series faults all of those pages in again. Measured on this
2-vCPU VM, the default model on the 300-slice phantom, three series in one process: 525,000 to
600,000 minor faults and 1.3 to 1.5 s of kernel time per series (the first: 900,000 and 3.1 s).
With blocks below 2 GiB served from the heap, freed memory kept there, and the expected working
set touched once when the worker starts: 2,000 to 9,000 faults and 0.1 to 0.2 s, the first series
included. numpy asks for transparent huge pages for its large arrays, which fault far less often;
most of the faults came from torch's and SimpleITK's buffers.

The price: a worker's resident memory stays at its high-water mark between series instead of
falling back, and starts there (peak 2.08 GB against 1.77 GB in that measurement; the target is
2.5 GB). Worker processes do this, as does ``liverfat analyze`` (without touching memory ahead:
a run may hold one small series); the node process keeps glibc's defaults. Elsewhere than glibc
(musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

from liverfat.service.libc import c_library

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 2**31 - 1  # mallopt takes an int: blocks below 2 GiB come from the heap, larger ones are mapped
PREFAULT_BYTES = 1536 * 2**20  # about a 300-slice series' working set (without the model's weights)


def keep_freed_memory(prefault_bytes: int = PREFAULT_BYTES) -> bool:
    """Serve blocks below 2 GiB from the heap, keep up to 2 GiB of freed memory, and touch ``prefault_bytes`` now.

    Returns whether the allocator took the settings (False off glibc, or if it refused them).
    """
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: freed memory goes back to the system as the C library decides")
        return False
    if not (libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK) and libc.mallopt(M_TRIM_THRESHOLD, LARGEST_HEAP_BLOCK)):
        log.warning("glibc refused the heap settings: each series faults its memory in anew (slower, same results)")
        return False
    if prefault_bytes > 0:
        block = libc.malloc(prefault_bytes)
        if block:
            ctypes.memset(block, 0, prefault_bytes)  # every page written once: mapped from here on
            libc.free(block)  # back to the heap, not to the system (below the trim threshold)
    return True


def _glibc() -> ctypes.CDLL | None:
    libc = c_library()
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
