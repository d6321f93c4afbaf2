"""Progress and cost of one pipeline step: rows done with an ETA while it runs, one closing line when it ends.

    @metered("features")                      # on a step function of ctrflow/steps.py
    def features_step(...): ...
        progress(n_done, total, "behaviour join")   # anywhere below it: "features: 400,000/1,000,209 rows (40%) ..."

The closing line, always the same shape (benchmarks and people grep it):

    features: 1,000,209 rows, 41.3 s, peak RSS 2,345 MB

Peak RSS is the step's own high-water mark: the kernel's VmHWM of this process, reset when the step starts
(writing 5 to /proc/self/clear_refs, Linux >= 4.0); where that is not allowed it falls back to the process's
peak since it started (getrusage), which can only overstate a step's peak. Child processes (a served model)
are not counted.
"""

from __future__ import annotations

import functools
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("ctrflow")

F = TypeVar("F", bound=Callable[..., Any])


def _emit(message: str) -> None:
    """Log at INFO; where no logging is set up (a KFP component's process) print to stderr so the line is seen."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


def _hwm_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM (since the last reset) or getrusage's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


@dataclass
class Meter:
    """One running step: its name, rows (set by the step or taken from its result), start time."""

    step: str
    rows: int | None = None
    started: float = field(default_factory=time.perf_counter)
    since_start: bool = False  # True: the peak could not be reset, it covers the whole process so far
    _last_log: float = 0.0

    def progress(self, done: int, total: int | None = None, what: str = "", every_s: float = 5.0) -> None:
        """Log rows done (of total), elapsed seconds and the ETA at the current rate; at most every `every_s`."""
        now = time.perf_counter()
        if now - self._last_log < every_s and not (total and done >= total):
            return
        self._last_log = now
        elapsed = now - self.started
        if total:
            eta = f"{elapsed / done * (total - done):.0f} s" if done else "?"
            _emit(
                f"{self.step}: {what + ': ' if what else ''}{done:,}/{total:,} rows ({100 * done / total:.0f}%), "
                f"{elapsed:.1f} s, ETA {eta}, peak RSS so far {peak_rss_mb():,.0f} MB"
            )
        else:
            _emit(f"{self.step}: {what + ': ' if what else ''}{done:,} rows, {elapsed:.1f} s, peak RSS so far {peak_rss_mb():,.0f} MB")

    def close_line(self) -> str:
        rows = "?" if self.rows is None else f"{self.rows:,}"
        scope = " (process peak: could not reset)" if self.since_start else ""
        return f"{self.step}: {rows} rows, {time.perf_counter() - self.started:.1f} s, peak RSS {peak_rss_mb():,.0f} MB{scope}"


_ACTIVE: list[Meter] = []


def current() -> Meter | None:
    """The innermost running step's meter (None outside every step)."""
    return _ACTIVE[-1] if _ACTIVE else None


def progress(done: int, total: int | None = None, what: str = "", every_s: float = 5.0) -> None:
    """`Meter.progress` of the running step; does nothing outside a step (library code may call it freely)."""
    meter = current()
    if meter is not None:
        meter.progress(done, total, what, every_s)


def metered(step: str) -> Callable[[F], F]:
    """Decorate a step: reset the peak, run it, log the closing line (rows from the result's "rows" key, else
    what the step set on `current().rows`). A failing step logs its line too, marked failed, and re-raises."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            meter = Meter(step)
            meter.since_start = not _hwm_reset() if not _ACTIVE else False
            _ACTIVE.append(meter)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                _emit(f"{meter.close_line()} (failed)")
                raise
            finally:
                _ACTIVE.remove(meter)
            if isinstance(result, dict) and meter.rows is None:  # steps report rows, training steps train_rows
                rows = result.get("rows", (result.get("metrics") or {}).get("train_rows"))
                meter.rows = rows if isinstance(rows, int) else None
            _emit(meter.close_line())
            return result

        return run  # type: ignore[return-value]

    return wrap
