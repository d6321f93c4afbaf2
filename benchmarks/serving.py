"""Serving load benchmark: a real `bentoml serve` on localhost under concurrent `rank` requests.

    python -m benchmarks.serving --run runs/latest/run.json runs/dmae/run.json --concurrency 1 8 --duration 20

Traffic goes only to 127.0.0.1 and every loop is bounded in time. Next to the service's latency it measures the
same model's bare forward pass on the same candidates in-process (`bare_model_p50_ms`), the floor the service
overhead is judged against, and counts the request-log rows afterwards. Several runs (e.g. the standard family's
DCNv2 and the dmae family's DMAE, whose service computes target-vs-history modality similarities per request) are
measured in one invocation, alternating concurrency levels, so their latencies compare under the same load.
Records are merged into benchmarks/results/serving.json by (model, candidates, concurrency); serving.md re-rendered.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.harness import RESULTS, merge_records


def _requests(training_set: str, candidates: int, n: int = 200) -> list[dict[str, Any]]:
    from ctrflow.demo import demo_requests

    return [r for r in demo_requests(training_set, n, candidates=candidates) if len(r["item_ids"]) == candidates] or demo_requests(training_set, n, candidates)


def load(url: str, requests: list[dict[str, Any]], concurrency: int, duration_s: float) -> dict[str, Any]:
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
                t = time.perf_counter()
                try:
                    ok = client.post(url + "/rank", json=body).status_code == 200
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
        "errors": errors,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rps": round(len(latencies) / elapsed, 1),
        "duration_s": round(elapsed, 1),
    }


def bare_model_p50_ms(model_dir: str, feature_repo: str, request: dict[str, Any], repeats: int = 50) -> tuple[str, float]:
    """The model's forward pass on one request's candidates, in-process, features already fetched."""
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
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            loaded.model(batch)
            times.append((time.perf_counter() - t) * 1000)
    return loaded.name, float(np.median(times))


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        "`rank` on a real `bentoml serve` (localhost), one worker, one torch thread: Feast online features, encoding, "
        "the model, the request log. Rows of one `run` id were measured in the same invocation. "
        "Written by `python -m benchmarks.serving`.",
        "",
        "| model | family | candidates | concurrency | requests | errors | p50 ms | p99 ms | rps | bare model p50 ms "
        "| logged requests | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r.get('family', '–')} | {r['candidates']} | {r['concurrency']} | {r['requests']} "
            f"| {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['rps']} | {r['bare_model_p50_ms']:.2f} "
            f"| {r['logged_requests']} | {r.get('run', '–')} |"
        )
    return "\n".join(lines) + "\n"


KEY = ("model", "candidates", "concurrency")  # serving.json records are merged by these


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", default=["runs/latest/run.json"], help="run.json of pipeline runs (training set, model, deployment).")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from ctrflow.request_log import read_request_log
    from ctrflow.server import start_server

    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    targets = []
    for run_json in args.run:
        run = json.loads(Path(run_json).read_text())
        deployment = json.loads(Path(run["deployment"]).read_text()) if run.get("deployment") else json.loads((Path(run["workdir"]) / "deployment.json").read_text())
        requests = _requests(run["training_set"], args.candidates)
        model_name, bare = bare_model_p50_ms(run["model_dir"], deployment["feature_repo"], requests[0])
        targets.append((run, deployment, requests, model_name, bare))
    records = []
    for concurrency in args.concurrency:
        for run, deployment, requests, model_name, bare in targets:  # alternate, so load hits every model alike
            log_dir = Path(run["workdir"]) / f"bench_request_log_c{concurrency}_{int(time.time())}"
            with start_server(deployment, log_dir) as server:
                for body in requests[:5]:  # warm-up
                    httpx.post(server.url + "/rank", json=body, timeout=30)
                result = load(server.url, requests, concurrency, args.duration)
            logged = read_request_log(log_dir)["request_id"].nunique() - 5 if log_dir.exists() else 0
            records.append(
                {"endpoint": "rank", "model": model_name, "family": run.get("family"), "candidates": args.candidates, "concurrency": concurrency, **result, "bare_model_p50_ms": round(bare, 3), "logged_requests": int(logged), "run": run_id}
            )
            print(records[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    merged = merge_records(records, args.out / "serving.json", KEY)
    (args.out / "serving.md").write_text(render(merged))
    print(f"results: {args.out / 'serving.json'} and {args.out / 'serving.md'}")


if __name__ == "__main__":
    main()
