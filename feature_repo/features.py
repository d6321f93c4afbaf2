"""Feature views, generated from the dataset's FeatureSpec (spec.json in the feature-data folder).

The fields differ between ML-100K, synthetic and user data, so nothing here names a dataset field: the spec says
which fields are user or item fields and `ctrflow.features.view_schema` gives each its Feast type
(categorical: String or Int64, numeric: Float64 or Int64, sequence: Array(String|Int64), embedding: Array(Float32)).
TTL is zero (never expires) for every view: profiles are static and stamped before every interaction, and a user's
behaviour row stays valid until the user's next event replaces it.
"""

from __future__ import annotations

from datetime import timedelta

from data_sources import DATA_DIR, item_profile_source, user_behaviour_source, user_profile_source
from entities import item, user
from feast import FeatureView, Field
from feast.data_source import DataSource
from feast.types import Array, Float32, Float64, Int64, String

from ctrflow.features import load_feature_spec, view_schema

FEAST_TYPES = {
    "String": String,
    "Int64": Int64,
    "Float64": Float64,
    "Array(String)": Array(String),
    "Array(Int64)": Array(Int64),
    "Array(Float32)": Array(Float32),
    "Array(Float64)": Array(Float64),
}

SPEC = load_feature_spec(DATA_DIR)
SCHEMA = view_schema(SPEC)
NO_TTL = timedelta(0)


def _view(name: str, entity, key: str, source: DataSource, description: str) -> FeatureView | None:
    """A view over `source` with the spec's fields of `name`; None when the dataset has no such field."""
    if not SCHEMA[name]:
        return None
    return FeatureView(
        name=name,
        entities=[entity],
        ttl=NO_TTL,
        schema=[Field(name=key, dtype=Int64), *(Field(name=c, dtype=FEAST_TYPES[t]) for c, t in SCHEMA[name])],
        source=source,
        online=True,
        description=description,
        tags={"dataset": str(SPEC.extra.get("dataset", "")), "generated_from": "spec.json"},
    )


user_profile = _view("user_profile", user, SPEC.user_key, user_profile_source, "Static user attributes.")
item_profile = _view(
    "item_profile", item, SPEC.item_key, item_profile_source, "Static item attributes (categorical, numeric, sequences, embeddings)."
)
user_behaviour = _view(
    "user_behaviour",
    user,
    SPEC.user_key,
    user_behaviour_source,
    "The user's last max_len positive items and event counts strictly before each row's timestamp.",
)
