"""Run one command and measure it: wall seconds and peak RSS of its whole process tree, with kill limits.

    python -m benchmarks.measure --limit-s 300 --limit-mb 10000 --json out.json -- ctrflow ... features ...

Peak RSS is the larger of two figures: the largest sum of the resident set sizes of the process and all its
children, sampled every `interval` seconds (psutil; a spike between samples can be missed), and the kernel's
peak of the largest single process (wait4's ru_maxrss, exact, what /usr/bin/time reports). CPU seconds are the
kernel's user + system time of the command and the children it waited for.
A run that passes `limit_s` or
`limit_mb` is killed (its whole tree) and reported with `killed` naming the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def tree_usage(proc: psutil.Process) -> tuple[int, float]:
    """(bytes resident, CPU seconds used) of `proc` and every live descendant (those exiting meanwhile: skipped)."""
    rss, cpu = 0, 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            t = p.cpu_times()
            cpu += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, cpu


def measure(
    cmd: list[str],
    limit_s: float | None = None,
    limit_mb: float | None = None,
    interval: float = 0.2,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> dict[str, Any]:
    """Run `cmd`; return {"cmd", "rc", "seconds", "peak_rss_mb", "cpu_seconds", "killed"} (killed: None, "time"
    or "memory")."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    ps = psutil.Process(proc.pid)
    peak, cpu, killed, status, usage = 0, 0.0, None, None, None
    try:
        while status is None:
            pid, wstatus, ru = os.wait4(proc.pid, os.WNOHANG)  # reaps the command itself: exact CPU time and peak
            if pid:
                status, usage = wstatus, ru
                break
            try:
                rss, used = tree_usage(ps)
            except psutil.NoSuchProcess:
                continue
            peak, cpu = max(peak, rss), max(cpu, used)
            elapsed = time.perf_counter() - started
            if limit_mb is not None and peak > limit_mb * 2**20:
                killed = "memory"
            elif limit_s is not None and elapsed > limit_s:
                killed = "time"
            if killed:
                for p in [*ps.children(recursive=True), ps]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(interval)
    finally:
        if log_path:
            out.close()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    # the kernel's figures for the command and the children it waited for: the largest single peak, all CPU time
    peak = max(peak, usage.ru_maxrss * 1024)
    cpu = max(cpu, usage.ru_utime + usage.ru_stime)
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak / 2**20, 1),  # the larger of the sampled tree sum and the kernel's largest process
        "cpu_seconds": round(cpu, 1),  # user + system, the command and its reaped children
        "killed": killed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-s", type=float, default=None)
    ap.add_argument("--limit-mb", type=float, default=None)
    ap.add_argument("--log", default=None, help="the command's stdout+stderr go here")
    ap.add_argument("--json", default=None, help="write the result here too")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    result = measure(cmd, args.limit_s, args.limit_mb, log_path=args.log)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(0 if result["rc"] == 0 and not result["killed"] else 1)


if __name__ == "__main__":
    main()
