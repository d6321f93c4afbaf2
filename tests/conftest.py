"""Shared fixtures: a small seeded synthetic dataset and its point-in-time frame."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FEAST_USAGE", "False")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- test levels: `make test-quick` runs unit + component (not slow) ------------------------------------------
LEVELS = ("unit", "component", "pipeline", "serving")
# the level of each test file; a test marked with a level itself keeps that one (e.g. one pipeline test in a
# component file). A file not listed here is "component": list it (or mark its tests) when you add one.
FILE_LEVELS = {
    "test_backbones.py": "unit",
    "test_baselines.py": "unit",
    "test_benchmarks.py": "unit",
    "test_config.py": "unit",
    "test_data.py": "unit",
    "test_dgenctr.py": "unit",
    "test_dmae.py": "unit",
    "test_embeddings.py": "unit",
    "test_gsvr.py": "unit",
    "test_metrics.py": "unit",
    "test_models.py": "unit",
    "test_trainer.py": "unit",
    "test_cli.py": "component",
    "test_components.py": "component",
    "test_features.py": "component",
    "test_monitoring.py": "component",
    "test_pipeline_families.py": "component",
    "test_pipeline_submit.py": "component",
    "test_registry.py": "component",
    "test_validation.py": "component",
    "test_dvc.py": "pipeline",
    "test_pipeline_local.py": "pipeline",
    "test_serving.py": "serving",
}
DEFAULT_LEVEL = "component"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(level) for level in LEVELS):
            item.add_marker(getattr(pytest.mark, FILE_LEVELS.get(item.path.name, DEFAULT_LEVEL)))


@pytest.fixture(scope="session")
def tiny_dataset():
    from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic

    return generate_synthetic(SyntheticConfig(n_users=200, n_items=150, n_interactions=6_000, max_len=10, seed=7))


@pytest.fixture(scope="session")
def tiny_frame(tiny_dataset):
    from ctrflow.data.frames import point_in_time_frame

    return point_in_time_frame(tiny_dataset)
