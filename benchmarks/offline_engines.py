"""The training-set join on Feast's offline engines: Spark (the production profile's store, pyspark local mode)
against DuckDB (the embedded default), wall time and peak memory, on synthetic interactions.

    nice python -m benchmarks.offline_engines                          # 1M rows, both engines
    nice python -m benchmarks.offline_engines --rows 1000000 10000000 --spark-master 'local[2]'

Per row count the synthetic dataset (ctrflow.data.synthetic; users scale with rows, ~10 events per user on
average, lognormal activity) and its feature tables are written once; then each engine runs in a fresh
subprocess: copy the Feast repo (the production profile's `offline_store` block for Spark), `apply`, and
`write_historical_frame` over every interaction, as the features step runs it (user ranges of `features.chunk_rows`
rows, DuckDB capped at `features.duckdb_memory_mb`; `--behaviour-join`). Peak memory is the peak of the
summed RSS of that subprocess and its children (the Spark JVM included), sampled every 0.2 s. Each engine's training
set is compared with DuckDB's, Parquet batch by batch (schema, rows and every cell in order).

Writes benchmarks/results/offline_engines.{json,md}; records merge by (engine, rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = ("engine", "rows", "behaviour_join")
USERS_PER_ROW = 0.1  # ~10 events per user
ITEMS_PER_ROW = 0.02
SPARK_DRIVER_MEMORY = "6g"  # local mode: the driver is the only executor


def parquet_equal(a: Path, b: Path, batch_rows: int = 200_000) -> bool:
    """Whether two Parquet files hold the same table: schema, row count and every cell in order (lists by value,
    nulls alike), compared `batch_rows` rows at a time so memory stays near two batches."""
    import pyarrow.parquet as pq

    fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
    if fa.metadata.num_rows != fb.metadata.num_rows or not fa.schema_arrow.equals(fb.schema_arrow):
        return False
    for xa, xb in zip(fa.iter_batches(batch_rows), fb.iter_batches(batch_rows), strict=True):
        if not xa.equals(xb):
            return False
    return True


def child(engine: str, data_dir: Path, work: Path, spark_master: str, behaviour_join: str) -> dict[str, Any]:
    """One engine in this process: apply + the features step's point-in-time join over every interaction, written
    as the step writes it (`write_historical_frame`, `features.chunk_rows` rows at a time, DuckDB capped at
    `features.duckdb_memory_mb`) to work/<engine>.parquet; times and rows."""
    import pandas as pd
    import yaml

    from ctrflow import features as F
    from ctrflow.config import section
    from ctrflow.local_services import use_production_stores

    defaults = section(None, "features")
    repo = F.copy_repo(work / f"repo-{engine}")
    if engine == "spark":
        os.environ["CTRFLOW_SPARK_MASTER"] = spark_master
        path = use_production_stores(repo, "offline_store")
        config = yaml.safe_load(path.read_text())
        config["offline_store"]["spark_conf"]["spark.driver.memory"] = SPARK_DRIVER_MEMORY
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    entity = pd.read_parquet(data_dir / "entity.parquet")
    with F.duckdb_memory_limit(defaults.duckdb_memory_mb):
        started = time.perf_counter()
        store = F.apply_repo(repo, data_dir)
        apply_s = time.perf_counter() - started
        started = time.perf_counter()
        rows = F.write_historical_frame(store, entity, work / f"{engine}.parquet", behaviour_join=behaviour_join,
                                        chunk_rows=defaults.chunk_rows)
        join_s = time.perf_counter() - started
    return {"apply_s": round(apply_s, 2), "join_s": round(join_s, 2), "out_rows": rows, "chunk_rows": defaults.chunk_rows}


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_engine(
    engine: str, data_dir: Path, work: Path, spark_master: str, timeout_s: float, behaviour_join: str
) -> dict[str, Any]:
    """The engine in a fresh subprocess; its result plus wall time and peak tree RSS (MB)."""
    out = work / f"{engine}.json"
    cmd = [sys.executable, "-m", "benchmarks.offline_engines", "--child", engine, "--data", str(data_dir),
           "--work", str(work), "--spark-master", spark_master, "--out", str(out), "--behaviour-join", behaviour_join]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{engine}.log", "w"))
    peak = 0
    loads = []
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        loads.append(os.getloadavg()[0])
        if time.perf_counter() - started > timeout_s:
            proc.kill()
            proc.wait()
            return {"status": f"timeout after {timeout_s:.0f} s", "peak_rss_mb": round(peak / 2**20)}
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (work / f"{engine}.log").read_text()[-1500:]
        return {"status": f"failed (exit {proc.returncode}): {tail}", "peak_rss_mb": round(peak / 2**20)}
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""  # 1-minute load average seen during the run
    return {"status": "ok", **json.loads(out.read_text()), "wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20),
            "load_1m": load}


def prepare(rows: int, work: Path) -> tuple[Path, dict[str, Any]]:
    """Synthetic dataset of `rows` interactions -> feature tables + the entity rows, in work/data."""
    from ctrflow import features as F
    from ctrflow.config import section
    from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic

    cfg = SyntheticConfig(n_users=max(100, int(rows * USERS_PER_ROW)), n_items=max(50, int(rows * ITEMS_PER_ROW)),
                          n_interactions=rows, seed=0)
    dataset = generate_synthetic(cfg)
    data_dir = work / "data"
    F.write_feature_tables(dataset, data_dir, chunk_rows=section(None, "features").chunk_rows)
    dataset.interactions.to_parquet(data_dir / "entity.parquet", index=False)
    return data_dir, {"users": cfg.n_users, "items": cfg.n_items, "max_len": cfg.max_len}


def merge(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {tuple(r.get(k) for k in KEY) for r in records}
    merged = [r for r in old if tuple(r.get(k) for k in KEY) not in keys] + records
    return sorted(merged, key=lambda r: (r["rows"], r.get("behaviour_join", ""), r["engine"]))


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Offline engines: the training-set join on Spark vs DuckDB",
        "",
        "`python -m benchmarks.offline_engines` (see its docstring). Each engine in a fresh subprocess: Feast `apply`,",
        "then `write_historical_frame` over every interaction (the features step's chunked point-in-time join; `--behaviour-join`). Peak RSS: the",
        "process tree (the Spark JVM included). Synthetic interactions, ~10 events per user. Same machine, same run.",
        "",
        "The machine is shared: `load 1m` is the 1-minute load average seen during the run (2 cores; above 2 the",
        "engines got a fraction of them, so compare rows of one run only).",
        "",
        "`behaviour join`: asof = the linear join of the behaviour view (DuckDB ASOF JOIN / Spark running window,",
        "the default); feast = Feast's own point-in-time join of every view (cost ~ sum over users of events^2).",
        "",
        "| rows | engine | behaviour join | status | apply s | join s | wall s | peak RSS MB | output equal to DuckDB | load 1m | machine |",
        "|---:|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['rows']:,} | {r['engine']} | {r.get('behaviour_join', '')} | {r.get('status', '')[:60]} | {r.get('apply_s', '')} | {r.get('join_s', '')} | "
            f"{r.get('wall_s', '')} | {r.get('peak_rss_mb', '')} | {r.get('equal_to_duckdb', '')} | {r.get('load_1m', '')} | "
            f"{r.get('machine', '')} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--engines", nargs="+", default=["duckdb", "spark"], choices=["duckdb", "spark"])
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--behaviour-join", default="asof", choices=["asof", "feast"],
                        help="asof: the linear behaviour join (DuckDB ASOF / Spark running window); feast: Feast's own")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine run")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["duckdb", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(child(args.child, args.data, args.work, args.spark_master, args.behaviour_join)))
        return

    import platform

    import psutil

    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    records = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="ctrflow-offline-") as tmp:
            work = Path(tmp)
            started = time.perf_counter()
            data_dir, shape = prepare(rows, work)
            print(f"{rows:,} rows: feature tables in {time.perf_counter() - started:.0f} s ({shape})", flush=True)
            got = {}
            for engine in args.engines:
                got[engine] = run_engine(engine, data_dir, work, args.spark_master, args.timeout, args.behaviour_join)
                print(f"  {engine}: {json.dumps(got[engine])}", flush=True)
            for engine, r in got.items():
                r.setdefault("status", "ok")
                if engine != "duckdb" and r["status"] == "ok" and got.get("duckdb", {}).get("status") == "ok":
                    r["equal_to_duckdb"] = parquet_equal(work / f"{engine}.parquet", work / "duckdb.parquet")
                elif engine == "duckdb" and r["status"] == "ok":
                    r["equal_to_duckdb"] = "reference"
                records.append({"engine": engine, "rows": rows, "behaviour_join": args.behaviour_join, **shape, "machine": machine,
                                "spark_master": args.spark_master if engine == "spark" else None, **r})
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "offline_engines.json"
    merged = merge(records, path)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    (args.results / "offline_engines.md").write_text(render(merged))
    print(f"wrote {path} and offline_engines.md")


if __name__ == "__main__":
    main()
