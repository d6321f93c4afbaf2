"""Batch sources: the Parquet tables that `ctrflow.features.write_feature_tables` writes.

The folder is named by CTRFLOW_FEATURE_DATA (default: `data/` beside this file; a relative path is taken relative
to this folder). Paths go into the registry as absolute paths, so a store opened later needs only the repo path.
The source class follows `offline_store.type` in feature_store.yaml (Spark needs SparkSource, every other store
reads FileSource), so switching the offline store is a configuration change.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from feast import FileSource
from feast.data_format import ParquetFormat
from feast.data_source import DataSource

REPO_DIR = Path(__file__).resolve().parent
DATA_ENV = "CTRFLOW_FEATURE_DATA"
DATA_DIR = Path(os.path.expandvars(os.environ.get(DATA_ENV, "data"))).expanduser()
if not DATA_DIR.is_absolute():
    DATA_DIR = (REPO_DIR / DATA_DIR).resolve()
TIMESTAMP_FIELD = "event_timestamp"


def _offline_store_type() -> str:
    config = yaml.safe_load(os.path.expandvars((REPO_DIR / "feature_store.yaml").read_text())) or {}
    store = config.get("offline_store") or {}
    return str(store.get("type", "duckdb")) if isinstance(store, dict) else str(store)


def _source(table: str) -> DataSource:
    path = str(DATA_DIR / f"{table}.parquet")
    description = f"{table}.parquet written by ctrflow.features.write_feature_tables"
    if _offline_store_type() == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(
            name=f"{table}_source", path=path, file_format="parquet", timestamp_field=TIMESTAMP_FIELD,
            description=description,
        )
    return FileSource(
        name=f"{table}_source", path=path, file_format=ParquetFormat(), timestamp_field=TIMESTAMP_FIELD,
        description=description,
    )


# Profiles are static: every row is stamped at ctrflow.features.PROFILE_TIMESTAMP (1970-01-01, before any event).
user_profile_source = _source("user_profile")
item_profile_source = _source("item_profile")
# One row per (user, event time t) holding only the user's events strictly before t, plus one closing row per user
# stamped 1 µs after their last event (the state served online).
user_behaviour_source = _source("user_behaviour")
