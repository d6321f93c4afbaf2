"""The service guard's costs and what it saves: a real `bentoml serve` on localhost, large request bodies.

    python -m benchmarks.guards --deployment runs/latest/deployment.json --sizes 10 100 300

For each body size (MB, really sent; JSON with a long padding field) it records the answer's status, the seconds to
it and the worker's peak RSS growth (sampled every 10 ms), twice: with the configured limit (params
`serving.max_request_bytes`) and with the limit lifted to 2 GB, which is what the service did before the guard (read
the whole body, then parse it). It also times the guard's own parse-and-check of a /rank body of 100 and 1,000
candidates in-process. Traffic goes only to 127.0.0.1. Records are merged into benchmarks/results/guards.json by
(measure, limit_bytes, size); guards.md re-rendered.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import timeit
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.harness import RESULTS, merge_records

KEY = ("measure", "limit_bytes", "size")
NO_LIMIT = 2_000_000_000


def _worker_rss(server_pid: int) -> int:
    procs = [p for p in psutil.Process(server_pid).children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    return sum(p.memory_info().rss for p in procs)


def _sample_peak(server_pid: int, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _worker_rss(server_pid))
        time.sleep(0.01)


def bodies(deployment: dict[str, Any], log_dir: Path, sizes_mb: list[int], limit: int) -> list[dict[str, Any]]:
    """Status, seconds and worker peak RSS growth per body size, on a server started with `limit`."""
    from ctrflow.guard import guard_env
    from ctrflow.server import start_server

    records = []
    with start_server(deployment, log_dir, extra_env=guard_env({"max_request_bytes": limit, "auth_token_env": None})) as server:
        base = _worker_rss(server.process.pid)
        for mb in sizes_mb:
            body = b'{"user_id": 1, "scenario": "x", "item_ids": [1], "pad": "' + b"x" * (mb * 1_000_000) + b'"}'
            peak = [base]
            stop = threading.Event()

            sampler = threading.Thread(target=_sample_peak, args=(server.process.pid, peak, stop), daemon=True)
            sampler.start()
            started = time.perf_counter()
            try:
                status: int | str = httpx.post(server.url + "/rank", content=body, headers={"Content-Type": "application/json"}, timeout=600).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
            del body
            records.append({
                "measure": "body", "limit_bytes": limit, "size": f"{mb} MB", "status": status, "seconds": round(seconds, 2),
                "worker_peak_rss_growth_mb": round((peak[0] - base) / 1e6, 1),
            })  # fmt: skip
            print(records[-1], flush=True)
    return records


def guard_cost(candidates: list[int]) -> list[dict[str, Any]]:
    """Microseconds of the guard's JSON parse and strict check of one /rank body (best of 5 x 2,000)."""
    from ctrflow.guard import RankRules, parse_json

    rules = RankRules(("home", "search"), max(candidates))
    records = []
    for n in candidates:
        body = json.dumps({"user_id": 1, "scenario": "home", "item_ids": list(range(10**12, 10**12 + n))}).encode()
        best = min(timeit.repeat(lambda b=body: rules.check(parse_json(b)), number=2000, repeat=5)) / 2000
        records.append({"measure": "parse_and_check", "limit_bytes": None, "size": f"{n} candidates", "microseconds": round(best * 1e6, 1)})
        print(records[-1], flush=True)
    return records


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Service guard",
        "",
        "Large bodies to `/rank` on a real `bentoml serve` (one worker): the answer, its time and the worker's peak RSS "
        "growth, with the configured limit and with the limit lifted (what the service did before the guard). "
        "Then the guard's own parse-and-check time per request, in-process. Written by `python -m benchmarks.guards`.",
        "",
        "| body | limit (bytes) | status | seconds | worker peak RSS growth (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in (r for r in records if r["measure"] == "body"):
        limit = "none (2 GB)" if r["limit_bytes"] == NO_LIMIT else f"{r['limit_bytes']:,}"
        lines.append(f"| {r['size']} | {limit} | {r['status']} | {r['seconds']} | {r['worker_peak_rss_growth_mb']} |")
    lines += ["", "| /rank body | guard parse + check (us) |", "|---|---|"]
    lines += [f"| {r['size']} | {r['microseconds']} |" for r in records if r["measure"] == "parse_and_check"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from ctrflow.config import load_params

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deployment", default="runs/latest/deployment.json", help="deployment.json of a served model.")
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 100, 300], help="Body sizes in MB.")
    p.add_argument("--candidates", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--workdir", default="runs/bench_guards", help="Request logs and server logs go here.")
    args = p.parse_args(argv)
    deployment = json.loads(Path(args.deployment).read_text())
    limit = load_params()["serving"]["max_request_bytes"]
    work = Path(args.workdir)
    records = guard_cost(args.candidates)
    for lim in (limit, NO_LIMIT):
        records += bodies(deployment, work / f"log-{lim}", args.sizes, lim)
    merged = merge_records(records, RESULTS / "guards.json", KEY, render=render)
    print(render(merged))


if __name__ == "__main__":
    main()
