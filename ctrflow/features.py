"""The Feast feature store: write the feature tables, apply the repo, join offline, materialize, read online.

The repository (`feature_repo/`) is static Python that builds its feature views from the dataset's FeatureSpec
(`spec.json` written here), so the same repo serves ML-100K, synthetic and user data. Every run works on its own
copy of the repo (`copy_repo`), so tests and pipeline runs never clobber each other's registry or online store.

Time semantics (no leakage):
- user/item profiles are static: every row is stamped PROFILE_TIMESTAMP (1970-01-01 UTC), before every interaction,
  so a point-in-time join at any event time sees them;
- user_behaviour has one row per (user, event time t) holding only events strictly before t
  (`ctrflow.data.tables.behaviour_table`), so a join at t never sees the event itself or any event at the same
  instant; plus one closing row per user stamped 1 µs after the user's last event (all their events), which is what
  materialization puts online for serving.

Training sets at scale (`historical_frame`): the profile views go through Feast's `get_historical_features` (one
row per key: a linear join); the behaviour view, whose rows are already "the state as of each event", is joined
with one ASOF JOIN in DuckDB over the view's own Parquet source (`_behaviour_asof`; on the Spark offline store of the
production profile, the same join as a running window in Spark: `_behaviour_asof_spark`), the same rule Feast applies
(latest row stamped <= the entity row's time) at a cost that grows with rows. Feast's own join of that view pairs
every entity row with all of its user's earlier behaviour rows before keeping the latest (cost ~ sum over users of
events^2: 20+ GB on MovieLens-1M); `behaviour_join="feast"` still runs it, as the reference the tests compare with.
Feast stays the system of record: the views, services, online store and materialization are unchanged.

Bounded memory (the features step on 10M rows): the behaviour table is built and written a range of users at a time
(`behaviour_batches`, one ParquetWriter, fixed schema, row groups that cover user ranges); the training set is joined
a user-id range of about `features.chunk_rows` entity rows at a time (`historical_chunks`: each chunk's ASOF join reads
only its users' row groups, each chunk's profile join is one `get_historical_features` call), and written with one
schema fixed up front (`frame_schema`), the chunks merged back into the entity rows' order (`write_historical_frame`).
DuckDB (Feast's offline store, materialization included, and the ASOF joins) runs under `duckdb_memory_limit`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.tables import (
    BEHAVIOUR_COUNT_FIELDS,
    HIST_FIELD,
    TS_DTYPE,
    Dataset,
    behaviour_arrow,
    behaviour_batches,
)

if TYPE_CHECKING:  # feast takes seconds to import: only the functions that need it import it
    from feast import FeatureService, FeatureStore

log = logging.getLogger(__name__)

PROFILE_TIMESTAMP = pd.Timestamp("1970-01-01", tz="UTC")
DATA_ENV = "CTRFLOW_FEATURE_DATA"
TEMPLATE_REPO = Path(__file__).resolve().parent.parent / "feature_repo"
TABLES = ("user_profile", "item_profile", "user_behaviour")
VIEWS = ("user_behaviour", "user_profile", "item_profile")  # the column order of point_in_time_frame
SERVICES = ("ctr_ranking", "multi_scenario", "multimodal")
TIMESTAMP = "event_timestamp"
_ROW = "__ctrflow_row"
MATERIALIZED_FILE = "materialized.json"  # in the Feast repository: when it was last materialised (serving reads it)
_REPO_LOCK = threading.Lock()  # apply_repo swaps an env var and sys.modules entries while it imports the repo


class FeatureTableError(ValueError):
    """The dataset cannot be turned into feature tables (a field, the rule it breaks and how many rows)."""


# ---- the schema, from the spec -------------------------------------------------------------------------------
def view_fields(spec: FeatureSpec) -> dict[str, list[FieldSpec]]:
    """Which spec fields each feature view holds: user fields, item fields and the behaviour fields."""
    for name in (HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS):
        if name not in spec.names:
            raise FeatureTableError(f"feature spec: field '{name}' is missing (ctrflow.data.tables.standard_fields adds it)")
    behaviour = {HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS}
    keys = {spec.user_key, spec.item_key, spec.scenario_field}
    profile = [f for f in spec.fields if f.name not in behaviour and f.column not in keys]
    return {
        "user_behaviour": [spec[HIST_FIELD], *(spec[c] for c in BEHAVIOUR_COUNT_FIELDS)],
        "user_profile": [f for f in profile if f.entity is Entity.USER],
        "item_profile": [f for f in profile if f.entity is Entity.ITEM],
    }


def _default_type(f: FieldSpec) -> str:
    if f.name == HIST_FIELD:
        return "Array(Int64)"
    if f.name in BEHAVIOUR_COUNT_FIELDS:
        return "Int64"
    return {
        FieldKind.CATEGORICAL: "String",
        FieldKind.NUMERIC: "Float64",
        FieldKind.SEQUENCE: "Array(String)",
        FieldKind.EMBEDDING: "Array(Float32)",
    }[f.kind]


def view_schema(spec: FeatureSpec) -> dict[str, list[tuple[str, str]]]:
    """(column, Feast type name) per view, in the order write_feature_tables recorded (else the spec's order).

    Types are those write_feature_tables recorded from the data, else the kind's default.
    """
    recorded: dict[str, str] = spec.extra.get("feast_types", {})
    position = {c: i for i, c in enumerate(recorded)}
    schema = {}
    for view, fields in view_fields(spec).items():
        ordered = sorted(fields, key=lambda f: position.get(f.column, len(position)))  # stable: unrecorded keep order
        schema[view] = [(f.column, recorded.get(f.column, _default_type(f))) for f in ordered]
    return schema


def _type_of(f: FieldSpec, col: pd.Series) -> str:
    """The Feast type that keeps the column's values as they are (ints stay ints, as in point_in_time_frame)."""
    if f.kind is FieldKind.EMBEDDING:
        return "Array(Float32)"
    if f.kind is FieldKind.SEQUENCE:
        # ints only when every element of every list is an int: one float list (ints that met a NaN in pandas) or
        # one None inside a list makes the whole column text, which takes any element
        kinds = {np.asarray(c).dtype.kind for c in col if not _missing(c) and len(c)}
        return "Array(Int64)" if kinds and kinds <= {"i", "u"} else "Array(String)"
    is_int = pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if f.kind is FieldKind.NUMERIC:
        if not (is_int or pd.api.types.is_numeric_dtype(col)):
            raise FeatureTableError(f"field '{f.name}': a numeric field needs a numeric column, got dtype {col.dtype}")
        return "Int64" if is_int else "Float64"
    return "Int64" if is_int else "String"


_ARROW = {
    "String": pa.string(),
    "Int64": pa.int64(),
    "Float64": pa.float64(),
    "Array(String)": pa.list_(pa.string()),
    "Array(Int64)": pa.list_(pa.int64()),
    "Array(Float32)": pa.list_(pa.float32()),
    "Array(Float64)": pa.list_(pa.float64()),
}


def _missing(v: object) -> bool:
    """None, NaN, NaT, pd.NA (a list is never missing, even if empty)."""
    return v is None or (np.isscalar(v) and pd.isna(v)) or v is pd.NA


def _cast_cell_column(col: pd.Series, type_name: str) -> list | pd.Series:
    """Values arrow can take with the declared type (strings for String categoricals, lists for arrays).

    Text lists: each element as text; a missing element (None, NaN inside a list) carries nothing and is dropped,
    as the encoder would map it to the unknown token anyway.
    """
    if type_name == "String":
        return [None if _missing(v) else str(v) for v in col]
    if type_name == "Array(String)":
        return [None if _missing(v) else [str(x) for x in np.asarray(v, dtype=object).tolist() if not _missing(x)] for v in col]
    if type_name.startswith("Array("):
        return [None if _missing(v) else list(np.asarray(v).tolist()) for v in col]
    if type_name == "Int64":
        return col.astype("Int64")
    return pd.to_numeric(col, errors="coerce").astype("float64")


def _write_table(frame: pd.DataFrame, key: str, columns: list[tuple[str, str]], path: Path) -> Path:
    fields = [pa.field(key, pa.int64(), nullable=False), *(pa.field(c, _ARROW[t]) for c, t in columns)]
    fields.append(pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False))
    arrays = [pa.array(frame[key].to_numpy(dtype=np.int64), pa.int64())]
    for c, t in columns:
        arrays.append(pa.array(_cast_cell_column(frame[c], t), type=_ARROW[t], from_pandas=True))
    arrays.append(pa.array(frame[TIMESTAMP].astype(TS_DTYPE), pa.timestamp("us", tz="UTC")))
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
    return path


