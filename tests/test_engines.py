"""The production engines, run for real on this machine: Feast's Spark offline store (pyspark local mode), the SQL
registry on PostgreSQL, and the whole production profile (`ctrflow --profile production`) with Redis online.

Redis is also covered by every online test (tests/test_features.py, tests/test_serving.py: one parameter over the
online stores). Each test gets its own PostgreSQL database and Redis server (tests/services.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import yaml

from ctrflow import features as F
from ctrflow.local_services import postgres_database, use_production_stores

REPO_ROOT = Path(__file__).resolve().parents[1]
SPARK_MASTER = "local[2]"


def _same(a: object, b: object) -> bool:
    a_missing = a is None or (np.isscalar(a) and pd.isna(a))
    b_missing = b is None or (np.isscalar(b) and pd.isna(b))
    if a_missing or b_missing:
        return a_missing and b_missing
    if isinstance(a, list | np.ndarray) or isinstance(b, list | np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns, dtypes, index and every cell (lists and vectors by value, missing == missing)."""
    assert list(got.columns) == list(want.columns)
    assert got.dtypes.astype(str).to_dict() == want.dtypes.astype(str).to_dict()
    assert got.index.equals(want.index)
    for c in want.columns:
        bad = [i for i, (x, y) in enumerate(zip(got[c], want[c])) if not _same(x, y)]
        assert not bad, f"column {c}: {len(bad)} of {len(want)} rows differ, first row {bad[0]}: {got[c].iloc[bad[0]]!r} != {want[c].iloc[bad[0]]!r}"


# ---- Spark offline store -------------------------------------------------------------------------------------
def _spark_jobs() -> set[int]:
    """Ids of the jobs the active Spark session has run (none before Feast starts one)."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    return set(session.sparkContext.statusTracker().getJobIdsForGroup()) if session else set()


@pytest.mark.spark
def test_spark_training_set_equals_duckdb_on_movielens_100k(tmp_path, monkeypatch):
    """The point-in-time training set of ML-100K through the Spark offline store (SparkSource, local[2]: the profile
    views by Feast's Spark join, the behaviour view by ctrflow's running-window join in the same Spark session), at
    once and a user range of 40k rows at a time, equals the DuckDB one row for row, and both equal the pandas join (ctrflow.data.frames.point_in_time_frame) on
    the service's columns."""
    from ctrflow.data import load_source
    from ctrflow.data.frames import point_in_time_frame

    monkeypatch.setenv("CTRFLOW_SPARK_MASTER", SPARK_MASTER)
    dataset = load_source("movielens")
    F.write_feature_tables(dataset, tmp_path / "data")
    frames = {}
    for engine in ("duckdb", "spark"):
        repo = F.copy_repo(tmp_path / f"repo-{engine}")
        if engine == "spark":
            use_production_stores(repo, "offline_store")
        store = F.apply_repo(repo, tmp_path / "data")
        assert type(store._get_provider().offline_store).__name__.lower().startswith(engine)
        if engine == "spark":
            from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

            assert isinstance(store.get_feature_view("user_behaviour").batch_source, SparkSource)
        jobs_before = _spark_jobs()
        frames[engine] = F.historical_frame(store, dataset.interactions)
        if engine == "spark":  # the join ran as Spark jobs, not through another engine
            assert _spark_jobs() - jobs_before
            # a user range at a time (the features step's chunks): each chunk's Spark join reads its users only
            frames["spark-chunked"] = F.historical_frame(store, dataset.interactions, chunk_rows=40_000)
    assert len(frames["spark"]) == len(dataset.interactions) == 100_000
    _assert_frames_equal(frames["spark"], frames["duckdb"])
    _assert_frames_equal(frames["spark-chunked"], frames["duckdb"])
    pandas_join = point_in_time_frame(dataset)  # it also holds columns no feature service serves (title)
    _assert_frames_equal(frames["duckdb"], pandas_join[list(frames["duckdb"].columns)])


