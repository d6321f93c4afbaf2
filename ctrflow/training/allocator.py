"""Keep freed memory in the C heap while a model trains (glibc's malloc options), so each step reuses the pages
of the step before instead of faulting in fresh ones.

Why: a training step allocates and frees the same large tensors every step. At batch 4096 the activation units of
DIN, DMAE, early fusion and SimTier work on [4096, 50, 80] float tensors (64 MiB each, forward and backward). glibc
serves a block above its mmap threshold (adjusted at run time, but never above 32 MiB) with freshly mapped pages
and unmaps it on free, and it gives the heap's free top back to the kernel beyond its trim threshold. So every step
pays one page fault (a zeroed 4 KiB page) per page of every such tensor. Measured on these machines (1 thread):
a ReLU into a fresh [4096, 50, 80] tensor took 25 ms, into a reused one 9 ms; at 2 threads a DIN training step on
ML-1M went from 20.1k to 28.5k samples/s and DMAE from 8.4k to 10.1k (benchmarks/results/train_speed_profile.md).
What is computed does not change: only where the memory comes from.

While `keep_freed_memory()` is active, blocks up to `KEEP` (256 MiB) come from the heap and freed memory stays there
for reuse. The cost is memory: the process keeps the free blocks it made (RSS stays near its peak instead of going
down and up each step), and blocks of different sizes can leave holes; `release()` (the trainer calls it after each
epoch) and the exit give the free memory back with `malloc_trim(0)`.

glibc turns its dynamic threshold off for good once an option is set, and has no call to turn it back on. So on exit
the thresholds are set where the dynamic scheme ends up in a process that has freed a large block (mmap 32 MiB, trim
64 MiB), not back to the 128 KiB start: blocks up to 32 MiB keep being reused after training, as they were before.

Nothing is changed when the C library is not glibc (musl, macOS), when another allocator is preloaded (jemalloc,
tcmalloc: LD_PRELOAD), or when the user set glibc's malloc options (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
MALLOC_TOP_PAD_, GLIBC_TUNABLES with glibc.malloc.*): their choice stands. The options cover the main arena, i.e.
the allocations of the thread that calls fit (torch runs the CPU backward on that thread too); a block made by
another thread lives in that thread's arena and is unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP = 256 * 1024 * 1024  # blocks up to this size stay in the heap while active (4x a batch-4096 activation unit)
AFTER_MMAP = 32 * 1024 * 1024  # where glibc's dynamic mmap threshold tops out (64-bit: DEFAULT_MMAP_THRESHOLD_MAX)
AFTER_TRIM = 2 * AFTER_MMAP  # ... and the trim threshold it sets beside it
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_depth = 0  # nested or concurrent users: the first sets the options, the last one out sets the exit values
_active = False


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


def why_not(environ: os._Environ | dict[str, str] | None = None) -> str | None:
    """Why the options are left alone in this process (None: they are used)."""
    env = os.environ if environ is None else environ
    if _LIBC is None:
        return "the C library is not glibc"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"another allocator is preloaded (LD_PRELOAD={preload})"
    user = [k for k in USER_SETTINGS if k in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"glibc's malloc options are set by the environment ({', '.join(user)})"
    return None


def available() -> bool:
    """Whether `keep_freed_memory()` changes anything in this process."""
    return why_not() is None


def _set(mmap_threshold: int, trim_threshold: int) -> bool:
    assert _LIBC is not None
    ok_mmap = _LIBC.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    ok_trim = _LIBC.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    return bool(ok_mmap) and bool(ok_trim)


def release() -> None:
    """Give the heap's free memory back to the kernel (malloc_trim(0)); a no-op outside glibc."""
    if available():
        _LIBC.malloc_trim(0)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the heap for reuse; yields whether that is in effect.

    Nested and concurrent blocks share one setting: the first in sets it, the last out sets the exit values and
    trims the heap. When glibc refuses an option, the exit values are set at once, a warning is logged and the block
    yields False.
    """
    global _depth, _active
    reason = why_not()
    if not enabled or reason is not None:
        if enabled:
            log.debug("allocator: keep_freed_memory left off: %s", reason)
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _active = _set(KEEP, KEEP)
            if not _active:
                _set(AFTER_MMAP, AFTER_TRIM)
                log.warning("allocator: glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); training with its defaults")
        active = _active
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(AFTER_MMAP, AFTER_TRIM)
                _active = False
                release()