def _check_profile(table: pd.DataFrame, key: str, fields: list[FieldSpec], what: str) -> None:
    if key not in table.columns:
        raise FeatureTableError(f"{what} table: key column '{key}' is missing (columns: {list(table.columns)})")
    missing = [f"{f.name} (column '{f.column}')" for f in fields if f.column not in table.columns]
    if missing:
        raise FeatureTableError(f"{what} table: spec fields {missing} have no column (columns: {list(table.columns)})")
    if table[key].isna().any():
        raise FeatureTableError(f"{what} table: '{key}' must not be null ({int(table[key].isna().sum())} rows)")
    dupes = int(table[key].duplicated().sum())
    if dupes:
        raise FeatureTableError(f"{what} table: '{key}' must be unique, {dupes} rows repeat a key")
    for f in fields:
        if f.kind is FieldKind.EMBEDDING:
            bad = sum(1 for v in table[f.column] if v is not None and not (np.isscalar(v) and pd.isna(v)) and len(v) != f.dim)
            if bad:
                raise FeatureTableError(f"field '{f.name}': vectors must have length dim={f.dim}, {bad} rows do not")


def _ordered(fields: list[FieldSpec], table: pd.DataFrame) -> list[FieldSpec]:
    """Spec fields in the order of the table's columns (point_in_time_frame keeps the tables' column order)."""
    position = {c: i for i, c in enumerate(table.columns)}
    return sorted(fields, key=lambda f: position[f.column])


def feature_behaviour_table(interactions: pd.DataFrame, max_len: int) -> pd.DataFrame:
    """behaviour_table plus one closing row per user, stamped 1 µs after their last event, holding all of them.

    A row stamped t holds events strictly before t, so the closing row holds every event of the user: it is the
    state served online after materialization, and no training event is ever joined to it (it is later than all).
    A pandas view of `behaviour_arrow(..., closing=True)`, which write_feature_tables writes as it is.
    """
    table = behaviour_arrow(interactions, max_len, closing=True)
    return pd.DataFrame(
        {
            "user_id": table.column("user_id").to_numpy(),
            TIMESTAMP: pd.Series(table.column(TIMESTAMP).to_pandas()).astype(TS_DTYPE),
            HIST_FIELD: table.column(HIST_FIELD).to_pylist(),
            **{c: table.column(c).to_numpy() for c in BEHAVIOUR_COUNT_FIELDS},
        }
    )


BEHAVIOUR_ROW_GROUP = 100_000  # rows per Parquet row group of the behaviour table: user ranges a chunk's join can skip


def _write_behaviour(interactions: pd.DataFrame, max_len: int, path: Path, batch_rows: int | None = None) -> int:
    """The behaviour view's table (with closing rows) straight from Arrow, `batch_rows` rows (whole users) at a time
    through one ParquetWriter with a fixed schema: no Python list per row, and only one batch's item lists in memory.
    Rows are sorted by (user_id, event_timestamp), so each row group covers a user range (its min/max statistics let
    a per-chunk join read only its users' groups). Returns rows."""
    schema = pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field(HIST_FIELD, pa.list_(pa.int64())),
            *(pa.field(c, pa.int64()) for c in BEHAVIOUR_COUNT_FIELDS),
            pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for table in behaviour_batches(interactions, max_len, closing=True, batch_rows=batch_rows):
            writer.write_table(
                pa.Table.from_arrays([table.column(f.name) for f in schema], schema=schema), row_group_size=BEHAVIOUR_ROW_GROUP
            )
            rows += table.num_rows
    return rows


