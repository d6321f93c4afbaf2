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

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ctrflow.config import did_you_mean
from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import (
    BEHAVIOUR_COUNT_FIELDS,
    HIST_FIELD,
    INTERACTION_COLUMNS,
    Dataset,
    parse_timestamps,
    standard_fields,
)


class SchemaError(ValueError):
    pass


SCHEMA_KEYS = ("name", "scenarios", "behaviour_max_len", "fields")
FIELD_KEYS = tuple(f.name for f in dataclasses.fields(FieldSpec))
# columns of the interactions and of the training frame: a declared field of that name would collide in the join
RESERVED = frozenset({*INTERACTION_COLUMNS, "split", HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS})


def load_user_data(directory: str | Path) -> Dataset:
    """The three Parquet files and schema.yaml in `directory` as a Dataset.

    schema.yaml is checked as params.yaml is: an unknown key (at the top or in a field) or an unknown kind or entity
    names the nearest valid one; every fault is listed at once (SchemaError). The tables are checked by validation;
    here only lossless conversions happen: timestamps parsed (`tables.parse_timestamps`), integer ids and labels of
    another width widened to int64, integer scenario codes as text (the spec's scenarios are text).
    """
    directory = Path(directory).expanduser()  # `--set data.path=~/shop`: the shell leaves that ~ as it is
    if not directory.is_dir():
        raise SchemaError(
            f"{directory}: no such folder (data.path is the folder holding schema.yaml and the three Parquet files)"
        )
    schema_path = directory / "schema.yaml"
    if not schema_path.exists():
        raise SchemaError(f"{directory}: schema.yaml is missing (see README, 'Your own data')")
    try:
        schema = yaml.safe_load(schema_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SchemaError(f"{schema_path}: not valid YAML: {exc}") from None
    spec = _spec(schema, schema_path)
    tables = {}
    for name in ("interactions", "users", "items"):
        path = directory / f"{name}.parquet"
        if not path.exists():
            raise SchemaError(f"{directory}: {name}.parquet is missing")
        tables[name] = pd.read_parquet(path)
    inter = tables["interactions"]
    if "event_timestamp" in inter.columns:
        inter["event_timestamp"] = parse_timestamps(inter["event_timestamp"])
    for frame, columns in ((inter, (spec.user_key, spec.item_key, spec.label)), (tables["users"], (spec.user_key,)), (tables["items"], (spec.item_key,))):
        for c in columns:
            if c in frame.columns:
                frame[c] = _as_int64(frame[c])
    if spec.scenario_field in inter.columns and _is_integer(inter[spec.scenario_field]):
        inter[spec.scenario_field] = inter[spec.scenario_field].astype(str)  # `scenarios: [1, 2]` are '1', '2'
    return Dataset(str(schema.get("name", directory.name)), inter, tables["users"], tables["items"], spec)


def _spec(schema: object, path: Path) -> FeatureSpec:
    """schema.yaml as a FeatureSpec; every fault at once, an unknown name with the nearest valid one."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: the top level must be a mapping (name, scenarios, fields), got {type(schema).__name__}")
    problems = [f"unknown key '{k}'{did_you_mean(str(k), SCHEMA_KEYS)}" for k in schema if k not in SCHEMA_KEYS]
    problems += [f"required key '{k}' is missing" for k in ("scenarios", "fields") if k not in schema]
    scenarios = schema.get("scenarios")
    if "scenarios" in schema and (not isinstance(scenarios, list) or not scenarios):
        problems.append(f"scenarios: a non-empty list of scenario names, got {scenarios!r}")
    raw_fields = schema.get("fields")
    if "fields" in schema and not isinstance(raw_fields, list):
        problems.append(f"fields: a list of fields, got {raw_fields!r}")
        raw_fields = []
    fields = []
    for i, raw in enumerate(raw_fields or []):
        where = f"fields[{i}]" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
        if not isinstance(raw, dict):
            problems.append(f"{where}: a mapping with name, kind and entity, got {raw!r}")
            continue
        bad = [f"unknown key '{k}'{did_you_mean(str(k), FIELD_KEYS)}" for k in raw if k not in FIELD_KEYS]
        bad += [f"required key '{k}' is missing" for k in ("name", "kind", "entity") if k not in raw]
        for key, enum in (("kind", FieldKind), ("entity", Entity)):
            valid = [e.value for e in enum]
            if key in raw and raw[key] not in valid:
                bad.append(f"{key} '{raw[key]}' is not one of {valid}{did_you_mean(str(raw[key]), valid)}")
        if str(raw.get("name", "")) in RESERVED or str(raw.get("column", "")) in RESERVED:
            bad.append(f"'{raw.get('column') or raw['name']}' is a column ctrflow makes itself; name the field otherwise")
        if not bad:
            try:
                fields.append(FieldSpec(**raw))
            except (TypeError, ValueError) as exc:
                bad.append(str(exc))
        problems += [f"{where}: {b}" for b in bad]
    max_len = schema.get("behaviour_max_len", 50)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        problems.append(f"behaviour_max_len: a whole number >= 1, got {max_len!r}")
    if not problems:
        try:
            return FeatureSpec(fields=[*standard_fields(max_len), *fields], scenarios=[str(s) for s in scenarios])
        except ValueError as exc:
            problems.append(str(exc))
    raise SchemaError(f"{path}: " + problems[0] if len(problems) == 1 else f"{path}:\n  " + "\n  ".join(problems))


def _is_integer(col: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _as_int64(col: pd.Series) -> pd.Series:
    """int8..int32, uint8..uint64 and nullable ints (or a bool label) as int64 when no value changes; else as is.

    A uint64 beyond int64, or a nullable column holding nulls, stays as it is: validation's dtype and not-null rules
    name it with its rows.
    """
    if str(col.dtype) == "int64" or not (_is_integer(col) or pd.api.types.is_bool_dtype(col)):
        return col
    if col.isna().any():
        return col
    values = col.to_numpy()
    if values.dtype.kind == "u" and len(values) and values.max() > np.iinfo(np.int64).max:
        return col
    return pd.Series(values.astype(np.int64), index=col.index, name=col.name)