# ---- the SQL registry on PostgreSQL and the whole production profile -----------------------------------------
def _production_env(registry_url: str, redis: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CTRFLOW_REGISTRY_URL": registry_url, "CTRFLOW_REDIS": redis, "CTRFLOW_SPARK_MASTER": "local[1]",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)})
    return env


@pytest.mark.spark
def test_two_concurrent_production_features_runs_leave_the_registry_whole(tmp_path, tiny_dataset, tiny_frame, redis_url, monkeypatch):
    """Two `ctrflow --profile production features` at once (Spark offline, Redis online, one PostgreSQL registry):
    both succeed, the registry holds one whole apply (every source from one run's tables), and the store built from
    it serves online what the training set holds offline."""
    tiny_dataset.save(tmp_path / "dataset")
    with postgres_database() as registry_url:
        env = _production_env(registry_url, redis_url)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ctrflow.cli", "--profile", "production", "features", "--dataset",
                 str(tmp_path / "dataset"), "--repo", str(tmp_path / f"repo{k}"), "--out", str(tmp_path / f"set{k}")],
                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for k in range(2)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]

        for k in range(2):
            config = yaml.safe_load((tmp_path / f"repo{k}" / "feature_store.yaml").read_text())
            assert (config["registry"]["registry_type"], config["offline_store"]["type"], config["online_store"]["type"]) == ("sql", "spark", "redis")
            assert "${CTRFLOW_REGISTRY_URL}" in (tmp_path / f"repo{k}" / "feature_store.yaml").read_text()  # never the URL
            frame = pd.read_parquet(tmp_path / f"set{k}" / "frame.parquet")
            assert set(frame.pop("split")) == {"train", "valid", "test"}
            _assert_frames_equal(frame, tiny_frame)  # the Spark join equals the pandas one

        for var, value in (("CTRFLOW_REGISTRY_URL", registry_url), ("CTRFLOW_REDIS", redis_url), ("CTRFLOW_SPARK_MASTER", "local[1]")):
            monkeypatch.setenv(var, value)
        from feast import FeatureStore

        store = FeatureStore(repo_path=str(tmp_path / "repo0"))  # the registry both runs applied to
        assert sorted(v.name for v in store.list_feature_views()) == sorted(F.VIEWS)
        assert sorted(s.name for s in store.list_feature_services()) == sorted(F.SERVICES)
        assert sorted(e.name for e in store.list_entities()) == ["item", "user"]
        sources = {s.name: Path(s.path).parent for s in store.list_data_sources()}
        assert sorted(sources) == sorted(f"{t}_source" for t in F.TABLES)
        assert len(set(sources.values())) == 1 and next(iter(sources.values())) in {tmp_path / "repo0" / "data", tmp_path / "repo1" / "data"}

        # served online through the PostgreSQL registry and Redis: the state after each user's last event
        end = tiny_dataset.interactions.event_timestamp.max() + pd.Timedelta(days=1)
        users = [int(u) for u in tiny_dataset.interactions.user_id.value_counts().index[:3]]
        items = [1, 2, 3, 42]
        for user in users:
            online = F.online_frame(store, user, items, "home")
            entity = pd.DataFrame({"user_id": np.int64(user), "item_id": np.asarray(items, dtype=np.int64),
                                   "event_timestamp": pd.Series([end] * len(items)).astype("datetime64[us, UTC]")})
            offline = F.historical_frame(store, entity)
            features = [c for c in offline.columns if c not in ("event_timestamp",)]
            _assert_frames_equal(online[features], offline[features])


def test_production_profile_names_unset_variables_and_keeps_hosts_out_of_files(tmp_path, monkeypatch):
    """features.profile picks the store file; an unset host variable is named before Feast starts; no file of the
    profile holds a host or a password."""
    from ctrflow.config import load_params

    assert load_params(REPO_ROOT / "params.yaml")["features"]["profile"] == "local"
    assert load_params(REPO_ROOT / "params.yaml", profile="production")["features"]["profile"] == "production"
    with pytest.raises(FileNotFoundError, match="params.nowhere.yaml"):
        load_params(REPO_ROOT / "params.yaml", profile="nowhere")
    repo = F.copy_repo(tmp_path / "repo", profile="production")
    assert not list(repo.glob("feature_store.*.yaml"))  # only the chosen profile's file, as feature_store.yaml
    text = (repo / "feature_store.yaml").read_text()
    config = yaml.safe_load(text)
    assert (config["registry"]["path"], config["online_store"]["connection_string"]) == ("${CTRFLOW_REGISTRY_URL}", "${CTRFLOW_REDIS}")
    assert config["offline_store"]["spark_conf"]["spark.master"] == "${CTRFLOW_SPARK_MASTER}"
    for var in ("CTRFLOW_REGISTRY_URL", "CTRFLOW_REDIS", "CTRFLOW_SPARK_MASTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CTRFLOW_REDIS", "127.0.0.1:1")
    with pytest.raises(OSError, match=r"\['CTRFLOW_REGISTRY_URL', 'CTRFLOW_SPARK_MASTER'\] are not set"):
        F.check_store_env(repo)
    with pytest.raises(ValueError, match="features.profile 'staging'"):
        F.copy_repo(tmp_path / "other", profile="staging")
    local = yaml.safe_load((F.copy_repo(tmp_path / "local") / "feature_store.yaml").read_text())
    assert (local["offline_store"]["type"], local["online_store"]["type"], local["registry"]) == ("duckdb", "sqlite", "data/registry.db")

    # the CLI switch: --profile (or $CTRFLOW_PROFILE) overlays params.production.yaml; an unknown one exits 2
    from click.testing import CliRunner

    from ctrflow.cli import cli

    monkeypatch.chdir(REPO_ROOT)
    seen = {}

    @cli.command("_show_profile", hidden=True)
    @click.pass_context
    def show(ctx):
        seen["profile"] = ctx.obj["params"]["features"]["profile"]

    try:
        assert CliRunner().invoke(cli, ["--profile", "production", "_show_profile"]).exit_code == 0
        assert seen["profile"] == "production"
        assert CliRunner().invoke(cli, ["_show_profile"], env={"CTRFLOW_PROFILE": "production"}).exit_code == 0
        assert seen["profile"] == "production"
        assert CliRunner().invoke(cli, ["_show_profile"], env={"CTRFLOW_PROFILE": None}).exit_code == 0
        assert seen["profile"] == "local"
        bad = CliRunner().invoke(cli, ["--profile", "nowhere", "_show_profile"])
        assert bad.exit_code == 2 and "params.nowhere.yaml" in bad.output
    finally:
        cli.commands.pop("_show_profile", None)