def write_feature_tables(dataset: Dataset, data_dir: str | Path, chunk_rows: int | None = None) -> dict[str, Path]:
    """Write user_profile, item_profile, user_behaviour (Parquet) and spec.json: what the Feast repo reads.

    `chunk_rows`: the behaviour table is built and written about that many rows (whole users) at a time (None: at
    once); the file's rows are the same either way."""
    started = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = FeatureSpec.from_dict(dataset.spec.to_dict())  # a copy: the recorded types must not touch the dataset
    views = view_fields(spec)
    inter = dataset.interactions
    for col in ("user_id", "item_id", "label", TIMESTAMP):
        if col not in inter.columns:
            raise FeatureTableError(f"interactions: column '{col}' is missing (columns: {list(inter.columns)})")
    ts = inter[TIMESTAMP]
    if str(ts.dtype) != TS_DTYPE:
        raise FeatureTableError(f"interactions: '{TIMESTAMP}' must be {TS_DTYPE}, got {ts.dtype} ({len(ts)} rows)")
    early = int((ts <= PROFILE_TIMESTAMP).sum())
    if early:
        raise FeatureTableError(
            f"interactions: '{TIMESTAMP}' must be after {PROFILE_TIMESTAMP} (the profiles' stamp), {early} rows are not"
        )
    _check_profile(dataset.users, spec.user_key, views["user_profile"], "users")
    _check_profile(dataset.items, spec.item_key, views["item_profile"], "items")
    user_fields = _ordered(views["user_profile"], dataset.users)
    item_fields = _ordered(views["item_profile"], dataset.items)

    types = {f.column: _type_of(f, dataset.users[f.column]) for f in user_fields}
    types.update({f.column: _type_of(f, dataset.items[f.column]) for f in item_fields})
    types.update({HIST_FIELD: "Array(Int64)", **{c: "Int64" for c in BEHAVIOUR_COUNT_FIELDS}})
    spec.extra["feast_types"] = types  # in the tables' column order, which the views (and frames) keep
    spec.extra["profile_timestamp"] = PROFILE_TIMESTAMP.isoformat()
    spec.extra.setdefault("dataset", dataset.name)

    paths: dict[str, Path] = {}
    users = dataset.users.assign(**{TIMESTAMP: PROFILE_TIMESTAMP}).astype({TIMESTAMP: TS_DTYPE})
    paths["user_profile"] = _write_table(
        users, spec.user_key, [(f.column, types[f.column]) for f in user_fields], data_dir / "user_profile.parquet"
    )
    items = dataset.items.assign(**{TIMESTAMP: PROFILE_TIMESTAMP}).astype({TIMESTAMP: TS_DTYPE})
    paths["item_profile"] = _write_table(
        items, spec.item_key, [(f.column, types[f.column]) for f in item_fields], data_dir / "item_profile.parquet"
    )
    paths["user_behaviour"] = data_dir / "user_behaviour.parquet"
    n_behaviour = _write_behaviour(inter, spec[HIST_FIELD].max_len, paths["user_behaviour"], batch_rows=chunk_rows)
    paths["spec"] = spec.save(data_dir / "spec.json")
    log.info(
        "feature tables: %d users, %d items, %d behaviour rows -> %s (%.1fs)",
        len(users), len(items), n_behaviour, data_dir, time.perf_counter() - started,
    )
    return paths


def load_feature_spec(data_dir: str | Path) -> FeatureSpec:
    """The spec the feature tables in `data_dir` were written with (read by feature_repo/features.py)."""
    path = Path(data_dir) / "spec.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: write the feature tables first (ctrflow.features.write_feature_tables) and point "
            f"{DATA_ENV} at their folder"
        )
    return FeatureSpec.load(path)


# ---- the repository ------------------------------------------------------------------------------------------
PROFILES = ("local", "production")  # features.profile: which feature_store yaml a new repo copy gets
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def profile_file(template: Path, profile: str = "local") -> Path:
    """The store configuration of a profile: `feature_store.yaml` (local: DuckDB, SQLite, file registry) or
    `feature_store.<profile>.yaml` (production: Spark, Redis, PostgreSQL SQL registry). Raises ValueError naming the
    profiles when there is no such file."""
    path = Path(template) / ("feature_store.yaml" if profile == "local" else f"feature_store.{profile}.yaml")
    if not path.exists():
        raise ValueError(f"features.profile '{profile}': {path} does not exist (profiles: {PROFILES})")
    return path


def copy_repo(dest: Path, template: Path | None = None, profile: str = "local") -> Path:
    """Copy the template repo (definitions and config only: no data, registry or online store) to `dest`.

    The copy's feature_store.yaml is the profile's (`profile_file`); the other profiles' files are left out.
    """
    template = Path(template) if template else TEMPLATE_REPO
    dest = Path(dest)
    if not (template / "feature_store.yaml").exists():
        raise FileNotFoundError(f"{template}: no feature_store.yaml, not a Feast repository")
    config = profile_file(template, profile)
    shutil.copytree(
        template, dest, dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(
            "data", ".feast", "__pycache__", "*.db", "*.parquet", ".ipynb_checkpoints", "feature_store.*.yaml"
        ),
    )
    shutil.copyfile(config, dest / "feature_store.yaml")
    return dest


def check_store_env(repo_dir: str | Path) -> None:
    """Raise EnvironmentError naming every environment variable feature_store.yaml refers to that is unset.

    Feast expands ${VAR} when it loads the file and leaves an unset one as the literal text, which then fails far
    away (a Redis host called "${CTRFLOW_REDIS}"); hosts and credentials live only in the environment.
    """
    path = Path(repo_dir) / "feature_store.yaml"
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # comments may name variables
    missing = sorted({a or b for a, b in _ENV_REF.findall(text)} - set(os.environ))
    if missing:
        raise OSError(f"{path}: environment variables {missing} are not set (hosts and credentials of the stores it names)")


def _repo_objects(repo_dir: Path, data_dir: Path) -> list:
    """Import the repo's definition files (honouring .feastignore) with `data_dir` as the feature-data folder.

    Feast's own parse_repo imports by module name relative to the working directory and caches the modules, so
    two repo copies in one process would share stale objects: here each file is imported fresh and dropped again.
    """
    from feast import Entity as FeastEntity
    from feast import FeatureService, FeatureView
    from feast.data_source import DataSource
    from feast.repo_operations import get_repo_files

    files = get_repo_files(repo_dir)
    names = [".".join(p.relative_to(repo_dir).with_suffix("").parts) for p in files]
    objects: list = []
    with _REPO_LOCK:
        saved_env = os.environ.get(DATA_ENV)
        saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
        os.environ[DATA_ENV] = str(data_dir)
        sys.path.insert(0, str(repo_dir))
        try:
            for name in names:
                module = importlib.import_module(name)
                for attr in vars(module).values():
                    if isinstance(attr, FeastEntity | FeatureView | FeatureService | DataSource) and not any(
                        attr is o for o in objects
                    ):
                        objects.append(attr)
        finally:
            sys.path.remove(str(repo_dir))
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(saved_modules)
            if saved_env is None:
                os.environ.pop(DATA_ENV, None)
            else:
                os.environ[DATA_ENV] = saved_env
    return objects


