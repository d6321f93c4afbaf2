"""Serving load benchmark: the real ranking service against a bare BentoML floor, in one run.

    nice -n 10 python -m benchmarks.serving --run runs/latest/run.json runs/dmae/run.json \\
        --concurrency 1 8 16 --workers 1 2 --duration 15 [--online-stores sqlite redis]

For each run (a pipeline run's run.json: its deployment and training set) and each worker count it starts a real
`bentoml serve` of the ranking service (`endpoint: rank`: the user's online read, encoding, the model, the durable
request log) and of `benchmarks.bare_service` (`endpoint: bare`: the same model on pre-built tensors, same request
and answer shapes), and loads each at every concurrency with closed-loop clients (each sends its next request when
the last is answered) for `duration` seconds, 100 candidates per request. Per record: p50/p99 latency seen by the
client, rps, errors, the per-stage breakdown (p50/p99 from the service's Prometheus histograms, interpolated within
buckets as PromQL's histogram_quantile), and for `rank` the request-log rows written during the load, which must
equal the answered requests. The clients run on the same machine as the server (localhost only; every loop is
bounded in time) and the load average before and after is recorded: on a shared machine it is part of the result.
`--online-stores sqlite redis` serves the same run and model tag once from the run's SQLite online store and once
from Redis: a throw-away `redis-server` on a free port (ctrflow.local_services), a copy of the run's feature
repository whose online store is the production profile's Redis block verbatim (`redis_repo`), applied and
materialised up to the run's own materialisation end, so both stores hold the same rows; sqlite and redis of one
worker count are measured back to back, so they see the same machine load. `--repeats N` alternates rank and bare N
times per worker count (rank, bare, rank, bare...): this VM's speed drifts by tens of percent within minutes, so the
targets are judged on the median over the repeats (each c=8 rank repeat against the bare one measured beside it).
Records are merged into benchmarks/results/serving.json by KEY; serving.md is re-rendered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import RESULTS, merge_records
from ctrflow.local_services import ONLINE_STORES, redis_server

STAGES = ("feature_read", "encode", "model", "log")
BARE_SERVICE = "benchmarks.bare_service:BareService"
# serving.json merges by these (the family too: gsvr and gsvr-pretrained both serve a model named gsvr)
KEY = ("model", "family", "endpoint", "workers", "candidates", "concurrency", "online_store")


def _requests(training_set: str, candidates: int, n: int = 200) -> list[dict[str, Any]]:
    from ctrflow.demo import demo_requests

    return [r for r in demo_requests(training_set, n, candidates=candidates) if len(r["item_ids"]) == candidates] or demo_requests(training_set, n, candidates)


def redis_repo(run_repo: str | Path, dest: str | Path) -> Path:
    """A copy of a run's feature repository (definitions and config; no data, registry or online store) at `dest`
    whose `online_store` block is the production profile's Redis block verbatim (connection string from
    $CTRFLOW_REDIS); registry and offline store stay the run's (a file registry inside the copy, DuckDB). A copy
    already at `dest` is replaced. Apply and materialise it before serving from it."""
    import shutil

    from ctrflow import features
    from ctrflow.local_services import use_production_stores

    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    features.copy_repo(dest, template=Path(run_repo))
    (dest / features.MATERIALIZED_FILE).unlink(missing_ok=True)  # the run's marker; materialize writes the copy's
    use_production_stores(dest, "online_store")
    return dest


def redis_deployment(deployment: dict[str, Any], dest: Path) -> dict[str, Any]:
    """The run's deployment (same model tag) against a Redis copy of its feature repository, applied from the run's
    feature tables and materialised up to the run's materialisation end (now when the run has no marker).
    Needs $CTRFLOW_REDIS (a running redis-server)."""
    from datetime import datetime

    from ctrflow import features

    run_repo = Path(deployment["feature_repo"])
    repo = redis_repo(run_repo, dest)
    store = features.apply_repo(repo, run_repo / "data")
    try:
        end = datetime.fromisoformat(json.loads((run_repo / features.MATERIALIZED_FILE).read_text())["end"])
    except (OSError, ValueError, KeyError):
        end = None
    features.materialize(store, end)
    return {**deployment, "feature_repo": str(repo)}


def load(url: str, requests: list[dict[str, Any]], concurrency: int, duration_s: float, batched: bool = False) -> dict[str, Any]:
    """Closed-loop load: `concurrency` clients for `duration_s` seconds; latency percentiles of the answered ones.
    `batched`: the bare service's adaptive-batching endpoint (/rank_batched, one list entry per request)."""
    path = "/rank_batched" if batched else "/rank"
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def worker(offset: int) -> None:
        nonlocal errors
        i = offset
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                body = requests[i % len(requests)]
                if batched:
                    body = {"item_counts": [len(body["item_ids"])]}
                t = time.perf_counter()
                try:
                    ok = client.post(url + path, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    if ok:
                        latencies.append(ms)
                    else:
                        errors += 1
                i += concurrency

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {
        "requests": len(latencies) + errors,
        "answered": len(latencies),
        "errors": errors,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rps": round(len(latencies) / elapsed, 1),
        "duration_s": round(elapsed, 1),
    }


def histograms(text: str, name: str = "ctrflow_rank_stage_seconds") -> dict[str, dict[float, float]]:
    """Cumulative bucket counts per stage ({stage: {upper bound: count}}) from Prometheus text."""
    out: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        labels, _, value = line[len(name) + 8 :].rpartition("} ")
        parts = dict(p.split("=", 1) for p in labels.split(","))
        stage, le = parts["stage"].strip('"'), parts["le"].strip('"')
        bounds = out.setdefault(stage, {})
        bound = float("inf") if le == "+Inf" else float(le)
        bounds[bound] = bounds.get(bound, 0.0) + float(value)  # several workers: summed
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """PromQL histogram_quantile: linear interpolation within the bucket holding the q-th observation (seconds)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return lower
            return lower + (b - lower) * (rank - below) / max(buckets[b] - below, 1e-12)
        lower, below = b, buckets[b]
    return lower


def stage_breakdown(before: str, after: str) -> dict[str, dict[str, float | None]]:
    """p50 and p99 (ms) per stage of the observations between two /metrics scrapes."""
    h0, h1 = histograms(before), histograms(after)
    out = {}
    for stage in STAGES:
        delta = {b: c - h0.get(stage, {}).get(b, 0.0) for b, c in h1.get(stage, {}).items()}
        p50, p99 = quantile(0.5, delta), quantile(0.99, delta)
        out[stage] = {"p50": None if p50 is None else round(p50 * 1000, 3), "p99": None if p99 is None else round(p99 * 1000, 3)}
    return out


def bare_model_p50_ms(model_dir: str, feature_repo: str, request: dict[str, Any], repeats: int = 50) -> tuple[str, float]:
    """The model's forward pass on one request's candidates, in-process, features already fetched and encoded."""
    import torch
    from feast import FeatureStore

    from ctrflow.features import online_frame
    from ctrflow.models.base import to_tensors
    from ctrflow.training.artifact import load_model_artifact

    torch.set_num_threads(1)
    loaded = load_model_artifact(model_dir)
    frame = online_frame(FeatureStore(repo_path=feature_repo), request["user_id"], request["item_ids"], request["scenario"])
    batch = to_tensors(loaded.encoder.transform(frame, with_label=False))
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            loaded.model(batch)
            times.append((time.perf_counter() - t) * 1000)
    return loaded.name, float(np.median(times))


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a server process and its live descendants (BentoML's arbiter and
    workers): per request, a cost that the machine's other load does not inflate as it inflates latency."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def logged_between(log_dir: Path, windows: list[tuple[float, float]]) -> list[int]:
    """Requests in the request log (read after the server stopped, so everything is compacted) whose time stamp falls
    in each (start, end) window (epoch seconds): the log rows of each load level."""
    from ctrflow.request_log import read_request_log

    if not log_dir.exists():
        return [0] * len(windows)
    log = read_request_log(log_dir)
    if not len(log):
        return [0] * len(windows)
    import pandas as pd

    ts = pd.to_datetime(log.groupby("request_id")["ts"].first(), utc=True)
    seconds = (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    return [int(((seconds >= a) & (seconds <= b)).sum()) for a, b in windows]


def _fmt(v: Any) -> str:
    return "–" if v is None else str(v)


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        "`rank`: the real service on `bentoml serve` (localhost): the user's online read (Feast), encoding against the "
        "worker's cached item table, the model, the durable request log. `bare`: a BentoML endpoint with the same "
        "request and answer that scores the same model on pre-built tensors (benchmarks/bare_service.py), the floor; "
        "`bare-batched`: the same with BentoML adaptive batching (max 32 requests, 10 ms). "
        "One torch thread per worker; closed-loop clients on the same machine. Stage p50/p99 from the service's "
        "Prometheus histograms (bucket-interpolated). `server CPU ms/req`: CPU time of the server's processes per "
        "answered request (what the machine's other load does not inflate). Rows of one `run` id were measured in the same invocation "
        "(`#k`: its k-th alternation of rank and bare, `--repeats`); "
        "`load` is the 1-minute load average before/after the run on a 2-core machine shared with other jobs. "
        "`online store`: where the user's features are read (the run's SQLite file, or a Redis copy of the same "
        "rows: `--online-stores sqlite redis`, one throw-away local redis-server; rows of one run id, same model tag). "
        "Serving cost does not depend on training epochs: a 1-epoch run serves the same model shape as a full one. "
        "Written by `python -m benchmarks.serving`.",
        "",
        "| model | family | endpoint | online store | workers | candidates | concurrency | requests | errors | p50 ms | p99 ms | rps "
        "| read p50/p99 | encode p50/p99 | model p50/p99 | log p50/p99 | server CPU ms/req | bare model p50 ms "
        "| logged requests | load | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        st = r.get("stages_ms") or {}
        cells = [f"{_fmt((st.get(s) or {}).get('p50'))} / {_fmt((st.get(s) or {}).get('p99'))}" if st else "–" for s in STAGES]
        load_avg = r.get("load_avg")
        repeat = f" #{r['repeat'] + 1}" if r.get("repeat") else ""  # the 2nd, 3rd... alternation of one run
        lines.append(
            f"| {r['model']} | {r.get('family', '–')} | {r.get('endpoint', 'rank')} | {r.get('online_store', 'sqlite')} "
            f"| {r.get('workers', 1)} | {r['candidates']} "
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['rps']} "
            f"| {' | '.join(cells)} | {_fmt(r.get('server_cpu_ms_per_request'))} | {r['bare_model_p50_ms']:.2f} "
            f"| {_fmt(r.get('logged_requests'))} "
            f"| {'–' if not load_avg else f'{load_avg[0]:.1f}/{load_avg[1]:.1f}'} | {r.get('run', '–')}{repeat} |"
        )
    lines += ["", *targets(records)]
    return "\n".join(lines) + "\n"


def targets(records: list[dict[str, Any]]) -> list[str]:
    """Issue 10's targets per model and online store, from the newest run that measured it: c=1 p99 of `rank`
    (<= 10 ms; DMAE <= 25 ms), and `rank` rps at c=8 with 2 workers over the `bare` rps of the same run (>= 0.8)."""
    out = ["## Targets (newest run per model and online store)", ""]
    by_model: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("endpoint") in ("rank", "bare") and r.get("workers") is not None:
            by_model.setdefault((r["model"], r.get("family") or "", r.get("online_store", "sqlite")), []).append(r)
    for (model, family, store), rs in sorted(by_model.items()):
        newest = max(r.get("run", "") for r in rs)
        rs = [r for r in rs if r.get("run", "") == newest]
        def get(e: str, w: int, c: int, rs: list[dict[str, Any]] = rs) -> list[dict[str, Any]]:
            """The records of endpoint e at w workers and concurrency c, one per repeat, in repeat order."""
            return sorted((r for r in rs if r["endpoint"] == e and r["workers"] == w and r["concurrency"] == c), key=lambda r: r.get("repeat") or 0)

        def judged(values: list[float]) -> tuple[float, str]:
            """The median of the repeats and, when there are several, every value."""
            median = float(np.median(values))
            return median, ("" if len(values) == 1 else f" (median of {len(values)} repeats: {', '.join(f'{v:.2f}' for v in values)})")

        limit = 25.0 if model == "dmae" else 10.0
        parts = []
        for w in (1, 2):
            ones = get("rank", w, 1)
            if ones:
                p99, more = judged([r["p99_ms"] for r in ones])
                parts.append(f"c=1, {w} worker(s): p99 {p99:.2f} ms{more} (target <= {limit:g}: {'met' if p99 <= limit else 'NOT met'})")
        ranks, bares = get("rank", 2, 8), get("bare", 2, 8)
        pairs = [(r, b) for r, b in zip(ranks, bares) if b["rps"] and (r.get("repeat") or 0) == (b.get("repeat") or 0)]
        if pairs:
            ratio, more = judged([r["rps"] / b["rps"] for r, b in pairs])
            head = f"{pairs[0][0]['rps']} rps vs bare {pairs[0][1]['rps']}" if len(pairs) == 1 else "rank / bare rps"
            parts.append(f"c=8, 2 workers: {head} = {ratio:.2f}x{more} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
        errors = sum(r["errors"] for r in rs if r["endpoint"] == "rank")
        logged_ok = all(r.get("logged_requests") == r.get("answered") for r in rs if r["endpoint"] == "rank")
        parts.append(f"rank errors {errors}; request-log rows = answered requests: {'yes' if logged_ok else 'NO'}")
        named = model if family in ("", model, "standard") else f"{model} ({family} family)"
        out.append(f"- **{named}**, {store} (run {newest}): " + "; ".join(parts))
    return out


def measure(
    target: dict[str, Any], endpoint: str, workers: int, concurrencies: list[int], duration: float, candidates: int, run_id: str,
    online_store: str = "sqlite", repeat: int = 0,
) -> list[dict[str, Any]]:
    """One server (rank or bare) of one run with `workers` workers, reading from `online_store` (a key of
    target["deployments"]), loaded at each concurrency in turn."""
    from ctrflow.server import start_server

    run, deployment, requests = target["run"], target["deployments"][online_store], target["requests"]
    log_dir = Path(run["workdir"]) / f"bench_request_log_{endpoint}_{online_store}_w{workers}_{int(time.time())}"
    extra = {"CTRFLOW_BARE_CANDIDATES": str(candidates)}
    service = "serving.service:RankingService" if endpoint == "rank" else BARE_SERVICE
    records = []
    server_log = log_dir.parent / f"{log_dir.name}.server.log"
    with start_server(deployment, log_dir, workers=workers, threads=1, service=service, extra_env=extra, log_path=server_log, ready_timeout=300) as server:
        for body in requests[: 10 * workers]:  # warm-up: every worker
            httpx.post(server.url + "/rank", json=body, timeout=30)
            if endpoint == "bare-batched":
                httpx.post(server.url + "/rank_batched", json={"item_counts": [len(body["item_ids"])]}, timeout=30)
        windows = []
        for concurrency in concurrencies:
            load_before = os.getloadavg()[0]
            start = time.time()
            before = httpx.get(server.url + "/metrics", timeout=30).text
            cpu_before = server_cpu_s(server.process.pid)
            result = load(server.url, requests, concurrency, duration, batched=endpoint == "bare-batched")
            cpu = server_cpu_s(server.process.pid) - cpu_before
            after = httpx.get(server.url + "/metrics", timeout=30).text
            windows.append((start, time.time()))
            record = {
                "endpoint": endpoint, "model": target["model"], "family": run.get("family"), "online_store": online_store,
                "workers": workers,
                "threads": 1, "candidates": candidates, "concurrency": concurrency, **result,
                "server_cpu_ms_per_request": round(cpu * 1000 / max(result["answered"], 1), 2),
                "stages_ms": stage_breakdown(before, after) if endpoint == "rank" else None,
                "bare_model_p50_ms": round(target["bare"], 3), "logged_requests": None,
                "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)], "run": run_id, "repeat": repeat,
            }  # fmt: skip
            records.append(record)
            print(json.dumps(record), flush=True)
    if endpoint == "rank":  # the server is stopped: every answered request is compacted into the log
        for record, logged in zip(records, logged_between(log_dir, windows)):
            record["logged_requests"] = logged
            print(f"{endpoint} {online_store} w{workers} c{record['concurrency']}: {logged} logged, {record['answered']} answered", flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", default=["runs/latest/run.json"], help="run.json of pipeline runs (training set, model, deployment).")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--endpoints", nargs="+", default=["rank", "bare"], choices=["rank", "bare", "bare-batched"])
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure rank and its floor this many times, alternated (this VM's speed drifts by tens of percent "
                        "within minutes: the targets are judged on the median of the repeats, every repeat reported)")
    p.add_argument("--online-stores", nargs="+", default=["sqlite"], choices=list(ONLINE_STORES),
                   help="serve each run from its SQLite online store and/or a Redis copy (a throw-away redis-server).")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    records = []
    with contextlib.ExitStack() as stack:
        if "redis" in args.online_stores:  # one throw-away server for every run; the service reads $CTRFLOW_REDIS
            os.environ["CTRFLOW_REDIS"] = stack.enter_context(redis_server())
        targets = []
        for run_json in args.run:
            run = json.loads(Path(run_json).read_text())
            deployment = json.loads(Path(run["deployment"]).read_text()) if run.get("deployment") else json.loads((Path(run["workdir"]) / "deployment.json").read_text())
            requests = _requests(run["training_set"], args.candidates)
            model_name, bare = bare_model_p50_ms(run["model_dir"], deployment["feature_repo"], requests[0])
            deployments = {"sqlite": deployment}
            if "redis" in args.online_stores:
                deployments["redis"] = redis_deployment(deployment, Path(run["workdir"]) / "bench_feature_repo_redis")
            targets.append({"run": run, "deployments": deployments, "requests": requests, "model": model_name, "bare": bare})
        for target in targets:
            for workers in args.workers:
                for store in args.online_stores:  # the stores back to back, so they see the same machine load
                    for repeat in range(args.repeats):
                        for endpoint in args.endpoints:  # rank and its floor back to back, likewise
                            records += measure(target, endpoint, workers, args.concurrency, args.duration, args.candidates, run_id, store, repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    merge_records(records, args.out / "serving.json", KEY, render=render)
    print(f"results: {args.out / 'serving.json'} and {args.out / 'serving.md'}")


if __name__ == "__main__":
    main()
