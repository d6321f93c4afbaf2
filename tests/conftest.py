"""Shared fixtures: a small seeded synthetic dataset and its point-in-time frame."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("FEAST_USAGE", "False")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dataset():
    from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic

    return generate_synthetic(SyntheticConfig(n_users=200, n_items=150, n_interactions=6_000, max_len=10, seed=7))


@pytest.fixture(scope="session")
def tiny_frame(tiny_dataset):
    from ctrflow.data.frames import point_in_time_frame

    return point_in_time_frame(tiny_dataset)