@contextlib.contextmanager
def registry_lock(repo_dir: str | Path):
    """Hold a PostgreSQL advisory lock per Feast project while a SQL registry on PostgreSQL is created and applied.

    Feast's SQL registry creates its tables and upserts each object with a read-then-write of its own, so two
    concurrent `feast apply`s on one database fail ("duplicate key ... projects", measured here) or interleave
    their objects. With the lock they run one after the other and the registry holds one whole apply. Any other
    registry (the file registry of the local profile): nothing to hold.
    """
    import yaml

    config = yaml.safe_load(os.path.expandvars((Path(repo_dir) / "feature_store.yaml").read_text())) or {}
    registry = config.get("registry")
    url = str(registry.get("path", "")) if isinstance(registry, dict) and registry.get("registry_type") == "sql" else ""
    if not url.startswith("postgresql"):
        yield
        return
    import hashlib

    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # one 63-bit key per (project): applies of other projects in the same database do not wait
    key = int.from_bytes(hashlib.sha256(f"ctrflow-feast-apply:{config.get('project')}".encode()).digest()[:8], "big") >> 1
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def apply_repo(repo_dir: str | Path, data_dir: str | Path) -> FeatureStore:
    """`feast apply` in-process: register the views built from data_dir/spec.json, create the online tables.

    Raises OSError naming the unset environment variables feature_store.yaml refers to (check_store_env); a SQL
    registry on PostgreSQL is applied under `registry_lock`, so concurrent applies leave it whole.
    """
    from feast import FeatureStore

    started = time.perf_counter()
    repo_dir = Path(repo_dir).resolve()
    data_dir = Path(data_dir).resolve()
    for table in TABLES:
        if not (data_dir / f"{table}.parquet").exists():
            raise FileNotFoundError(f"{data_dir}/{table}.parquet is missing: run write_feature_tables first")
    check_store_env(repo_dir)
    objects = _repo_objects(repo_dir, data_dir)
    with registry_lock(repo_dir):
        store = _apply(FeatureStore(repo_path=str(repo_dir)), objects)
    log.info(
        "feast apply: %d objects in %s (data %s, %.1fs)", len(objects), repo_dir, data_dir, time.perf_counter() - started
    )
    return store