# ---- the whole product on the production engines -------------------------------------------------------------
@pytest.mark.slow  # the whole pipeline with Spark in its features step, then `bentoml serve`: minutes on 2 cores
@pytest.mark.spark
@pytest.mark.serving
def test_production_profile_run_all_registers_and_serves_through_the_production_stores(tmp_path, redis_url):
    """`ctrflow --profile production run-all` on a tiny synthetic set, one epoch: the KFP pipeline applies the
    Feast repository to the SQL registry on PostgreSQL, builds the training set on Spark, materialises into Redis,
    trains, registers, passes the gate and deploys; the service answers from Redis; the drift report follows. The
    stores are then read back on their own: the registry tables in PostgreSQL, the keys in Redis, and the features
    the service logged for a user are what Feast reads online from Redis for that user."""
    import psycopg
    import redis

    from ctrflow.local_services import free_port
    from ctrflow.request_log import read_request_log

    workdir = tmp_path / "run"
    with postgres_database() as registry_url:
        env = {**_production_env(registry_url, redis_url), "BENTOML_HOME": str(tmp_path / "bentoml")}
        tiny = {"data.source": "synthetic", "data.synthetic.n_users": 200, "data.synthetic.n_items": 150,
                "data.synthetic.n_interactions": 5000, "data.max_len": 8, "validation.min_rows": 100, "train.epochs": 1,
                "train.threads": 1, "train.progress": "false", "train.batch_size": 512, "train.embedding_dim": 4,
                "models.dcnv2.cross_layers": 1, "models.dcnv2.mlp": "[16]", "gate.min_valid_auc": 0.0,
                "gate.min_lift_over_reference": -1.0, "serving.port": free_port(), "serving.workers": 1,
                "monitoring.workspace": "null"}  # fmt: skip  (gate floor 0: one epoch on 5000 rows sits near AUC 0.5; the stores are under test here)
        sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
        proc = subprocess.run(
            [sys.executable, "-m", "ctrflow.cli", "--profile", "production", *sets, "run-all", "--workdir", str(workdir), "--requests", "20"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "service that answered" in proc.stdout and "drift verdict" in proc.stdout

        run = json.loads((workdir / "run.json").read_text())
        assert run["gate_passed"] is True and json.loads((workdir / "deployment.json").read_text())["model_tag"] == run["model_tag"]
        repo = Path(run["feature_repo"])
        config = yaml.safe_load((repo / "feature_store.yaml").read_text())
        assert (config["registry"]["registry_type"], config["offline_store"]["type"], config["online_store"]["type"]) == ("sql", "spark", "redis")
        assert not (repo / "data" / "registry.db").exists() and not (repo / "data" / "online_store.db").exists()

        # registered in the BentoML store and promoted to production
        models = subprocess.run([sys.executable, "-m", "ctrflow.cli", "models", "list", "--json"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert models.returncode == 0, models.stderr[-2000:]
        assert {m["tag"]: m["stage"] for m in json.loads(models.stdout)}[run["model_tag"]] == "production"

        # the Feast registry lives in PostgreSQL, the online features in Redis
        with psycopg.connect(registry_url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
            views = {r[0] for r in conn.execute("SELECT feature_view_name FROM feature_views WHERE project_id = 'ctrflow'")}
        assert views == set(F.VIEWS)
        host, port = redis_url.split(":")
        assert redis.Redis(host=host, port=int(port)).dbsize() > 0

        # what the service scored a known user with is what Feast reads online from Redis for that user
        log = read_request_log(workdir / "request_log")
        assert log["request_id"].nunique() == 20
        first = log[log["request_id"] == log["request_id"].iloc[0]]
        user, scenario, items = int(first["user_id"].iloc[0]), str(first["scenario"].iloc[0]), [int(i) for i in first["item_id"]]
        with pytest.MonkeyPatch.context() as mp:
            for var in ("CTRFLOW_REGISTRY_URL", "CTRFLOW_REDIS", "CTRFLOW_SPARK_MASTER"):
                mp.setenv(var, env[var])
            from feast import FeatureStore

            online = F.online_frame(FeatureStore(repo_path=str(repo)), user, items, scenario)
        shared = [c for c in online.columns if c in first.columns and c not in ("user_id", "item_id", "scenario", "event_timestamp")]
        assert len(shared) >= 3, (list(online.columns), list(first.columns))
        for c in shared:  # by value: the log keeps counts as float64 (its schema allows missing ones)
            got, want = first[c].tolist(), online[c].tolist()
            assert all(_same(x, y) for x, y in zip(got, want, strict=True)), (c, got[:3], want[:3])
