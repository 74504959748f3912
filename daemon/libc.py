"""The C library's few calls that Python does not wrap, through one handle, for both processes.

The daemon fixes malloc's mmap threshold at start-up; a runner asks to die with the daemon, hands
freed heap memory back, and asks the kernel which pages of a buffer are in memory and gives them
back. Each call says what it does where the C library lacks it (not glibc, not Linux): nothing,
and the caller is told so where it cares.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys

import numpy as np

# glibc's and Linux's numbers for the calls below.
_M_MMAP_THRESHOLD = -3  # mallopt parameter
_PR_SET_PDEATHSIG = 1  # prctl option
_MADV_DONTNEED = 4  # madvise advice: the pages go back to the kernel and read as zeros if touched again


def _open() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)  # the C library the process has already loaded
    except OSError:
        return None


_LIBC = _open()


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Give malloc blocks of `threshold_bytes` and more their own mappings, returned to the system
    when freed (glibc's mallopt(M_MMAP_THRESHOLD), which also stops glibc raising the threshold
    itself). Whether it was set: False on a system without glibc's mallopt."""
    if _LIBC is None or sys.platform != "linux":
        return False
    try:
        return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except AttributeError:  # not glibc
        return False


def trim_heap() -> bool:
    """Hand the memory malloc keeps after free() back to the system (glibc's malloc_trim).
    Whether the C library has the call."""
    if _LIBC is None or sys.platform != "linux":
        return False
    with contextlib.suppress(AttributeError):  # not glibc
        _LIBC.malloc_trim(0)
        return True
    return False


def die_with_parent(signum: int) -> bool:
    """Have the kernel send `signum` to this process when the thread that started it ends
    (Linux's prctl(PR_SET_PDEATHSIG)). Whether it was asked: False where Linux's prctl is missing.
    A parent that died before the call is not covered: the caller compares os.getppid() after."""
    if _LIBC is None or sys.platform != "linux":
        return False
    return bool(_LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def resident_pages(start: int, length: int) -> int:
    """How many of the pages [start, start + length) (page-aligned) are in memory (mincore). Where
    the kernel cannot tell, all of them: giving back pages that are not in memory is harmless."""
    pages = length // mmap.PAGESIZE
    if pages == 0:
        return 0
    if _LIBC is None:
        return pages
    vector = (ctypes.c_ubyte * pages)()
    if _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) != 0:
        return pages
    # numpy, not a Python loop: 1,900 pages (all-MiniLM's logits for 64 rows) after every decode.
    return int(np.count_nonzero(np.frombuffer(memoryview(vector).cast("B"), dtype=np.uint8) & 1))


def give_back_pages(start: int, length: int) -> None:
    """Return the pages [start, start + length) (page-aligned) to the kernel (madvise(MADV_DONTNEED)):
    a later read sees zeros, a later write gets a fresh page."""
    if _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED)