def _apply(store: FeatureStore, objects: list) -> FeatureStore:
    from feast import Entity as FeastEntity
    from feast import FeatureService, FeatureView, Project
    from feast.data_source import DataSource
    from feast.feature_view import DUMMY_ENTITY
    from feast.repo_contents import RepoContents
    from feast.repo_operations import apply_total_with_repo_instance

    contents = RepoContents(
        projects=[Project(name=store.config.project)],
        data_sources=[o for o in objects if isinstance(o, DataSource)],
        entities=[o for o in objects if isinstance(o, FeastEntity)] + [DUMMY_ENTITY],
        feature_views=[o for o in objects if isinstance(o, FeatureView)],
        feature_services=[o for o in objects if isinstance(o, FeatureService)],
        on_demand_feature_views=[],
        stream_feature_views=[],
        label_views=[],
        permissions=[],
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        apply_total_with_repo_instance(store, store.config.project, store.registry, contents, skip_source_validation=False)
    for line in out.getvalue().splitlines():
        if line.strip():
            log.debug("feast apply: %s", line)
    store.refresh_registry()
    return store


# ---- reading features ----------------------------------------------------------------------------------------
_SERVICE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SERVICE_CACHE_S = 30.0  # a re-applied registry is seen by online_frame within this many seconds


def _service(store: FeatureStore, service: str) -> tuple[FeatureService, list[tuple[str, str, str]]]:
    """The feature service and its (view, feature, Feast type name) in point_in_time_frame's column order.

    Cached per store for a few seconds: decoding the service from the registry costs more than the online read.
    """
    from feast.errors import FeatureServiceNotFoundException

    cached = _SERVICE_CACHE.setdefault(store, {}).get(service)
    if cached and time.monotonic() - cached[0] < _SERVICE_CACHE_S:
        return cached[1], cached[2]
    try:
        fs = store.get_feature_service(service, allow_cache=True)  # the registry file is re-read only when it changes
    except FeatureServiceNotFoundException as exc:
        raise KeyError(f"feature service '{service}' is not registered in {store.repo_path} (services: {SERVICES})") from exc
    cols = []
    for view in VIEWS:
        for proj in fs.feature_view_projections:
            if proj.name == view:
                cols.extend((view, f.name, str(f.dtype)) for f in proj.features)
    _SERVICE_CACHE[store][service] = (time.monotonic(), fs, cols)
    return fs, cols


def _cells(values: list) -> np.ndarray:
    """A 1-d object array of list/vector cells (numpy would turn equal-length lists into a 2-d array)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values if len(values) else []
    return out


def _normalise(name: str, type_name: str, values: list) -> np.ndarray:
    """Feast's values (Python objects, None when missing) as point_in_time_frame holds them.

    hist_item_ids: lists ([] when none); counts: int64 (0 when none); embeddings: float32 vectors; other arrays:
    lists; Int64: int64, or float64 with NaN when one is missing (as pandas merges do); strings: object with NaN.
    """
    if name == HIST_FIELD:
        return _cells([[] if v is None else list(v) for v in values])
    if name in BEHAVIOUR_COUNT_FIELDS:
        return pd.Series(values, dtype="float64").fillna(0).to_numpy(dtype=np.int64)
    if type_name == "Array(Float32)":
        return _cells([None if v is None else np.asarray(v, dtype=np.float32) for v in values])
    if type_name.startswith("Array("):
        return _cells([None if v is None else list(v) for v in values])
    if type_name == "Int64":
        numbers = pd.Series(values, dtype="float64") if any(v is None for v in values) else None
        return numbers.to_numpy() if numbers is not None else np.asarray(values, dtype=np.int64).reshape(-1)
    if type_name.startswith("Float"):
        return pd.Series(values, dtype="float64").to_numpy()
    out = np.empty(len(values), dtype=object)
    out[:] = [np.nan if v is None else v for v in values]
    return out


BEHAVIOUR_JOINS = ("asof", "feast")


def _behaviour_asof_spark(
    store: FeatureStore, keys: pd.DataFrame, names: list[str], users: tuple[int, int] | None = None
) -> pa.Table:
    """`_behaviour_asof` on the Spark offline store's session: Spark has no ASOF JOIN, so the entity rows and the
    behaviour rows go into one relation, ordered per user by (time, behaviour row before entity row), and each entity
    row takes the last behaviour row's values so far (`last(..., ignorenulls)` over a running window): one sort per
    user, linear in rows like the DuckDB join; the same rule "latest row with timestamp <= the entity row's".
    Returns _ROW plus `names` in key-row order (null where the user has no row at or before that time). `users`
    (lo, hi): only behaviour rows of user ids in [lo, hi] are read (a chunk of entity rows of those users).
    """
    from feast.infra.offline_stores.contrib.spark_offline_store.spark import (
        get_spark_session_or_start_new_with_repoconfig,
    )
    from pyspark.sql import Window
    from pyspark.sql import functions as fn

    path = getattr(store.get_feature_view("user_behaviour").batch_source, "path", None)
    if not path:
        raise FileNotFoundError("feature view 'user_behaviour': its Spark source has no path to read")
    spark = get_spark_session_or_start_new_with_repoconfig(store.config.offline_store)
    behaviour = spark.read.parquet(str(path))
    if users is not None:  # pushed down to the Parquet scan: row groups of other users are skipped
        behaviour = behaviour.where(fn.col("user_id").between(int(users[0]), int(users[1])))
    behaviour = behaviour.select(
        "user_id", TIMESTAMP, fn.lit(0).alias("_kind"), fn.lit(None).cast("long").alias(_ROW),
        fn.struct(*names).alias("_values"),  # a struct: a behaviour row whose values are null still counts
    )
    entity = spark.createDataFrame(keys[["user_id", TIMESTAMP, _ROW]]).select(
        "user_id", TIMESTAMP, fn.lit(1).alias("_kind"), _ROW,
        fn.lit(None).cast(behaviour.schema["_values"].dataType).alias("_values"),
    )
    running = Window.partitionBy("user_id").orderBy(TIMESTAMP, "_kind").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    joined = (
        behaviour.unionByName(entity)
        .withColumn("_values", fn.last("_values", ignorenulls=True).over(running))
        .where(fn.col("_kind") == 1)
        .select(_ROW, *(fn.col("_values").getField(n).alias(n) for n in names))
    )
    table = joined.toArrow()
    return table.take(pa.array(np.argsort(table.column(_ROW).to_numpy(), kind="stable")))


def _behaviour_asof(
    store: FeatureStore, keys: pd.DataFrame, names: list[str], users: tuple[int, int] | None = None
) -> pa.Table:
    """The behaviour view's features at each key row: an ASOF JOIN in DuckDB over the view's own batch source.

    The view holds one row per (user, event time) whose values are valid from that time on (TTL 0), so Feast's
    point-in-time rule "latest row with timestamp <= the entity row's" is exactly `ASOF LEFT JOIN ... ON user_id =
    user_id AND entity time >= row time`. DuckDB runs it as a sort-merge: cost grows with rows, not with the
    product of each user's events (which is what a join over every earlier row and a pick of the latest costs).
    Returns a table in key-row order (`keys` sorted by _ROW): _ROW plus `names` (null where the user has no row at or
    before that time). `users` (lo, hi): the keys are rows of user ids in [lo, hi] only, so only those users'
    behaviour rows are read (the file is sorted by user: other row groups are skipped by their statistics).
    """
    if getattr(store.config.offline_store, "type", "") == "spark":  # the production profile's engine runs it too
        return _behaviour_asof_spark(store, keys, names, users)
    import duckdb

    source = store.get_feature_view("user_behaviour").batch_source
    path = getattr(source, "path", None)
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"feature view 'user_behaviour': its batch source path {path!r} is not a readable file")
    con = duckdb.connect()
    try:
        con.execute("SET preserve_insertion_order = false")
        for name, value in _DUCKDB_SETTINGS.items():  # duckdb_memory_limit: the step's cap and spill folder
            con.execute(f"SET {name} = '{value}'")
        # DuckDB (>= 1.3) plans an ASOF join whose one side looks small as a nested loop + arg_max; a registered
        # Arrow table has no row estimate (~1 row), which turns a linear join into entity rows x behaviour rows
        with contextlib.suppress(duckdb.Error):
            con.execute("SET asof_loop_join_threshold = 0")
        con.register("entity_rows", pa.Table.from_pandas(keys[["user_id", TIMESTAMP, _ROW]], preserve_index=False))
        cols = ", ".join(f'b."{n}"' for n in names)
        where, args = ("WHERE user_id BETWEEN ? AND ?", [int(users[0]), int(users[1])]) if users is not None else ("", [])
        return con.execute(
            f"""
            SELECT e.{_ROW}, {cols}
            FROM entity_rows e ASOF LEFT JOIN (SELECT * FROM read_parquet(?) {where}) b
              ON e.user_id = b.user_id AND e.{TIMESTAMP} >= b.{TIMESTAMP}
            ORDER BY e.{_ROW}
            """,
            [str(path), *args],
        ).to_arrow_table()
    finally:
        con.close()


def _list_cells(column: pa.ChunkedArray) -> np.ndarray:
    """A list column as a 1-d object array of int64 numpy arrays (empty where null), views of one Arrow buffer."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        arr = arr.fill_null(pa.scalar([], arr.type))
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    starts = offsets[:-1] - offsets[0]
    values = values[offsets[0] : offsets[-1]]
    return _cells([values[s:e] for s, e in zip(starts, starts + np.diff(offsets))])


def _normalise_column(name: str, type_name: str, column: pa.ChunkedArray) -> np.ndarray:
    """`_normalise` of a whole Arrow column, vectorised for scalars (millions of rows): the same values and dtypes."""
    if type_name == "String":
        out = column.to_numpy(zero_copy_only=False).astype(object)
        out[pd.isna(out)] = np.nan
        return out
    if type_name == "Int64" or type_name.startswith("Float"):
        values = column.to_numpy(zero_copy_only=False)  # int64, or float64 with NaN where a value is missing
        return values.astype(np.float64) if type_name.startswith("Float") else values
    if type_name == "Array(Float32)":  # vectors: float32 views of one buffer, None where missing (no list per row)
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return _cells([values[a:b] if ok else None for a, b, ok in zip(offsets[:-1], offsets[1:], valid)])
    return _normalise(name, type_name, column.to_pylist())


def _user_ranges(user_ids: np.ndarray, chunk_rows: int | None) -> list[tuple[int, int] | None]:
    """User-id ranges [lo, hi] (whole users) holding about `chunk_rows` entity rows each, in user-id order; [None]
    (one chunk, every user) when chunk_rows is None or covers every row. A user with more rows is a range alone."""
    if chunk_rows is None or len(user_ids) <= chunk_rows:
        return [None]
    uniq, counts = np.unique(user_ids, return_counts=True)
    cum = np.cumsum(counts)
    ranges, first = [], 0
    while first < len(uniq):
        done = int(cum[first - 1]) if first else 0
        last = max(int(np.searchsorted(cum, done + chunk_rows, side="right")), first + 1)  # users [first, last)
        ranges.append((int(uniq[first]), int(uniq[last - 1])))
        first = last
    return ranges


def _chunk_tables(
    store: FeatureStore,
    keys: pd.DataFrame,
    feature_service: FeatureService,
    asof: list[str],
    through_feast: list[tuple[str, str]],
    service: str,
    users: tuple[int, int] | None,
) -> dict[str, pa.Table]:
    """feature name -> an Arrow table holding it, rows in `keys`' order (keys sorted by _ROW, all of `users`)."""
    tables: dict[str, pa.Table] = {}
    if through_feast:
        refs = feature_service if not asof else [f"{view}:{name}" for view, name in through_feast]
        t = time.perf_counter()
        table = store.get_historical_features(entity_df=keys, features=refs).to_arrow()
        log.debug("historical features: get_historical_features, %d views, %d rows (%.1fs)",
                  len({v for v, _ in through_feast}), len(keys), time.perf_counter() - t)  # fmt: skip
        rows = table.column(_ROW).to_numpy()
        if len(rows) != len(keys) or not np.array_equal(np.sort(rows), keys[_ROW].to_numpy()):
            raise RuntimeError(f"feast returned {len(rows)} rows for {len(keys)} entity rows (service '{service}')")
        table = table.take(pa.array(np.argsort(rows, kind="stable")))  # back to entity_df's row order
        tables.update({name: table for _, name in through_feast})
        del table
    if asof:
        t = time.perf_counter()
        table = _behaviour_asof(store, keys, asof, users)
        log.debug("historical features: behaviour ASOF join, %d rows (%.1fs)", len(keys), time.perf_counter() - t)
        if table.num_rows != len(keys) or not np.array_equal(table.column(_ROW).to_numpy(), keys[_ROW].to_numpy()):
            raise RuntimeError(f"behaviour ASOF join returned {table.num_rows} rows for {len(keys)} entity rows")
        tables.update({name: table for name in asof})
    return tables


def historical_chunks(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    service: str = "ctr_ranking",
    behaviour_join: str = "asof",
    lists: bool = True,
    chunk_rows: int | None = None,
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """`historical_frame`'s rows a range of users at a time: yields (positions, frame), `frame` the rows of
    `entity_df` at those positions (ascending, int64) with their features, as `historical_frame` holds them.

    Each chunk holds the entity rows of a user-id range of about `chunk_rows` rows (whole users; None: one chunk of
    every row), so the behaviour join reads only that range's behaviour rows and memory is bounded by the chunk,
    whatever the rows in all. Every position appears in exactly one chunk; the values are those of one chunk of
    every row (a chunk's scalar column can be int64 where the whole frame's is float64 with NaN: concatenating the
    chunks gives the whole frame's dtypes). Raises as `historical_frame`.
    """
    if behaviour_join not in BEHAVIOUR_JOINS:
        raise ValueError(f"behaviour_join must be one of {BEHAVIOUR_JOINS}, got '{behaviour_join}'")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
    missing = [c for c in ("user_id", "item_id", TIMESTAMP) if c not in entity_df.columns]
    if missing:
        raise KeyError(f"entity_df: columns {missing} are missing (it has {list(entity_df.columns)}, {len(entity_df)} rows)")
    feature_service, columns = _service(store, service)
    clash = [name for _, name, _ in columns if name in entity_df.columns]
    if clash:
        raise ValueError(f"entity_df: columns {clash} are features of service '{service}'; drop them first")
    for key in ("user_id", "item_id", TIMESTAMP):
        nulls = int(entity_df[key].isna().sum())
        if nulls:
            raise ValueError(f"entity_df: '{key}' must not be null, {nulls} of {len(entity_df)} rows are")
    # only keys, time and row number go to Feast: extra columns (lists, odd types) never reach DuckDB
    keys = pd.DataFrame(
        {
            "user_id": entity_df["user_id"].to_numpy(dtype=np.int64),
            "item_id": entity_df["item_id"].to_numpy(dtype=np.int64),
            TIMESTAMP: pd.to_datetime(entity_df[TIMESTAMP], utc=True).astype(TS_DTYPE).reset_index(drop=True),
            _ROW: np.arange(len(entity_df), dtype=np.int64),
        }
    )
    if behaviour_join == "asof" and any(view == "user_behaviour" for view, _, _ in columns):
        path = getattr(store.get_feature_view("user_behaviour").batch_source, "path", None)
        on_spark = getattr(store.config.offline_store, "type", "") == "spark"  # Spark reads its own paths (s3://...)
        if not path or not (on_spark or Path(str(path)).is_file()):  # e.g. s3:// under DuckDB: it cannot read it
            log.warning(
                "historical features: the user_behaviour source %r is not a local Parquet file; its join goes "
                "through get_historical_features (cost ~ sum over users of events^2)", path,
            )
            behaviour_join = "feast"
    asof = [name for view, name, _ in columns if view == "user_behaviour"] if behaviour_join == "asof" else []
    through_feast = [(view, name) for view, name, _ in columns if name not in asof]
    ranges = _user_ranges(keys["user_id"].to_numpy(), chunk_rows)
    user_ids = keys["user_id"].to_numpy()
    for number, users in enumerate(ranges, 1):
        started = time.perf_counter()
        if users is None:
            positions = keys[_ROW].to_numpy()
            part_keys, part = keys, entity_df.copy()
        else:
            positions = np.flatnonzero((user_ids >= users[0]) & (user_ids <= users[1])).astype(np.int64)
            part_keys, part = keys.iloc[positions].reset_index(drop=True), entity_df.iloc[positions].copy()
        if part_keys.empty:
            empty = pa.table({_ROW: pa.array([], pa.int64()), **{name: pa.array([], _ARROW[t]) for _, name, t in columns}})
            tables = {name: empty for _, name, _ in columns}
        else:
            tables = _chunk_tables(store, part_keys, feature_service, asof, through_feast, service, users)
        del part_keys
        for _, name, type_name in columns:  # positional
            column = tables[name].column(name)
            if name == HIST_FIELD and not lists:
                part[name] = _list_cells(column)
            elif name in BEHAVIOUR_COUNT_FIELDS:
                part[name] = column.fill_null(0).to_numpy().astype(np.int64)
            else:
                part[name] = _normalise_column(name, type_name, column)
        del tables
        if len(ranges) > 1:
            log.debug("historical features: chunk %d/%d, users %s, %d rows (%.1fs)",
                      number, len(ranges), users, len(part), time.perf_counter() - started)  # fmt: skip
        yield positions, part


def historical_frame(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    service: str = "ctr_ranking",
    behaviour_join: str = "asof",
    lists: bool = True,
    chunk_rows: int | None = None,
) -> pd.DataFrame:
    """Point-in-time features of a feature service: one row per entity row, in its order, with its columns and
    index kept.

    Equals `ctrflow.data.frames.point_in_time_frame` on the same rows: hist_item_ids as lists ([] when none),
    user_n_events/user_n_pos int64 (0 when none), profile fields NaN/None for unknown users or items.
    `behaviour_join`: "asof" (default) reads the profile views through Feast's `get_historical_features` (one
    matching row per key: linear) and the behaviour view with `_behaviour_asof` (linear); "feast" sends every view
    through `get_historical_features`, whose join pairs each entity row with all of its user's earlier behaviour
    rows (cost ~ sum over users of events^2). Both give the same frame. `lists=False` gives hist_item_ids as int64
    numpy arrays (views of one buffer: far less memory than Python lists on millions of rows; same Parquet).
    `chunk_rows`: joined a user range of about that many rows at a time (`historical_chunks`); the same frame.
    The whole frame is in memory: `write_historical_frame` writes one of any size in bounded memory.
    """
    started = time.perf_counter()
    chunks = list(historical_chunks(store, entity_df, service, behaviour_join, lists, chunk_rows))
    if len(chunks) == 1:
        frame = chunks[0][1]
    else:
        positions = np.concatenate([p for p, _ in chunks])
        frame = pd.concat([f for _, f in chunks])
        frame = frame.iloc[np.argsort(positions, kind="stable")]
    log.info(
        "historical features: %d rows, service '%s', behaviour join %s, %d chunk(s) (%.1fs)",
        len(frame), service, behaviour_join, len(chunks), time.perf_counter() - started,
    )
    return frame


_FRAME_TYPES = {  # a feature column's Arrow type in the training frame, from its Feast type (as _normalise holds it)
    "String": pa.string(),
    "Int64": pa.int64(),  # nulls stay nulls: pandas reads an int64 column with nulls as float64 with NaN
    "Int32": pa.int64(),
    "Float64": pa.float64(),
    "Float32": pa.float64(),
    "Array(String)": pa.list_(pa.string()),
    "Array(Int64)": pa.list_(pa.int64()),
    "Array(Float32)": pa.list_(pa.float32()),
    "Array(Float64)": pa.list_(pa.float64()),
}


def frame_schema(store: FeatureStore, entity_df: pd.DataFrame, service: str = "ctr_ranking") -> pa.Schema:
    """The training frame's Arrow schema, fixed before any row is joined: entity_df's columns as pandas converts the
    whole column, then the service's features by their Feast types (`_FRAME_TYPES`), so no chunk (one whose
    values are all null, say) can change a column's type. Raises KeyError for a Feast type it has no entry for."""
    _, columns = _service(store, service)
    base = pa.Schema.from_pandas(entity_df, preserve_index=False)
    fields = list(base)
    for _, name, type_name in columns:
        if name == HIST_FIELD:
            fields.append(pa.field(name, pa.list_(pa.int64())))
        elif name in BEHAVIOUR_COUNT_FIELDS:
            fields.append(pa.field(name, pa.int64()))
        elif type_name in _FRAME_TYPES:
            fields.append(pa.field(name, _FRAME_TYPES[type_name]))
        else:
            raise KeyError(f"feature '{name}' of service '{service}': Feast type {type_name} has no training-frame type")
    return pa.schema(fields)


def write_historical_frame(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    path: str | Path,
    service: str = "ctr_ranking",
    behaviour_join: str = "asof",
    chunk_rows: int | None = None,
    slice_rows: int = 250_000,
) -> int:
    """`historical_frame(..., lists=False)` written to Parquet at `path` in bounded memory; returns rows.

    The rows, their order and values are those of the whole frame written with `to_parquet(index=False)` (read back
    with pandas: the same columns, dtypes and values), in a schema fixed up front (`frame_schema`). Chunks of about
    `chunk_rows` rows (user ranges, `historical_chunks`) are joined one at a time; with more than one, each goes to a
    temporary Parquet file beside `path` with its row numbers, and the files are merged back into row order
    (`slice_rows`-row blocks): memory ~ one chunk plus one block, whatever the rows in all.
    """
    from ctrflow.meter import progress

    started = time.perf_counter()
    path = Path(path)
    schema = frame_schema(store, entity_df, service)
    n = len(entity_df)
    chunks = historical_chunks(store, entity_df, service, behaviour_join, lists=False, chunk_rows=chunk_rows)
    ranges = len(_user_ranges(entity_df["user_id"].to_numpy(dtype=np.int64), chunk_rows)) if n else 1
    done = 0
    with pq.ParquetWriter(path, schema) as writer:
        if ranges == 1:
            for _, part in chunks:
                for a in range(0, max(len(part), 1), slice_rows):
                    writer.write_table(pa.Table.from_pandas(part.iloc[a : a + slice_rows], schema=schema, preserve_index=False))
                done += len(part)
                progress(done, n, "point-in-time join and training set written")
        else:
            tmp = path.parent / f".{path.name}.chunks"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                with_row = schema.append(pa.field(_ROW, pa.int64()))
                group_rows = max(1_000, slice_rows // ranges)  # one output block's share of each chunk file
                files = []
                for number, (positions, part) in enumerate(chunks):
                    part[_ROW] = positions
                    files.append(tmp / f"{number:05d}.parquet")
                    with pq.ParquetWriter(files[-1], with_row) as chunk_writer:
                        for a in range(0, len(part), slice_rows):
                            chunk_writer.write_table(  # small groups: the merge decodes one group per file at once
                                pa.Table.from_pandas(part.iloc[a : a + slice_rows], schema=with_row, preserve_index=False),
                                row_group_size=group_rows,
                            )
                    done += len(part)
                    del part
                    progress(done, n, f"point-in-time join, chunk {number + 1}/{ranges}")
                _merge_by_row(files, writer, n, slice_rows)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("training frame %s: %d rows in %d chunk(s) (%.1fs)", path, n, ranges, time.perf_counter() - started)
    return n


def _merge_by_row(files: list[Path], writer: pq.ParquetWriter, n: int, block_rows: int) -> None:
    """Write the rows of `files` (each sorted by _ROW, together every row number in [0, n) once) in row order,
    `block_rows` row numbers at a time, without _ROW. Each file is read once, one row group at a time on demand
    (`read_row_group`: `iter_batches` reads ahead, ~50 MB per file and growing, measured on the 10M run)."""
    from ctrflow.meter import progress

    readers = [pq.ParquetFile(f) for f in files]
    next_group = [0] * len(files)
    buffers: list[pa.Table | None] = [None] * len(files)
    for end in range(block_rows, n + block_rows, block_rows):
        parts = []
        for i, reader in enumerate(readers):
            buf = buffers[i]
            while next_group[i] < reader.num_row_groups and (buf is None or buf.num_rows == 0 or buf.column(_ROW)[-1].as_py() < end):
                more = reader.read_row_group(next_group[i], use_threads=False)
                next_group[i] += 1
                buf = more if buf is None or buf.num_rows == 0 else pa.concat_tables([buf, more])
            if buf is None:
                continue
            take = int(np.searchsorted(buf.column(_ROW).to_numpy(), end))  # rows numbered below `end`
            parts.append(buf.slice(0, take))
            buffers[i] = buf.slice(take)
        block = pa.concat_tables(parts) if parts else None
        if block is not None and block.num_rows:
            order = np.argsort(block.column(_ROW).to_numpy(), kind="stable")
            writer.write_table(block.take(pa.array(order)).drop_columns([_ROW]))
        del parts, block
        progress(min(end, n), n, "training set written in row order")


_DUCKDB_SETTINGS: dict[str, str] = {}  # set by duckdb_memory_limit, applied to every DuckDB connection opened here


_SPILL_DIR: list[str] = []  # this process's DuckDB spill folder (one: DuckDB cannot switch it once it has spilled)


def _spill_dir() -> str:
    if not _SPILL_DIR:
        import atexit
        import tempfile

        _SPILL_DIR.append(tempfile.mkdtemp(prefix="ctrflow-duckdb-"))
        atexit.register(shutil.rmtree, _SPILL_DIR[0], True)
    return _SPILL_DIR[0]


@contextlib.contextmanager
def duckdb_memory_limit(memory_mb: int):
    """Within the block, cap DuckDB's memory at `memory_mb` MiB (spilling to a temporary folder of this process
    beyond it, removed at exit) in this process's offline joins: Feast's DuckDB offline store (ibis' default DuckDB
    connection, which `get_historical_features` and `materialize` run on) and the behaviour ASOF joins. The cap is
    lifted after the block.

    Why: materialising the behaviour view picks each user's latest row with a window over every behaviour row and its
    item list; DuckDB's default cap (80% of RAM) lets such a window take many GB on 10M rows, while with a 1 GB cap it
    spills and takes the same time (measured on the 10M-row table: 1.2 GB peak, 24 s). No effect on the Spark
    profile's joins."""
    from ibis.config import _default_backend

    backend = _default_backend()  # what ibis.read_parquet, and so Feast's DuckDB store, runs on
    on_duckdb = getattr(backend, "name", "") == "duckdb"
    settings = {"memory_limit": f"{int(memory_mb)}MB", "temp_directory": _spill_dir()}
    _DUCKDB_SETTINGS.update(settings)
    try:
        if on_duckdb:
            backend.raw_sql(f"SET memory_limit = '{settings['memory_limit']}'")
            current = backend.raw_sql("SELECT current_setting('temp_directory')").fetchone()[0]
            if current != settings["temp_directory"]:
                try:
                    backend.raw_sql(f"SET temp_directory = '{settings['temp_directory']}'")
                except Exception as exc:  # noqa: BLE001 - it has spilled elsewhere already: it keeps that folder
                    log.debug("DuckDB keeps its temporary directory %s: %s", current, exc)
        yield
    finally:
        _DUCKDB_SETTINGS.pop("memory_limit", None)
        if on_duckdb:
            backend.raw_sql("RESET memory_limit")


def materialize(store: FeatureStore, end: datetime | None = None) -> None:
    """Load the latest value of every view up to `end` (default: now) into the online store.

    Starts at PROFILE_TIMESTAMP: Feast's materialize_incremental starts one year back for views without TTL and
    would skip the profiles. Records the time in `<repo>/materialized.json` (serving workers watch it).
    """
    started = time.perf_counter()
    end = end or datetime.now(UTC)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    with contextlib.redirect_stdout(io.StringIO()):  # feast prints progress bars per view
        store.materialize(start_date=PROFILE_TIMESTAMP.to_pydatetime(), end_date=end)
    record_materialization(store.repo_path, end)  # serving workers refresh their item cache when this changes
    log.info("materialized online up to %s (%.1fs)", end.isoformat(), time.perf_counter() - started)


def record_materialization(repo_path: str | Path, end: datetime) -> Path:
    """Write `<repo>/materialized.json` ({"at": now, "end": end}, ISO UTC) atomically (temp file + rename)."""
    path = Path(repo_path) / MATERIALIZED_FILE
    tmp = path.with_name(f".{MATERIALIZED_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"at": datetime.now(UTC).isoformat(), "end": end.isoformat()}))
    os.replace(tmp, path)
    return path


def materialization_marker(repo_path: str | Path) -> str | None:
    """The marker's `at` value (ISO UTC), or None when the repository has none (never materialised by ctrflow)."""
    try:
        return str(json.loads((Path(repo_path) / MATERIALIZED_FILE).read_text())["at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def service_features(store: FeatureStore, service: str = "ctr_ranking") -> dict[str, dict[str, str]]:
    """The features a feature service serves: {column: {"view", "type", "dataset"}} (dataset: the view's tag).

    Raises KeyError naming the service when the repository does not register it.
    """
    _, columns = _service(store, service)
    datasets = {}
    for view in {v for v, _, _ in columns}:
        try:
            datasets[view] = str((store.get_feature_view(view).tags or {}).get("dataset", ""))
        except Exception:  # noqa: BLE001 - a view without tags (or of another kind) just has no recorded data set
            datasets[view] = ""
    return {name: {"view": view, "type": type_name, "dataset": datasets[view]} for view, name, type_name in columns}


def online_item_features(store: FeatureStore, item_ids: list, service: str = "ctr_ranking") -> pd.DataFrame:
    """The item-profile features of a feature service for `item_ids`, one online read: one row per id (key column
    `item_id`), values normalised as `online_frame` serves them (missing items: NaN / None)."""
    from feast.type_map import feast_value_type_to_python_type

    _, columns = _service(store, service)
    items = [c for c in columns if c[0] == "item_profile"]
    frame: dict[str, object] = {"item_id": np.asarray(item_ids, dtype=np.int64).reshape(-1)}
    if items and len(item_ids):
        proto = store.get_online_features(
            features=[f"item_profile:{name}" for _, name, _ in items], entity_rows=[{"item_id": int(i)} for i in item_ids]
        ).proto
        results = dict(zip(proto.metadata.feature_names.val, proto.results))
        for _, name, type_name in items:
            frame[name] = _normalise(name, type_name, [feast_value_type_to_python_type(v) for v in results[name].values])
    return pd.DataFrame(frame)


def online_frame(
    store: FeatureStore, user_id: int, item_ids: list[int], scenario: str, service: str = "ctr_ranking"
) -> pd.DataFrame:
    """One row per candidate item for a request, with the training frame's columns (no label); one online read.

    Unknown users or items come back as missing values (NaN / None / [] / 0 counts), never as an error.
    event_timestamp is the request time.
    """
    from feast.type_map import feast_value_type_to_python_type

    feature_service, columns = _service(store, service)
    items = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    n = len(items)
    frame: dict[str, object] = {
        "user_id": np.full(n, int(user_id), dtype=np.int64),
        "item_id": items,
        "scenario": np.full(n, scenario, dtype=object),
        TIMESTAMP: pd.Series([pd.Timestamp.now(tz="UTC")] * n, dtype=TS_DTYPE),
    }
    if n:
        rows = [{"user_id": int(user_id), "item_id": int(i)} for i in items]
        proto = store.get_online_features(features=feature_service, entity_rows=rows).proto
        results = dict(zip(proto.metadata.feature_names.val, proto.results))
        for view, name, type_name in columns:
            values = results[name].values
            if view == "item_profile":
                frame[name] = _normalise(name, type_name, [feast_value_type_to_python_type(v) for v in values])
            else:  # every row is the same user: decode once, repeat (list cells are shared, read-only)
                frame[name] = np.repeat(_normalise(name, type_name, [feast_value_type_to_python_type(values[0])]), n)
    else:
        for _, name, type_name in columns:
            frame[name] = _normalise(name, type_name, [])
    return pd.DataFrame(frame)
