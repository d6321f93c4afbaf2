"""The user's own data: three Parquet files and a small YAML schema.

    my_data/
      interactions.parquet   user_id, item_id, scenario, label, event_timestamp
      users.parquet          user_id + user fields
      items.parquet          item_id + item fields
      schema.yaml

    # schema.yaml
    name: my-shop
    scenarios: [home, search]
    behaviour_max_len: 50
    fields:
      - {name: gender, kind: categorical, entity: user}
      - {name: price, kind: numeric, entity: item, buckets: 10}
      - {name: tags, kind: sequence, entity: item, max_len: 5}
      - {name: text_emb, kind: embedding, entity: item, dim: 32}
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ctrflow.data.spec import FeatureSpec, FieldSpec
from ctrflow.data.tables import Dataset, parse_timestamps, standard_fields


class SchemaError(ValueError):
    pass


def load_user_data(directory: str | Path) -> Dataset:
    directory = Path(directory)
    schema_path = directory / "schema.yaml"
    if not schema_path.exists():
        raise SchemaError(f"{directory}: schema.yaml is missing (see README, 'Your own data')")
    schema = yaml.safe_load(schema_path.read_text()) or {}
    for key in ("scenarios", "fields"):
        if key not in schema:
            raise SchemaError(f"{schema_path}: required key '{key}' is missing")
    fields = []
    for i, raw in enumerate(schema["fields"]):
        try:
            fields.append(FieldSpec(**raw))
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{schema_path}: fields[{i}] ({raw}): {exc}") from exc
    spec = FeatureSpec(
        fields=[*standard_fields(int(schema.get("behaviour_max_len", 50))), *fields],
        scenarios=[str(s) for s in schema["scenarios"]],
    )
    tables = {}
    for name in ("interactions", "users", "items"):
        path = directory / f"{name}.parquet"
        if not path.exists():
            raise SchemaError(f"{directory}: {name}.parquet is missing")
        tables[name] = pd.read_parquet(path)
    inter = tables["interactions"]
    if "event_timestamp" in inter.columns:
        inter["event_timestamp"] = parse_timestamps(inter["event_timestamp"])
    return Dataset(str(schema.get("name", directory.name)), inter, tables["users"], tables["items"], spec)
