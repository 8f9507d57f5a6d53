"""A worker's heap keeps freed memory: the next series' arrays reuse mapped pages instead of faulting them in.

Each case runs in a fresh interpreter (the settings are process-wide) and counts the minor page
faults of writing a 200 MB block from ``malloc``, as SimpleITK and torch allocate their images and
tensors (numpy asks for huge pages itself, so its arrays fault a few hundred times either way).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from liverfat.service.heap import _glibc

PAGES = 200 * 2**20 // 4096

FAULTS = """
import ctypes, resource, sys
from liverfat.service.heap import _glibc, keep_freed_memory
setting = sys.argv[1]
if setting != "default":
    assert keep_freed_memory(int(setting))
libc = _glibc()

def faults_of_a_written_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(200 * 2**20)
    ctypes.memset(block, 1, 200 * 2**20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults_of_a_written_block(), faults_of_a_written_block())
"""

pytestmark = pytest.mark.skipif(_glibc() is None, reason="not glibc: keep_freed_memory does nothing here")


def faults(setting: str) -> tuple[int, int]:
    """Minor faults of writing a 200 MB block for the first and the second time, in a fresh process."""
    output = subprocess.run([sys.executable, "-c", FAULTS, setting], check=True, capture_output=True, text=True)
    first, second = output.stdout.split()
    return int(first), int(second)


def test_by_default_every_block_faults_its_pages_in_again() -> None:
    first, second = faults("default")
    assert first > PAGES // 2 and second > PAGES // 2


def test_kept_memory_is_reused_by_the_next_block_without_faults() -> None:
    first, second = faults("0")
    assert first > PAGES // 2, "nothing touched ahead: the first block faults its pages in"
    assert second < PAGES // 50


def test_memory_touched_at_start_spares_the_first_block_too() -> None:
    first, second = faults(str(300 * 2**20))
    assert first < PAGES // 50 and second < PAGES // 50
