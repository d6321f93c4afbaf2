"""The serving request log: every ranked candidate, with the features it was scored on and its score.

It is what drift monitoring compares with the training data, and what a later training run can join labels to,
so it keeps the features *as served* (lists and vectors as Parquet lists), not a re-computation.

Layout: a directory of Parquet part files ``part-<utc time>-<pid>-<seq>.parquet``, one row per (request, candidate).
Each worker process writes its own parts, so several workers never share a file; a part is written under a hidden
temporary name and renamed, so a reader (``read_request_log``, ``pd.read_parquet(dir)``, DuckDB, Spark) never sees
half a file. Rows are buffered in memory and flushed by a background thread when ``flush_rows`` rows are waiting or
every ``flush_seconds``, and on ``close()`` (the service's shutdown hook; also registered with ``atexit``).

Column types come from the model's feature spec (``schema_for_spec``), so every part file has the same schema even
when a part only holds unknown users (all-null user features) and a directory reads back as one table.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ctrflow.data.spec import FeatureSpec, FieldKind

log = logging.getLogger(__name__)

BASE_COLUMNS = ("request_id", "ts", "user_id", "item_id", "scenario", "model")
BASE_TYPES = {
    "request_id": pa.string(),
    "ts": pa.timestamp("us", tz="UTC"),
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "scenario": pa.string(),
    "model": pa.string(),
    "rank": pa.int32(),
    "prediction": pa.float32(),
    "fallback_user": pa.bool_(),
    "fallback_item": pa.bool_(),
}


def _value_type(values: list | None) -> pa.DataType | None:
    """Arrow type of a vocabulary's values (ints, floats or strings); None when it cannot tell."""
    for v in values or []:
        if isinstance(v, bool):
            return pa.bool_()
        if isinstance(v, (int, np.integer)):
            return pa.int64()
        if isinstance(v, (float, np.floating)):
            return pa.float64()
        if isinstance(v, str):
            return pa.string()
    return None


def schema_for_spec(spec: FeatureSpec, vocabs: dict[str, list] | None = None) -> dict[str, pa.DataType]:
    """Arrow types per feature column: numeric → float64, embedding → list<float32>, categorical and sequence → the
    type of their vocabulary's values (int64 or string), when the fitted vocabularies are given."""
    vocabs = vocabs or {}
    types: dict[str, pa.DataType] = {}
    for f in spec.fields:
        if f.kind is FieldKind.NUMERIC:
            types[f.column] = pa.float64()
        elif f.kind is FieldKind.EMBEDDING:
            types[f.column] = pa.list_(pa.float32())
        elif f.kind is FieldKind.CATEGORICAL:
            t = _value_type(vocabs.get(f.name))
            if t is not None:
                types[f.column] = t
        else:  # SEQUENCE
            t = _value_type(vocabs.get(f.vocab_of or f.name))
            if t is not None:
                types[f.column] = pa.list_(t)
    return types


def _is_missing(v: Any) -> bool:
    return v is None or (np.isscalar(v) and pd.isna(v))


