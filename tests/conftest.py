"""Shared fixtures: a small seeded synthetic dataset and its point-in-time frame."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FEAST_USAGE", "False")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # a pytest-xdist worker's __main__ (execnet's) has neither __spec__ nor __file__: pyspark, imported by Great
    # Expectations, takes that for a doctest run and calls sys.exit(0) on import (pyspark.sql.connect.utils)
    import __main__

    if getattr(__main__, "__spec__", None) is None and not hasattr(__main__, "__file__"):
        __main__.__file__ = "pytest-xdist-worker"


# ---- test levels: `make test-quick` runs unit + component (not slow) ------------------------------------------
LEVELS = ("unit", "component", "pipeline", "serving")
# the level of each test file; a test marked with a level itself keeps that one (e.g. one pipeline test in a
# component file). A file not listed here is "component": list it (or mark its tests) when you add one.
FILE_LEVELS = {
    "test_backbones.py": "unit",
    "test_baselines.py": "unit",
    "test_benchmarks.py": "unit",
    "test_scenario_wise_rec.py": "unit",
    "test_sparse_scenarios.py": "unit",
    "test_config.py": "unit",
    "test_engines.py": "component",
    "test_data.py": "unit",
    "test_dgenctr.py": "unit",
    "test_dmae.py": "unit",
    "test_fast_paths.py": "unit",
    "test_embeddings.py": "unit",
    "test_gsvr.py": "unit",
    "test_guard.py": "unit",
    "test_metrics.py": "unit",
    "test_models.py": "unit",
    "test_trainer.py": "unit",
    "test_cli.py": "component",
    "test_components.py": "component",
    "test_distributed.py": "component",
    "test_pytorchjob.py": "component",
    "test_features.py": "component",
    "test_monitoring.py": "component",
    "test_online.py": "component",
    "test_drift_verdicts.py": "component",
    "test_online_quality.py": "component",
    "test_monitor_loop.py": "component",
    "test_pipeline_families.py": "component",
    "test_pipeline_submit.py": "component",
    "test_recipe.py": "component",  # real `ctrflow` processes killed and resumed
    "test_registry.py": "component",
    "test_registry_faults.py": "component",  # its tests are also marked slow
    "test_request_log.py": "component",  # a real writer process killed
    "test_request_log_ranked.py": "component",  # the serving worker's record; a real writer process killed
    "test_scale.py": "component",
    "test_validation.py": "component",
    "test_lifecycle.py": "serving",  # marked so in the file too
    "test_dvc.py": "pipeline",
    "test_pipeline_local.py": "pipeline",
    "test_serving.py": "serving",
    "test_guarded_serving.py": "serving",
    "test_shadow.py": "component",
}
DEFAULT_LEVEL = "component"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(level) for level in LEVELS):
            item.add_marker(getattr(pytest.mark, FILE_LEVELS.get(item.path.name, DEFAULT_LEVEL)))


# ---- real services on free localhost ports (tests/services.py) --------------------------------------------------
@pytest.fixture(scope="session")
def redis_url():
    """A redis-server of this session on a free port; $CTRFLOW_REDIS (what the production profile reads) names it."""
    from ctrflow.local_services import redis_server

    with redis_server() as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRFLOW_REDIS", url)
        yield url


@pytest.fixture(scope="session")
def pg_registry():
    """A PostgreSQL database of this session (dropped at the end); $CTRFLOW_REGISTRY_URL (what the production
    profile's SQL registry reads) names it. One repo per session may use it (one Feast project per database)."""
    from ctrflow.local_services import postgres_database

    with postgres_database() as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRFLOW_REGISTRY_URL", url)
        yield url


@pytest.fixture(scope="session")
def online_repo(request):
    """online_repo(repo, store): point a repo copy's online store at `store` ("sqlite": as copied; "redis": the
    production profile's block, on this session's redis-server)."""
    from ctrflow.local_services import use_production_stores

    def configure(repo, store: str):
        if store == "redis":
            request.getfixturevalue("redis_url")  # started on first use only
            use_production_stores(repo, "online_store")
        elif store != "sqlite":
            raise ValueError(f"online store '{store}': one of sqlite, redis")
        return repo

    return configure


@pytest.fixture(scope="session")
def tiny_dataset():
    from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic

    return generate_synthetic(SyntheticConfig(n_users=200, n_items=150, n_interactions=6_000, max_len=10, seed=7))


@pytest.fixture(scope="session")
def tiny_frame(tiny_dataset):
    from ctrflow.data.frames import point_in_time_frame

    return point_in_time_frame(tiny_dataset)


@pytest.fixture(scope="session")
def tiny_training_set(tmp_path_factory, tiny_dataset, tiny_frame):
    """A training set folder as the features step writes it (frame.parquet with its split + spec.json), from the
    pandas point-in-time join, which equals Feast's (tests/test_features.py)."""
    from ctrflow.data.splits import make_split
    from ctrflow.steps import SPEC_FILE, TRAINING_FRAME

    out = tmp_path_factory.mktemp("training_set") / "training_set"
    out.mkdir()
    frame = tiny_frame.copy()
    frame["split"] = make_split(frame, "temporal").to_numpy()
    frame.to_parquet(out / TRAINING_FRAME, index=False)
    tiny_dataset.spec.save(out / SPEC_FILE)
    return out
