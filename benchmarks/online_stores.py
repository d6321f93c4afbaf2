"""Online reads on Feast's SQLite (embedded default) and Redis (production profile) online stores, same run.

    nice python -m benchmarks.online_stores                      # 20k users, 5k items, 100 candidates, 300 reads each
    nice python -m benchmarks.online_stores --users 50000 --reads 1000

One synthetic dataset's feature tables are applied and materialized into both stores (Redis: a throw-away
`redis-server` on a free port, ctrflow.local_services); then, alternating store by store so both see the same machine
load, it times the request path's read, `ctrflow.features.online_frame` (one user, `--candidates` items: the
service's one online read per request), and a user-only read (`get_online_features` of the user views, what a
service that keeps item features in memory reads). Latencies in ms (p50, p95, p99). The values read are checked
equal across stores first. Writes benchmarks/results/online_stores.{json,md}; records merge by (store, read, candidates).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ("store", "read", "candidates")
STORES = ("sqlite", "redis")


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "reads": len(a)}


def measure(users: int, items: int, candidates: int, reads: int, seed: int = 0) -> list[dict[str, Any]]:
    import pandas as pd

    from ctrflow import features as F
    from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic
    from ctrflow.local_services import redis_server, use_production_stores

    dataset = generate_synthetic(SyntheticConfig(n_users=users, n_items=items, n_interactions=users * 10, seed=seed))
    rng = np.random.default_rng(seed)
    user_ids = dataset.interactions.user_id.unique()
    item_ids = dataset.items.item_id.to_numpy()
    requests = [(int(rng.choice(user_ids)), [int(i) for i in rng.choice(item_ids, candidates, replace=False)]) for _ in range(reads)]
    with tempfile.TemporaryDirectory(prefix="ctrflow-online-") as tmp, redis_server() as redis:
        os.environ["CTRFLOW_REDIS"] = redis
        root = Path(tmp)
        F.write_feature_tables(dataset, root / "data")
        stores, setup = {}, {}
        for name in STORES:
            repo = F.copy_repo(root / f"repo-{name}")
            if name == "redis":
                use_production_stores(repo, "online_store")
            started = time.perf_counter()
            stores[name] = F.apply_repo(repo, root / "data")
            F.materialize(stores[name])
            setup[name] = round(time.perf_counter() - started, 2)
        user_features = [f"{v}:{f.name}" for v in ("user_behaviour", "user_profile")
                         for f in stores["sqlite"].get_feature_view(v).features]
        first = {n: F.online_frame(s, *requests[0], "home") for n, s in stores.items()}  # warm-up, and the same values
        pd.testing.assert_frame_equal(first["sqlite"].drop(columns="event_timestamp"), first["redis"].drop(columns="event_timestamp"))
        times: dict[tuple[str, str], list[float]] = {(n, r): [] for n in STORES for r in ("online_frame", "user_only")}
        for user, cands in requests:
            for name, store in stores.items():
                t = time.perf_counter()
                F.online_frame(store, user, cands, "home")
                times[(name, "online_frame")].append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                store.get_online_features(features=user_features, entity_rows=[{"user_id": user}])
                times[(name, "user_only")].append((time.perf_counter() - t) * 1000)
    return [
        {"store": name, "read": read, "candidates": candidates if read == "online_frame" else 0, "users": users,
         "items": items, "apply_materialize_s": setup[name], "load_1m": round(os.getloadavg()[0], 1), **_stats(ms)}
        for (name, read), ms in times.items()
    ]


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Online stores: SQLite vs Redis, the same reads in the same run",
        "",
        "`python -m benchmarks.online_stores` (see its docstring): in-process Feast online reads, alternating store by",
        "store. `online_frame`: one user + the candidates (what the service reads per request); `user_only`: the user",
        "views of one user. Redis is a local `redis-server` (no network hop): on a cluster add the round trip.",
        "",
        "| store | read | candidates | p50 ms | p95 ms | p99 ms | reads | users | apply+materialize s | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['store']} | {r['read']} | {r['candidates']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                     f"{r['reads']} | {r['users']:,} | {r['apply_materialize_s']} | {r['load_1m']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--reads", type=int, default=300)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    records = measure(args.users, args.items, args.candidates, args.reads)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "online_stores.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {tuple(r[k] for k in KEY) for r in records}
    merged = [r for r in old if tuple(r[k] for k in KEY) not in keys] + records
    path.write_text(json.dumps(merged, indent=2) + "\n")
    (args.results / "online_stores.md").write_text(render(merged))
    for r in records:
        print(f"{r['store']:7s} {r['read']:13s} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")


if __name__ == "__main__":
    main()
