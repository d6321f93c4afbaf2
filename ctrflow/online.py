"""The ranking service's fast scoring path: item features held encoded in the worker, one online read per request.

Why: reading ~100 candidates' features from the online store and encoding them with pandas cost ~35 ms a request
(issue 10), while the model's forward pass is a few ms. Production stacks keep the item side in the serving process
and read only the user's features per request; so does this module.

- `ItemSnapshot`: every item of the store's `item_profile` view read once (`features.online_item_features`, the
  same read and normalisation as `features.online_frame`), encoded by the model's own `FeatureEncoder` into one
  tensor per item-side field ([N + 1, ...]; the last row is "an item the store does not hold": every feature
  missing), plus the raw values as an Arrow table for the request log. Immutable: a refresh builds a new one.
- `OnlineScorer.rank_scores`: one online read of the user's views (a single entity; the provider's online_read per
  view when the views have no TTL, else `get_online_features`), the user's fields encoded without pandas
  (`ValueEncoder`, the encoder's rules for one value), the item fields gathered from
  the snapshot by row index, the model in inference mode. Scores equal `Scorer.score(online_frame(...))` (tests).
- Refresh: `features.materialize` records the materialisation in `<repo>/materialized.json`. A background thread
  of each worker reads that marker every `refresh_s` seconds (params `serving.item_cache_refresh_s`) and, when it
  changed, builds a new snapshot and swaps the reference; a request holds the snapshot it started with, so no
  request fails or sees a half-built table. Staleness bound: an item value whose materialisation finished at time t
  is served from t + refresh_s + the snapshot's build time (logged with each refresh) at the latest; an item the store gains after the snapshot
  is scored as unknown-to-the-store (all features missing, as today's path scores an unknown item) until then.

Errors: construction raises KeyError naming the field when a model field is served by no view of the feature
service (the fit check at start names it first).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind, FieldSpec
from ctrflow.data.tables import BEHAVIOUR_COUNT_FIELDS, HIST_FIELD
from ctrflow.features import materialization_marker
from ctrflow.request_log import EPOCH, ItemRows, constant

log = logging.getLogger(__name__)

ITEM_VIEW = "item_profile"
USER_VIEWS = ("user_behaviour", "user_profile")
ITEM_CHUNK = 5000  # entities per online read while building a snapshot


# ---- encoding one value (the encoder's rules, no pandas) --------------------------------------------------------
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class ValueEncoder:
    """One field of a fitted `FeatureEncoder`, applied to a single raw value as `FeatureEncoder.transform` does.

    Categorical / sequence: vocabulary index + 1, 0 for unknown or missing (a string of digits matches an integer
    vocabulary, as the encoder's numeric coercion does); numeric: bucket by the fitted boundaries (side right) + 1,
    0 when missing; embedding: the vector (float32, shape [dim], ValueError naming the field otherwise), zeros when
    missing. Output: a numpy array of the per-row shape ([] , [max_len] or [dim]).
    """

    def __init__(self, encoder: FeatureEncoder, field: FieldSpec):
        self.field = field
        self.index: dict[Any, int] = {}
        self.int_vocab = False
        if field.kind in (FieldKind.CATEGORICAL, FieldKind.SEQUENCE):
            vocab = encoder.vocabs[field.vocab_of or field.name]
            self.index = {v: i + 1 for i, v in enumerate(vocab)}
            self.int_vocab = bool(vocab) and isinstance(vocab[0], int | np.integer)
        self.boundaries = np.asarray(encoder.boundaries.get(field.name, []), dtype=float)

    def code(self, v: Any) -> int:
        if _missing(v):
            return 0
        if self.int_vocab and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return 0
        try:
            return self.index.get(v, 0)
        except TypeError:  # an unhashable value is no vocabulary entry
            return 0

    def scalar(self, v: Any) -> int:
        """The code of a categorical or numeric field's value (what `__call__` gives as a 0-d array)."""
        if self.field.kind is FieldKind.CATEGORICAL:
            return self.code(v)
        try:
            x = float(v) if not _missing(v) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if math.isnan(x):
            return 0
        return int(np.searchsorted(self.boundaries, x, side="right")) + 1

    def __call__(self, v: Any) -> np.ndarray:
        f = self.field
        if f.kind is FieldKind.CATEGORICAL or f.kind is FieldKind.NUMERIC:
            return np.asarray(self.scalar(v), dtype=np.int64)
        if f.kind is FieldKind.SEQUENCE:
            out = np.zeros(f.max_len, dtype=np.int64)
            values = [] if _missing(v) else list(v)
            keep = min(len(values), f.max_len)  # the most recent values are at the end of the list
            if keep:
                out[:keep] = [self.code(x) for x in values[len(values) - keep :]]
            return out
        out = np.zeros(f.dim, dtype=np.float32)
        if not _missing(v):
            arr = np.asarray(v, dtype=np.float32)
            if arr.shape != (f.dim,):
                raise ValueError(f"field '{f.name}': expected a vector of length {f.dim}, got shape {arr.shape}")
            out[:] = arr
        return out


def normalise_value(name: str, type_name: str, v: Any) -> Any:
    """One online value as `features.online_frame` holds it (`features._normalise` for a single cell)."""
    if name == HIST_FIELD:
        return [] if v is None else list(v)
    if name in BEHAVIOUR_COUNT_FIELDS:
        return 0 if v is None else int(v)
    if type_name == "Array(Float32)":
        return None if v is None else np.asarray(v, dtype=np.float32)
    if type_name.startswith("Array("):
        return None if v is None else list(v)
    if type_name == "Int64":
        return math.nan if v is None else int(v)
    if type_name.startswith("Float"):
        return math.nan if v is None else float(v)
    return math.nan if v is None else v


# ---- the item snapshot --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemSnapshot:
    """Item features of one materialisation, encoded. `encoded[field]`: [N + 1, ...] (row N: an item the store does
    not hold); `log_table`: the raw values as served, N + 1 rows, for the request log; `built_at`: epoch seconds."""

    ids: np.ndarray
    row_of: dict[int, int]
    encoded: dict[str, torch.Tensor]
    log_table: pa.Table
    marker: str | None
    built_at: float
    key_codes: dict[str, np.ndarray]  # the item key's fields: code of each snapshot id ([N + 1], row N: 0)

    @functools.cached_property
    def log_batch(self) -> pa.RecordBatch:
        """`log_table` as one record batch: a request's take gives plain arrays, no chunked ones to combine."""
        return self.log_table.combine_chunks().to_batches()[0] if self.log_table.num_columns else pa.record_batch({})

    def rows(self, item_ids: list[int]) -> np.ndarray:
        """Row index per candidate (N for an item the snapshot does not hold)."""
        missing = len(self.ids)
        get = self.row_of.get
        return np.fromiter((get(i, missing) for i in item_ids), dtype=np.int64, count=len(item_ids))


def _all_item_ids(store: Any, encoder: FeatureEncoder) -> np.ndarray:
    """Every item id the online store may hold: the item view's source table's keys (a Parquet file source), and the
    ids the model was trained on."""
    import pyarrow.parquet as pq

    key = encoder.spec.item_key
    ids: set[int] = set()
    for f in encoder.spec.fields:
        if f.column == key and f.name in encoder.vocabs:
            ids.update(int(v) for v in encoder.vocabs[f.name])
    try:
        source = store.get_feature_view(ITEM_VIEW).batch_source
        path = Path(source.path)
        if not path.is_absolute():
            path = Path(store.repo_path) / path
        ids.update(int(v) for v in pq.read_table(path, columns=[key]).column(key).to_pylist() if v is not None)
    except Exception as exc:  # noqa: BLE001 - another source kind: the trained ids still give a snapshot
        log.warning("item cache: could not list the item source's ids (%s); caching the model's %d item ids", exc, len(ids))
    return np.asarray(sorted(ids), dtype=np.int64)


def build_snapshot(
    store: Any,
    service: str,
    encoder: FeatureEncoder,
    item_fields: list[FieldSpec],
    to_arrow: Callable[..., pa.Array] | None,
    key_fields: list[tuple[FieldSpec, ValueEncoder]] = (),  # type: ignore[assignment]
) -> ItemSnapshot:
    """Read every item's features from the online store (in chunks of ITEM_CHUNK) and encode them. Off the hot path
    (start and refresh), so pandas and the encoder's own transform are used here: the item side equals today's path
    by construction."""
    import pandas as pd

    from ctrflow import features

    marker = materialization_marker(store.repo_path)  # read first: a materialisation during the build is seen next time
    ids = _all_item_ids(store, encoder)
    parts = [features.online_item_features(store, ids[i : i + ITEM_CHUNK].tolist(), service) for i in range(0, len(ids), ITEM_CHUNK)]
    frame = pd.concat(parts, ignore_index=True) if parts else features.online_item_features(store, [], service)
    frame = frame.reindex(range(len(frame) + 1))  # row N, all missing: an item the store does not hold
    encoded = {}
    for f in item_fields:
        col = frame[f.column] if f.column in frame.columns else pd.Series([None] * len(frame))
        encoded[f.name] = torch.from_numpy(np.ascontiguousarray(encoder._encode(f, col)))
    value_columns = [c for c in frame.columns if c != encoder.spec.item_key]
    if to_arrow is not None:
        arrays = [to_arrow(c, frame[c]) for c in value_columns]
        log_table = pa.Table.from_arrays(arrays, names=value_columns)
    else:
        log_table = pa.table({})
    key_codes = {f.name: np.asarray([enc.code(int(i)) for i in ids] + [0], dtype=np.int64) for f, enc in key_fields}
    return ItemSnapshot(ids, {int(i): k for k, i in enumerate(ids)}, encoded, log_table, marker, time.time(), key_codes)


# ---- the scorer -------------------------------------------------------------------------------------------------
@dataclass
class Ranked:
    """One request's result: probabilities in request order, the stage timings (seconds) and what the log needs."""

    scores: np.ndarray
    timings: dict[str, float]
    user_values: dict[str, Any]
    rows: np.ndarray
    snapshot: ItemSnapshot


class OnlineScorer:
    """The fast path of `rank` for one worker: see the module docstring.

    `store`: a Feast FeatureStore; `service`: the feature service the model was trained on; `to_arrow(name, values)`:
    how the request log converts a column (its declared types), None without a request log; `to_constant(name,
    value, n)`: how it holds one value shared by n rows (`RequestLogger.constant`; None: `to_arrow` of the value,
    run-end encoded); `refresh_s`: how often
    the materialisation marker is checked (0: never, the snapshot of the start is kept).
    """

    def __init__(
        self,
        store: Any,
        service: str,
        model: torch.nn.Module,
        encoder: FeatureEncoder,
        *,
        refresh_s: float = 30.0,
        to_arrow: Callable[..., pa.Array] | None = None,
        to_constant: Callable[[str, Any, int], pa.Array] | None = None,
        on_refresh: Callable[[ItemSnapshot], None] | None = None,
    ):
        from ctrflow import features

        self.store, self.service, self.model, self.encoder = store, service, model.eval(), encoder
        self.to_arrow, self.to_constant, self.on_refresh, self.refresh_s = to_arrow, to_constant, on_refresh, float(refresh_s)
        spec = encoder.spec
        _, columns = features._service(store, service)
        self.user_columns = [(view, name, t) for view, name, t in columns if view in USER_VIEWS]
        self.user_refs = [f"{view}:{name}" for view, name, _ in self.user_columns]
        item_columns = {name for view, name, _ in columns if view == ITEM_VIEW}
        user_columns = {name for _, name, _ in self.user_columns}
        self.item_fields: list[FieldSpec] = []
        self.user_fields: list[tuple[FieldSpec, ValueEncoder]] = []
        self.key_fields: list[tuple[FieldSpec, ValueEncoder]] = []  # the item key: looked up per candidate
        self.scenario_codes: dict[str, dict[str, torch.Tensor]] = {s: {} for s in spec.scenarios}
        for f in spec.fields:
            if f.column == spec.item_key:
                self.key_fields.append((f, ValueEncoder(encoder, f)))
            elif f.column in item_columns:
                self.item_fields.append(f)
            elif f.column == spec.user_key or f.column in user_columns:
                self.user_fields.append((f, ValueEncoder(encoder, f)))
            elif f.column == spec.scenario_field:
                enc = ValueEncoder(encoder, f)
                for s in spec.scenarios:
                    self.scenario_codes[s][f.name] = torch.from_numpy(enc(s)).unsqueeze(0)
            else:
                raise KeyError(
                    f"field '{f.name}' (column '{f.column}'): served by no view of feature service '{service}' "
                    f"(item view columns {sorted(item_columns)}, user view columns {sorted(user_columns)})"
                )
        self._log_columns = columns  # the request log's feature columns, in online_frame's order
        # batch(): the one-code fields (a [] code per request) in one block, the rest (sequences, vectors) one by one
        self._scalar_fields = [(f, e) for f, e in self.user_fields if f.kind in (FieldKind.CATEGORICAL, FieldKind.NUMERIC)]
        self._vector_fields = [(f, e) for f, e in self.user_fields if f.kind not in (FieldKind.CATEGORICAL, FieldKind.NUMERIC)]
        scenario_names = list(next(iter(self.scenario_codes.values()), {}))
        self._scenario_ints = {s: [int(codes[name].reshape(-1)[0]) for name in scenario_names] for s, codes in self.scenario_codes.items()}
        self._scalar_names = [f.name for f, _ in self._scalar_fields] + scenario_names
        self.log_order = ("event_timestamp", *(name for _, name, _ in columns))  # log_ranked's `columns`
        self._user_log_names = tuple(name for view, name, _ in columns if view != ITEM_VIEW)
        self._item_log_names = [name for view, name, _ in columns if view == ITEM_VIEW]
        self._views = self._direct_views()
        self._provider = self.store._get_provider() if self._views is not None else None
        self.snapshot = build_snapshot(store, service, encoder, self.item_fields, to_arrow, self.key_fields)
        self.refreshes = 0
        self.refresh_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.refresh_s > 0:
            self._thread = threading.Thread(target=self._watch, name="item-cache-refresh", daemon=True)
            self._thread.start()

    # ---- refresh -------------------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Build a new snapshot when the materialisation marker changed (or `force`) and swap it in; True if swapped."""
        if not force and materialization_marker(self.store.repo_path) == self.snapshot.marker:
            return False
        started = time.perf_counter()
        snapshot = build_snapshot(self.store, self.service, self.encoder, self.item_fields, self.to_arrow, self.key_fields)
        self.snapshot = snapshot  # one reference assignment: a request in flight keeps the snapshot it read
        self.refreshes += 1
        log.info(
            "item cache: %d items from the materialisation of %s (built in %.2fs)",
            len(snapshot.ids), snapshot.marker, time.perf_counter() - started,
        )  # fmt: skip
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep serving the last good snapshot; retried next period
                self.refresh_errors += 1
                log.exception("item cache: refresh failed; still serving the snapshot of %s", self.snapshot.marker)
            if self.on_refresh is not None:
                self.on_refresh(self.snapshot)

    def close(self) -> None:
        self._stop.set()

    # ---- scoring -------------------------------------------------------------------------------------------
    def _direct_views(self) -> list[tuple[Any, list[str]]] | None:
        """(feature view, feature names) per user view when the provider can be read directly: views without a TTL
        (so no age filter applies) keyed by the user key alone; None otherwise (read through get_online_features)."""
        views = []
        try:
            for view in USER_VIEWS:
                names = [name for v, name, _ in self.user_columns if v == view]
                if not names:
                    continue
                fv = self.store.get_feature_view(view)
                if (fv.ttl and fv.ttl.total_seconds() > 0) or list(fv.join_keys) != [self.encoder.spec.user_key]:
                    return None
                views.append((fv, names))
        except Exception:  # noqa: BLE001 - any doubt: the public API
            return None
        return views

    def read_user(self, user_id: int) -> dict[str, Any]:
        """The user's online features (one entity), normalised as `online_frame` holds them.

        The provider's online_read per user view (the store's own read, without get_online_features' request
        planning: ~0.05 ms instead of ~0.5 ms on SQLite) when `_direct_views` allows; else get_online_features."""
        from feast.type_map import feast_value_type_to_python_type

        if not self.user_refs:
            return {}
        if self._views is not None:
            from feast.protos.feast.types.EntityKey_pb2 import EntityKey
            from feast.protos.feast.types.Value_pb2 import Value

            key = EntityKey(join_keys=[self.encoder.spec.user_key], entity_values=[Value(int64_val=int(user_id))])
            raw: dict[str, Any] = {}
            for fv, names in self._views:
                _, values = self._provider.online_read(config=self.store.config, table=fv, entity_keys=[key], requested_features=names)[0]
                for name in names:
                    v = (values or {}).get(name)
                    raw[name] = None if v is None else feast_value_type_to_python_type(v)
        else:
            proto = self.store.get_online_features(features=self.user_refs, entity_rows=[{self.encoder.spec.user_key: int(user_id)}]).proto
            results = dict(zip(proto.metadata.feature_names.val, proto.results))
            raw = {name: feast_value_type_to_python_type(results[name].values[0]) for _, name, _ in self.user_columns}
        return {name: normalise_value(name, t, raw[name]) for _, name, t in self.user_columns}

    def batch(self, user_id: int, user: dict[str, Any], scenario: str, item_ids: list[int], snapshot: ItemSnapshot) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The model's input tensors for one request ([n, ...] per field) and the candidates' snapshot rows."""
        n = len(item_ids)
        rows = snapshot.rows(item_ids)
        index = torch.from_numpy(rows)
        batch: dict[str, torch.Tensor] = {}
        for f in self.item_fields:
            batch[f.name] = snapshot.encoded[f.name].index_select(0, index)
        outside = np.flatnonzero(rows == len(snapshot.ids))  # ids the snapshot does not hold: looked up one by one
        for f, enc in self.key_fields:
            codes = snapshot.key_codes[f.name][rows]
            for k in outside:
                codes[k] = enc.code(item_ids[k])
            batch[f.name] = torch.from_numpy(codes)
        values = {**user, self.encoder.spec.user_key: int(user_id)}
        # the request's one-code fields (the user's categorical / numeric ones, the scenario's) as one [k, n] block:
        # a row per field, each a contiguous [n] view (one copy instead of four torch calls per field)
        scalars = self._scalar_fields
        codes = np.empty(len(self._scalar_names), dtype=np.int64)
        for j, (f, enc) in enumerate(scalars):
            codes[j] = enc.scalar(values.get(f.column))
        for j, code in enumerate(self._scenario_ints[scenario], start=len(scalars)):
            codes[j] = code
        block = torch.from_numpy(np.repeat(codes[:, None], n, axis=1))
        for j, name in enumerate(self._scalar_names):
            batch[name] = block[j]
        for f, enc in self._vector_fields:
            one = torch.from_numpy(enc(values.get(f.column))).unsqueeze(0)
            batch[f.name] = one.expand(n, *one.shape[1:]).contiguous()
        return batch, rows

    def rank_scores(self, user_id: int, scenario: str, item_ids: list[int]) -> Ranked:
        """Click probabilities (float32, request order) for one request, with per-stage timings (seconds)."""
        t0 = time.perf_counter()
        snapshot = self.snapshot
        user = self.read_user(user_id)
        t1 = time.perf_counter()
        batch, rows = self.batch(user_id, user, scenario, item_ids, snapshot)
        t2 = time.perf_counter()
        with torch.inference_mode():
            scores = torch.sigmoid(self.model(batch)).float().numpy()
        t3 = time.perf_counter()
        timings = {"feature_read": t1 - t0, "encode": t2 - t1, "model": t3 - t2}
        return Ranked(scores, timings, user, rows, snapshot)

    def log_values(self, ranked: Ranked, ts_us: int) -> dict[str, Any]:
        """The request's own feature values as served, for `RequestLogger.log_ranked` (`features`): the event time
        (`ts_us`, microseconds since the epoch) and the user's features, in `log_order`."""
        values: dict[str, Any] = {"event_timestamp": EPOCH + dt.timedelta(microseconds=ts_us)}  # aware: UTC
        user = ranked.user_values
        for name in self._user_log_names:
            values[name] = user.get(name)
        return values

    def log_items(self, ranked: Ranked) -> ItemRows:
        """The candidates' item features as served, by reference (`RequestLogger.log_ranked`'s `items`): their rows
        of the snapshot's log batch (row N: an item the store does not hold, all missing)."""
        batch = ranked.snapshot.log_batch
        if batch.num_columns != len(self._item_log_names):  # the snapshot holds other columns too: the logged ones
            batch = batch.select(self._item_log_names)
        return ItemRows(batch, ranked.rows)

    def log_features(self, ranked: Ranked, user_id: int, item_ids: list[int], scenario: str) -> pa.Table:
        """The request's features as served, one row per candidate (user_id, item_id, scenario, then
        `online_frame`'s columns): what a challenger scores. The request log itself takes `log_values` and
        `log_items`. Needs `to_arrow`. A value shared by every candidate (the user's features, user_id, scenario,
        event_timestamp) is a run-end encoded column of one run (`request_log.constant`; `request_log.dense` gives
        the plain table)."""
        assert self.to_arrow is not None, "OnlineScorer: log_features needs to_arrow"
        n = len(item_ids)
        now = pa.array([time.time_ns() // 1000], pa.timestamp("us", tz="UTC"))  # UTC microseconds, no cast per request
        names = ["user_id", "item_id", "scenario", "event_timestamp"]
        arrays = [
            constant(int(user_id), pa.int64(), n, cache=False),
            pa.array(np.asarray(item_ids, dtype=np.int64)),
            constant(scenario, pa.string(), n),
            constant(now, None, n),
        ]
        items = ranked.snapshot.log_batch.take(pa.array(ranked.rows))
        for view, name, _ in self._log_columns:
            if view == ITEM_VIEW:
                arrays.append(items.column(name))
            elif self.to_constant is not None:  # the user's value once
                arrays.append(self.to_constant(name, ranked.user_values.get(name), n))
            else:  # the user's value once, converted as a column: the dtype online_frame's column would have
                v = ranked.user_values.get(name)
                if isinstance(v, list | np.ndarray) or v is None:
                    cell = np.empty(1, dtype=object)
                    cell[0] = v
                else:
                    cell = np.asarray([v])
                arrays.append(constant(self.to_arrow(name, cell), None, n))
            names.append(name)
        return pa.Table.from_arrays(arrays, names=names)
