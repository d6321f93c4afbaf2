"""Keep freed memory in the C heap while a model trains (glibc's malloc options), so each step reuses the pages
of the step before instead of faulting in fresh ones.

Why: a training step allocates and frees the same large tensors every step. At batch 4096 the activation units of
DIN, DMAE, early fusion and SimTier work on [4096, 50, 80] float tensors (64 MiB each, forward and backward). glibc
serves a block above its mmap threshold (adjusted at run time, but never above 32 MiB) with freshly mapped pages
and unmaps it on free, and it gives the heap's free top back to the kernel beyond its trim threshold. So every step
pays one page fault (a zeroed 4 KiB page) per page of every such tensor. Measured on these machines (1 thread):
a ReLU into a fresh [4096, 50, 80] tensor took 25 ms, into a reused one 9 ms; a DIN training step on ML-1M went
from 20.1k to 28.5k samples/s and DMAE from 8.4k to 10.1k at 2 threads (benchmarks/results/train_speed_profile.md).
What is computed does not change: only where the memory comes from.

While `keep_freed_memory()` is active, blocks up to 2 GiB come from the heap and freed memory stays there for
reuse (the process's RSS stays at its peak instead of going down and up each step). On exit glibc's defaults
(128 KiB for both thresholds; the dynamic adjustment stays off) are set back and `malloc_trim(0)` gives the free
memory back. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT = 128 * 1024  # both thresholds' defaults (bytes)
KEEP = 2**31 - 1  # the largest value mallopt takes (an int): blocks up to 2 GiB stay in the heap

_lock = threading.Lock()
_depth = 0  # nested or concurrent users: the outermost one restores the defaults


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    # malloc_trim is glibc's own (musl has neither it nor working mallopt options; macOS has no mallopt)
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc


_LIBC = _glibc()


def available() -> bool:
    """Whether this process's C library is glibc (the options exist)."""
    return _LIBC is not None


def _set(mmap_threshold: int, trim_threshold: int) -> bool:
    assert _LIBC is not None
    ok_mmap = _LIBC.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    ok_trim = _LIBC.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    return bool(ok_mmap and ok_trim)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the heap for reuse; yields whether the options were set.

    Nested and concurrent blocks are fine: the last one to leave restores glibc's defaults and trims the heap.
    A C library that refuses an option is logged once and the block runs with its defaults.
    """
    global _depth
    if not enabled or _LIBC is None:
        yield False
        return
    with _lock:
        _depth += 1
        ok = _set(KEEP, KEEP) if _depth == 1 else True
    if not ok:
        log.warning("allocator: glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); training with its defaults")
    try:
        yield ok
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(GLIBC_DEFAULT, GLIBC_DEFAULT)
                _LIBC.malloc_trim(0)