def _to_arrow(name: str, col: pd.Series, type_: pa.DataType | None) -> pa.Array:
    """One column as Arrow: list cells as lists, the declared type when it fits, else inferred (with a warning)."""
    values: Any = col
    if col.dtype == object:
        values = [None if _is_missing(v) else (v.tolist() if isinstance(v, np.ndarray) else v) for v in col]
    if type_ is None:
        return pa.array(values, from_pandas=True)
    try:
        return pa.array(values, type=type_, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        log.warning("request log: column '%s' does not fit %s (%s); its type is inferred", name, type_, exc)
        return pa.array(values, from_pandas=True)


class RequestLogger:
    """Buffered, thread-safe Parquet writer of served requests (one per worker process)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        column_types: dict[str, pa.DataType] | None = None,
        flush_rows: int = 2000,
        flush_seconds: float = 5.0,
    ):
        if flush_rows < 1 or flush_seconds <= 0:
            raise ValueError(f"RequestLogger: flush_rows must be >= 1 and flush_seconds > 0 (got {flush_rows}, {flush_seconds})")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.types = {**BASE_TYPES, **(column_types or {})}
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._rows = 0
        self._seq = 0
        self._lock = threading.Lock()  # guards the buffer
        self._write_lock = threading.Lock()  # one writer at a time
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="request-log-flush", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ---- writing ---------------------------------------------------------------------------------------
    def log_request(
        self,
        *,
        request_id: str,
        user_id: int,
        scenario: str,
        model: str,
        features: pd.DataFrame,
        predictions: np.ndarray,
        item_ids: list[int] | None = None,
        ts: dt.datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Buffer one request: a row per candidate with its features (as served) and prediction.

        `extra` maps column names to a scalar or a per-candidate sequence (e.g. rank, fallback flags).
        """
        n = len(features)
        if len(predictions) != n:
            raise ValueError(f"request log: {n} feature rows but {len(predictions)} predictions")
        if item_ids is not None and len(item_ids) != n:
            raise ValueError(f"request log: {n} feature rows but {len(item_ids)} item ids")
        entry = {
            "request_id": request_id,
            "ts": ts or dt.datetime.now(dt.UTC),
            "user_id": int(user_id),
            "item_id": item_ids,
            "scenario": scenario,
            "model": model,
            "features": features,
            "prediction": predictions,
            "extra": extra or {},
        }
        with self._lock:  # only a reference is kept here: the frame is built off the request path, at flush
            if self._closed:
                raise RuntimeError(f"request log {self.directory} is closed")
            self._buffer.append(entry)
            self._rows += n
            full = self._rows >= self.flush_rows
        if full:
            self._wake.set()

    @staticmethod
    def _rows_of(entry: dict[str, Any]) -> pd.DataFrame:
        features: pd.DataFrame = entry["features"].reset_index(drop=True)
        ts = pd.Timestamp(entry["ts"])
        base = {
            "request_id": entry["request_id"],
            "ts": ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC"),
            "user_id": entry["user_id"],
            "item_id": np.asarray(entry["item_id"] if entry["item_id"] is not None else features["item_id"], dtype=np.int64),
            "scenario": entry["scenario"],
            "model": entry["model"],
        }
        rows = pd.concat(
            [pd.DataFrame(base, index=features.index), features.drop(columns=[c for c in BASE_COLUMNS if c in features.columns])],
            axis=1,
        )
        rows["prediction"] = np.asarray(entry["prediction"], dtype=np.float32)
        for key, value in entry["extra"].items():
            rows[key] = value
        return rows

    def flush(self) -> Path | None:
        """Write what is buffered as one part file now; returns its path (None when nothing was buffered)."""
        with self._write_lock:
            with self._lock:
                buffer, self._buffer, self._rows = self._buffer, [], 0
            if not buffer:
                return None
            frame = pd.concat([self._rows_of(e) for e in buffer], ignore_index=True)
            table = pa.Table.from_arrays(
                [_to_arrow(c, frame[c], self.types.get(c)) for c in frame.columns], names=[str(c) for c in frame.columns]
            )
            self._seq += 1
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
            name = f"part-{stamp}-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:6]}.parquet"
            tmp = self.directory / f".{name}.tmp"
            pq.write_table(table, tmp)
            path = self.directory / name
            os.replace(tmp, path)
            log.debug("request log: %d rows -> %s", table.num_rows, path)
            return path

    def close(self) -> None:
        """Stop the flusher and write what is left (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        atexit.unregister(self.close)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a full disk must not kill serving; the rows stay lost but the error is logged
                log.exception("request log: flush to %s failed", self.directory)
            if self._closed:
                return

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_request_log(directory: str | Path) -> pd.DataFrame:
    """Every logged row of a request-log directory, oldest first (an empty frame when nothing was flushed yet)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"request log: {directory} is not a directory")
    parts = sorted(p for p in directory.rglob("part-*.parquet") if not p.name.startswith("."))
    if not parts:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "prediction"])
    frame = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)
