"""Data: the feature spec, dataset sources, splits and validation."""

from __future__ import annotations

from pathlib import Path

from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import Dataset

SOURCES = ("movielens", "movielens-1m", "movielens-cross", "synthetic", "parquet")


def load_source(source: str, path: str | Path | None = None, max_len: int = 50, **synthetic: object) -> Dataset:
    """Any source, in canonical form: 'movielens' (ML-100K), 'movielens-1m',
    'movielens-cross' (ML-1M and ML-100K users over one title vocabulary, the platform as scenario; the benchmark's
    fields only, not a pipeline `data.source`), 'synthetic' (keyword args go to SyntheticConfig) or 'parquet'."""
    if source == "movielens":
        from ctrflow.data.movielens import load_movielens

        return load_movielens(max_len=max_len)
    if source == "movielens-1m":
        from ctrflow.data.movielens_1m import load_movielens_1m

        return load_movielens_1m(max_len=max_len)
    if source == "movielens-cross":  # benchmark source: the Scenario-Wise Rec fields, no behaviour sequence
        from ctrflow.data.movielens_cross import load_movielens_cross

        return load_movielens_cross()
    if source == "synthetic":
        from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic

        return generate_synthetic(SyntheticConfig(max_len=max_len, **synthetic))
    if source == "parquet":
        from ctrflow.data.user_data import load_user_data

        if path is None:
            raise ValueError("source 'parquet' needs a path to a folder with schema.yaml")
        return load_user_data(path)
    raise ValueError(f"unknown source '{source}': choose one of {SOURCES}")


__all__ = ["Dataset", "Entity", "FeatureSpec", "FieldKind", "FieldSpec", "SOURCES", "load_source"]
