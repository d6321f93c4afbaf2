"""The serving request log: every ranked candidate, with the features it was scored on and its score.

It is what drift monitoring compares with the training data, and what a later training run can join labels to,
so it keeps the features *as served* (lists and vectors as Parquet lists), not a re-computation.

Durability: an answered request is on disk before its response is sent. `log_request` appends the request's rows to
the worker's own segment file (``_segments/seg-<utc>-<pid>-<id>.arrows``) with one ``write()`` before it returns, so
a kill -9 of the worker (or an out-of-memory kill) loses nothing that was answered: the bytes are in the kernel's
page cache and reach the disk without the process (``fsync=True`` also survives a power loss, at a cost per request).
A record is one Arrow IPC stream (schema + one batch) framed as ``magic | length | crc32 | payload``, so a record cut
short by a crash mid-write is detected and dropped, never misread. A value that is the same on every row of a request
(its id, time, user, scenario, model, the user's features) is held once in the record, as a run-end encoded column of
one run (~8 KB a record for 100 candidates instead of ~60 KB with the user's history repeated per row).

The serving worker writes a cheaper record (`log_ranked`, issue 10): the request's own values as one JSON array
(orjson) and its per-candidate values as raw arrays (item ids, predictions, ranks, flags), with the candidates' item
features *by reference*: a row index into the worker's item snapshot. The rows a record names are written into the
same segment before it (an item frame: Arrow IPC, each row once per segment; a table of up to 256 KB
whole, once), and the columns' names and types once per segment (a layout frame: an Arrow schema). A segment is
thus read alone, and a record is on disk only after everything it names (same write, in order). It costs ~30 us a
request in-process instead of ~230 us for `log_request`'s Arrow table (100 candidates), and compaction decodes a
segment's records a column at a time. Once compacted (or read back) its rows equal `log_request`'s for the same
request (tests/test_request_log_ranked.py).

Compaction: the segment is rotated every ``flush_seconds`` or ``flush_rows`` rows and the closed one is compacted
into a Parquet part ``part-<utc>-<pid>-<id>.parquet`` (written under a hidden temporary name, fsynced and renamed,
then the segment is deleted); a part is named after its segment, so compacting one twice writes the same file, never
duplicate rows. A part holds **one row per request** (layout version 2, in the schema's ``ctrflow.request_log``
metadata with its candidate columns and candidate-row count): the request's own values once (ids, time, scenario,
model, the user's features) and each per-candidate value (item id and features, prediction, rank) as a list in
candidate order. Repeating the user's history on each of 100 rows was half of a part's write time and, with the
expansion, most of compaction's CPU; a compactor's CPU on the serving machine showed as a p99 tail (issue 10).
`read_request_log`, `read_part` and monitoring's `read_current` give one row per candidate (`explode`), and read
parts written before (a row per candidate, no metadata) as they are. Any other Parquet reader sees the service's
log as an ordinary data set of request rows (``pd.read_parquet(dir)``; DuckDB ``SELECT request_id, unnest(item_id),
unnest(prediction) FROM 'dir/*.parquet'``; Spark ``arrays_zip`` + ``explode``); ``_segments`` is skipped by all of
them. Which columns are lists is declared by the writer, not guessed from values: a column logged once per request
(`constant`, as the service logs the user's features) is a scalar, any other a list, so the service's parts share one
schema. A folder that also holds parts of the earlier layout, or of a writer that logged a user's value per
candidate, has parts of two schemas: `read_request_log` and `read_current` read them as one table, other readers
per file.
Who compacts (``compaction``):

- ``"process"`` (what the service uses): a compactor process per writer (``python -m ctrflow.request_log compact``,
  ``run_compactor``), at a lower CPU priority, woken through a pipe at each rotation. A rotated segment is unlocked
  and compacted there, off the serving process: in a thread, compaction's Python work held the worker's GIL for
  milliseconds every ``flush_rows`` rows and showed as a ~5 ms p99 tail (issue 10; benchmarks/results/serving.md).
  The compactor exits when its writer closes the pipe, also on a kill -9 of the writer, after a last pass.
- ``"thread"``: a background thread of the writer's process compacts (no child process; tests, notebooks).

A live writer holds an exclusive flock on its open segment (a segment is created under a hidden name, locked, then
renamed into place, so no reader ever sees it unlocked); whoever compacts takes that lock first, so a segment is
compacted once. At start (``recover_request_log``) segments nobody holds (rotated, or left by a crashed worker) are
compacted and hidden temporary files of dead compactions and segment openings are removed. A graceful stop
(``close()``, the service's shutdown hook) compacts everything; a request answered after that is still written (to a
new segment, recovered at the next start), never refused.

A backlog of rows waiting for compaction beyond ``max_backlog_rows`` (compaction falling behind, or failing) is
counted (``backlog_full``) and warned about: the rows are safe in their segments. `stats()` has every counter; with
``metrics=True`` they are also Prometheus counters on the worker's ``/metrics`` (``ctrflow_request_log_*``).

``read_request_log`` reads the compacted parts and the segments not compacted yet, with ids kept int64 (an int
column with missing values becomes pandas' nullable Int64, never float64: an id of 2^63-1 survives).

Column types come from the model's feature spec (``schema_for_spec``), so the service's parts share one schema even
when a part only holds unknown users (all-null user features) and a directory reads back as one table.
"""

from __future__ import annotations

import atexit
import datetime as dt
import fcntl
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
    # shadow serving (ctrflow.shadow), present only while a challenger is attached: its tag and its score, per row
    "shadow_model": pa.string(),
    "shadow_score": pa.float32(),
}
SEGMENTS = "_segments"  # a leading underscore: Parquet dataset readers skip it
SEGMENT_SUFFIX = ".arrows"
DAMAGED_PREFIX = "damaged-"  # a segment that cannot be decoded, set aside by its compaction (never retried)
OPENING_SUFFIX = ".opening"  # a segment being created: hidden (.seg-...) until it is locked and renamed
COMPACTION_MODES = ("process", "thread")
COMPACTOR_NICE = 10  # the compactor process yields the CPU to serving; it catches up when requests leave room
COMPACTOR_PERIOD_S = 5.0  # the compactor also looks for unheld segments this often without being woken
LAYOUT_KEY = b"ctrflow.request_log"  # a part's schema metadata: its layout (`_nest`)
LAYOUT_VERSION = 2  # 1 (no metadata): a row per candidate; 2: a row per request, candidate columns as lists
STALE_OPENING_S = 60.0  # a segment still being opened after this long belongs to a writer that died doing it
COMPACTOR_WAIT_S = 30.0  # close/flush wait this long for a segment another process is compacting, then leave it
MAGIC = b"CFRL"  # a record: one request as an Arrow IPC stream (`log_request`)
FAST_MAGIC = b"CFRF"  # a record: one request's values, JSON and raw arrays (`log_ranked`)
LAYOUT_MAGIC = b"CFRS"  # the columns and types of `log_ranked` records (an Arrow schema), once per segment
ITEMS_MAGIC = b"CFRI"  # item rows that `log_ranked` records name (Arrow IPC), each once per segment
HEADER = struct.Struct("<4sQI")  # magic, payload length, crc32 of the payload
JSON_LENGTH = struct.Struct("<I")
FAST_KEY = b"ctrflow.fast"  # a layout frame's schema metadata: which columns are per request, per candidate, items
ITEMS_KEY = b"ctrflow.items"  # an item frame's schema metadata: the generation (the item table) its rows belong to
ITEM_ROW = "__row"  # an item frame's row index into its item table
WHOLE_ITEM_TABLE_BYTES = 256 * 1024  # an item table up to this size is written whole, once per segment
MAX_LAYOUTS = 256  # log_ranked record layouts kept per writer
COUNTERS = (
    "requests", "rows", "write_errors", "late_requests", "compactions", "compacted_rows", "compaction_errors",
    "backlog_full", "recovered_segments", "recovered_rows", "torn_records", "damaged_segments",
)  # fmt: skip


class RequestLogError(OSError):
    """A request could not be written to the request log (the message says where and why)."""



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


def _missing_cell(v: Any) -> bool:
    """None, NaN or pd.NA in an object cell (cheap: this runs per cell on the request path)."""
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _list_array(values: np.ndarray, type_: pa.DataType) -> pa.Array | None:
    """A list column from object cells (numpy arrays, lists, None/NaN) without a Python object per element: one
    concatenation and an offsets array. None when the cells do not fit `type_` (the caller falls back)."""
    n = len(values)
    missing = np.fromiter(map(_missing_cell, values), dtype=bool, count=n)
    present = list(values[~missing]) if missing.any() else list(values)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[~missing] = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    try:
        flat = np.concatenate(present) if present and lengths.any() else np.array([])
        child = pa.array(flat, type=type_.value_type, from_pandas=True)
        if isinstance(child, pa.ChunkedArray):  # what pa.array gives for an empty float array as strings
            child = child.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), child, type=type_, mask=pa.array(missing) if missing.any() else None)


def _to_arrow(name: str, col: pd.Series | np.ndarray | list, type_: pa.DataType | None) -> pa.Array:
    """One column as Arrow, the declared type when it fits, else inferred (with a warning). Vectorised where it can
    be: numeric and datetime columns go straight through, list cells are concatenated, strings are converted by
    Arrow; a Python pass per cell only when that fails (this runs on the request path)."""
    if isinstance(col, pd.Series) and col.dtype != object:
        values: Any = col
    else:
        values = col.to_numpy() if isinstance(col, pd.Series) else col
        if isinstance(values, np.ndarray) and values.dtype == object and type_ is not None and pa.types.is_list(type_):
            out = _list_array(values, type_)
            if out is not None:
                return out
    try:
        return pa.array(values, type=type_, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        pass
    if isinstance(values, np.ndarray) and values.dtype == object:  # numpy cells, odd scalars: one pass, then retry
        values = [None if _missing_cell(v) else (v.tolist() if isinstance(v, np.ndarray) else v) for v in values]
    if type_ is None:
        return pa.array(values, from_pandas=True)
    try:
        return pa.array(values, type=type_, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        log.warning("request log: column '%s' does not fit %s (%s); its type is inferred", name, type_, exc)
        return pa.array(values, from_pandas=True)


_RUN_ENDS: dict[int, pa.Array] = {}  # [n] as int32, per request size n (a few distinct sizes)
# one-row arrays of repeated scalars (the model tag, scenarios, a user's gender or age...): Arrow arrays are immutable,
# so one can back every request's column. Bounded in entries (the oldest goes first, one at a time: clearing all at
# once cost ~1 ms on the request that did it) and in size (strings up to _SCALAR_MAX_CHARS)
_SCALARS: dict[tuple[type, Any, pa.DataType | None], pa.Array] = {}
_SCALARS_MAX = 4096
_SCALAR_MAX_CHARS = 256


def constant(value: Any, type_: pa.DataType | None, n: int, *, cache: bool = True) -> pa.Array:
    """`value` on each of n rows as a run-end encoded array of one run (the value is held once, whatever n); its
    values' type `type_` (inferred when None; numpy and NaN cells as `_to_arrow` converts them). `dense` expands it.
    `cache`: keep the one-row array of a str (up to 256 characters) / int / bool value for the next request (False
    for values that rarely repeat, such as request and user ids)."""
    if isinstance(value, pa.ChunkedArray):  # pa.array of a float NaN as string, e.g., gives one
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        one = value
    elif cache and type(value) in (str, int, bool) and not (type(value) is str and len(value) > _SCALAR_MAX_CHARS):
        key = (type(value), value, type_)  # exact types: True and 1 are equal keys but other arrays
        one = _SCALARS.get(key)
        if one is None:
            while len(_SCALARS) >= max(_SCALARS_MAX, 1):
                _SCALARS.pop(next(iter(_SCALARS)))  # the oldest entry (dicts keep insertion order)
            one = _SCALARS[key] = _scalar_array(value, type_)
    else:
        one = _scalar_array(value, type_)
    if n == 0:
        return one.slice(0, 0)
    ends = _RUN_ENDS.get(n)
    if ends is None:
        ends = _RUN_ENDS.setdefault(n, pa.array([n], pa.int32()))
    # from_buffers: what from_arrays builds, without its validation (one run of a one-row array is valid by design)
    return pa.Array.from_buffers(pa.run_end_encoded(pa.int32(), one.type), n, [None], children=[ends, one])


def _scalar_array(value: Any, type_: pa.DataType | None) -> pa.Array:
    """A one-row Arrow array of `value`, as `_to_arrow` converts a column holding it (declared type when it fits)."""
    if type_ is not None and not isinstance(value, np.ndarray | np.generic):
        if isinstance(value, float) and value != value:
            return pa.nulls(1, type_)  # NaN: missing, as from_pandas reads it
        try:  # from_pandas (NaN as null) only where a list may hold one: it costs a pass through pandas' shim
            return pa.array([value], type=type_, from_pandas=isinstance(value, list))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            pass
    if isinstance(value, list | np.ndarray) or value is None:
        cell = np.empty(1, dtype=object)
        cell[0] = value
    else:
        cell = np.asarray([value])
    return _to_arrow("", cell, type_)


def dense(table: pa.Table) -> pa.Table:
    """`table` with its run-end encoded columns (`constant`) expanded to plain arrays of their values' type."""
    for k, column in enumerate(table.columns):
        if pa.types.is_run_end_encoded(column.type):
            table = table.set_column(k, table.field(k).name, pc.run_end_decode(column))
    return table


# ---- segments: framing, reading, compaction -------------------------------------------------------------------
def _framed(magic: bytes, payload: bytes) -> bytes:
    """One frame of a segment: `magic | length | crc32 | payload` (a frame cut short by a crash is detected)."""
    return HEADER.pack(magic, len(payload), zlib.crc32(payload)) + payload


def _ipc_stream(data: pa.Table | pa.RecordBatch) -> bytes:
    """`data` as one Arrow IPC stream (its schema, then its batches)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return sink.getvalue().to_pybytes()


def _frame(table: pa.Table) -> bytes:
    """A `log_request` record: the request's table as one framed IPC stream."""
    return _framed(MAGIC, _ipc_stream(table))


@dataclass(frozen=True)
class _Nested:
    """`log_ranked` records of one layout, already as request rows (`_nest`'s output): one row per request with at
    least one candidate; `candidate_columns` are lists in candidate order."""

    table: pa.Table
    candidate_columns: list[str]


def _read_records(path: Path | int) -> tuple[list[pa.RecordBatch | _Nested], int]:
    """The records of a segment as written, from a path or an open file descriptor read from its start, and the
    number of bytes after the last whole frame (a record torn by a crash, or one being appended right now).

    A `log_request` record is one batch per request (its per-request values run-end encoded); consecutive
    `log_ranked` records of one layout are decoded together into one `_Nested` (`_decode_fast`), with the layout and
    item frames that precede them in the segment."""
    if isinstance(path, int):
        data = os.pread(path, os.fstat(path).st_size, 0)
    else:
        data = Path(path).read_bytes()
    view = memoryview(data)  # slices without copies
    records: list[pa.RecordBatch | _Nested] = []
    pos = 0
    schema, schema_bytes = None, None
    layouts: dict[int, pa.Schema] = {}
    items: dict[int, list[pa.RecordBatch]] = {}
    fast: list[tuple[int, int, list, memoryview]] = []  # a run of log_ranked records of one layout

    def end_run() -> None:
        if fast:
            nested = _decode_fast(layouts[fast[0][0]], fast, items)
            if nested is not None:
                records.append(nested)
            fast.clear()

    while pos + HEADER.size <= len(data):
        magic, length, crc = HEADER.unpack_from(data, pos)
        start, end = pos + HEADER.size, pos + HEADER.size + length
        if magic not in (MAGIC, FAST_MAGIC, LAYOUT_MAGIC, ITEMS_MAGIC) or end > len(data) or zlib.crc32(view[start:end]) != crc:
            break
        pos = end
        if magic == FAST_MAGIC:
            (size,) = JSON_LENGTH.unpack_from(data, start)
            sid, gen, n, values = orjson.loads(view[start + JSON_LENGTH.size : start + JSON_LENGTH.size + size])
            if fast and fast[0][0] != sid:
                end_run()
            if sid not in layouts:
                raise ValueError(f"request log: a record names layout {sid}, which its segment does not hold")
            fast.append((sid, gen, n, values, view[start + JSON_LENGTH.size + size : end]))
            continue
        payload = pa.py_buffer(view[start:end])
        if magic == LAYOUT_MAGIC:
            layout = pa.ipc.read_schema(payload)
            layouts[json.loads(layout.metadata[FAST_KEY])["sid"]] = layout
            continue
        if magic == ITEMS_MAGIC:
            batch = pa.ipc.open_stream(payload).read_all().combine_chunks().to_batches()
            if batch:
                items.setdefault(int(batch[0].schema.metadata[ITEMS_KEY]), []).append(batch[0])
            continue
        end_run()
        stream = pa.BufferReader(payload)
        message = pa.ipc.read_message(stream)  # the record's schema: parsed once while it repeats (2.4x faster)
        if schema_bytes is None or not message.metadata.equals(schema_bytes):
            schema, schema_bytes = pa.ipc.read_schema(message), message.metadata
        batches = []
        try:
            while True:  # until the end-of-stream marker (EOFError); usually exactly one record batch
                message = pa.ipc.read_message(stream)
                if message.type != "record batch":  # a dictionary batch (a categorical column): the full reader
                    batches = pa.ipc.open_stream(payload).read_all().to_batches()
                    break
                batches.append(pa.ipc.read_record_batch(message, schema))
        except EOFError:
            pass
        if len(batches) != 1:  # a request written as several batches (chunked columns), or none (no candidate)
            table = pa.Table.from_batches(batches, schema=schema).combine_chunks()
            batches = table.to_batches() or [pa.RecordBatch.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)]
        records.append(batches[0])  # one batch per request: _nest counts a request per record
    end_run()
    return records, len(data) - pos


def _fast_scalars(name: str, values: list, type_: pa.DataType) -> pa.Array:
    """One per-request column of `log_ranked` records, as `constant` converts each value (declared type when it
    fits; NaN and None missing; timestamps as microseconds since the epoch, UTC)."""
    if pa.types.is_timestamp(type_):  # microseconds, whatever unit the column is declared in
        return pa.array(values, pa.int64()).cast(pa.timestamp("us", tz=type_.tz)).cast(type_, safe=False)
    if pa.types.is_floating(type_) and any(type(v) is str for v in values):  # +-Infinity (JSON has none)
        values = [float(v) if type(v) is str else v for v in values]
    cells = np.empty(len(values), dtype=object)
    for k, v in enumerate(values):  # element-wise: a list value must stay one cell
        cells[k] = v
    return _to_arrow(name, cells, None if pa.types.is_null(type_) else type_)


def _decode_fast(layout: pa.Schema, run: list[tuple[int, int, int, list, memoryview]], items: dict[int, list[pa.RecordBatch]]) -> _Nested | None:
    """`log_ranked` records of one layout -> request rows, a column at a time for the whole run: the per-request
    values as one array each, the per-candidate arrays concatenated into lists, the item columns taken from the item
    frames by row. None when no record has a candidate. Raises ValueError when a record names an item row that no
    frame before it holds (a damaged segment)."""
    meta = json.loads(layout.metadata[FAST_KEY])
    run = [r for r in run if r[2]]
    if not run:
        return None
    counts = np.fromiter((r[2] for r in run), dtype=np.int64, count=len(run))
    offsets = np.zeros(len(run) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    offsets_array = pa.array(offsets)
    columns: dict[str, pa.Array] = {}
    for k, name in enumerate(meta["request"]):
        columns[name] = _fast_scalars(name, [r[3][k] for r in run], layout.field(name).type)
    arrays = [(name, np.dtype(layout.field(name).type.to_pandas_dtype())) for name in meta["candidate"]]
    if meta["items"]:
        arrays.append((ITEM_ROW, np.dtype(np.int32)))
    parts: dict[str, list[np.ndarray]] = {name: [] for name, _ in arrays}
    for _, _, n, _, buf in run:
        at = 0
        for name, dtype in arrays:
            parts[name].append(np.frombuffer(buf, dtype=dtype, count=n, offset=at))
            at += n * dtype.itemsize
    for name, _ in arrays[: len(meta["candidate"])]:
        flat = pa.array(np.concatenate(parts[name]), type=layout.field(name).type, from_pandas=True)  # NaN: missing
        columns[name] = pa.ListArray.from_arrays(offsets_array, flat)
    if meta["items"]:
        rows = parts[ITEM_ROW]
        index = np.empty(int(offsets[-1]), dtype=np.int64)
        frames, base = [], 0
        for gen in sorted({r[1] for r in run}):
            held = items.get(gen, [])
            where = np.full(max((int(pc.max(b.column(ITEM_ROW)).as_py()) for b in held), default=-1) + 1, -1, dtype=np.int64)
            for b in held:
                where[b.column(ITEM_ROW).to_numpy()] = base + np.arange(b.num_rows)
                base += b.num_rows
            frames += held
            for k, r in enumerate(run):
                if r[1] != gen:
                    continue
                got = where[rows[k]] if rows[k].size == 0 or int(rows[k].max()) < len(where) else np.full(rows[k].size, -1)
                if (got < 0).any():
                    raise ValueError(f"request log: a record names item rows of generation {gen} that no item frame holds")
                index[offsets[k] : offsets[k + 1]] = got
        table = pa.Table.from_batches(frames).combine_chunks()
        take = pa.array(index)
        for name in meta["items"]:
            columns[name] = pa.ListArray.from_arrays(offsets_array, table.column(name).take(take).combine_chunks())
    order = layout.names
    per_candidate = set(meta["candidate"]) | set(meta["items"])
    return _Nested(pa.Table.from_arrays([columns[c] for c in order], names=order), [c for c in order if c in per_candidate])


def _runs(records: list[pa.RecordBatch | _Nested]) -> list[list[pa.RecordBatch] | _Nested]:
    """Consecutive records of one schema (the usual case: a whole segment), so each run is converted at once; a
    `_Nested` (decoded already) is a run of its own."""
    runs: list[list[pa.RecordBatch] | _Nested] = []
    for record in records:
        if isinstance(record, _Nested):
            runs.append(record)
        elif runs and isinstance(runs[-1], list) and record.schema.equals(runs[-1][0].schema):
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


def _read_segment(path: Path | int) -> tuple[list[pa.Table], int]:
    """The rows of a segment, one per candidate (`dense`: per-request values repeated), as a table per run of
    records of one schema, and the torn byte count (`_read_records`)."""
    records, torn = _read_records(path)
    tables = [
        explode(run.table, {"candidate_columns": run.candidate_columns}) if isinstance(run, _Nested) else dense(pa.Table.from_batches(run))
        for run in _runs(records)
    ]
    return tables, torn


# ---- parts: one row per request ----------------------------------------------------------------------------------
def _nest(records: list[pa.RecordBatch | _Nested]) -> list[tuple[pa.Table, list[str]]]:
    """Records -> request rows: one row per request; a column whose value is the same for all of a request's
    candidates in every record (a run-end encoded run, `constant`) stays a scalar, every other column becomes a
    list of the request's per-candidate values (the part's metadata names them; `explode` undoes it). Records with no
    candidate hold no row and are left out. Returns (table, candidate columns) per run of records of one schema."""
    runs = _runs([r for r in records if isinstance(r, _Nested) or r.num_rows])
    per_candidate: set[str] = set()
    prepared: list[Any] = []
    for run in runs:
        if isinstance(run, _Nested):  # log_ranked records: request rows already
            per_candidate.update(run.candidate_columns)
            prepared.append(run)
            continue
        table = pa.Table.from_batches(run)
        offsets = np.zeros(len(run) + 1, dtype=np.int32)
        np.cumsum(np.fromiter((r.num_rows for r in run), dtype=np.int64, count=len(run)), out=offsets[1:])
        scalars: dict[str, pa.Array] = {}
        for name, col in zip(table.column_names, table.columns):
            if not pa.types.is_run_end_encoded(col.type):
                per_candidate.add(name)
                continue
            merged = pa.concat_arrays(col.chunks)  # one run per record when each held its request's value once
            ends = merged.run_ends.to_numpy()
            if merged.offset == 0 and len(ends) == len(run) and len(merged.values) == len(run) and np.array_equal(ends, offsets[1:]):
                scalars[name] = merged.values
            else:
                per_candidate.add(name)
        prepared.append((table, pa.array(offsets), scalars))
    out = []
    for item in prepared:
        if isinstance(item, _Nested):  # a column per candidate in another run: its value repeated per candidate
            table, own = item.table, set(item.candidate_columns)
            lengths = pc.list_value_length(table.column("item_id")).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            repeat = pa.array(np.repeat(np.arange(len(lengths)), lengths))
            for k, name in enumerate(table.column_names):
                if name in per_candidate and name not in own:
                    values = table.column(name).combine_chunks().take(repeat)
                    table = table.set_column(k, name, pa.ListArray.from_arrays(pa.array(offsets), values))
            out.append((table, [n for n in table.column_names if n in per_candidate]))
            continue
        table, offsets, scalars = item
        columns = []
        for name, col in zip(table.column_names, table.columns):
            if name in per_candidate:
                flat = pc.run_end_decode(col) if pa.types.is_run_end_encoded(col.type) else col
                columns.append(pa.ListArray.from_arrays(offsets, flat.combine_chunks()))
            else:
                columns.append(scalars[name])
        out.append((pa.Table.from_arrays(columns, names=table.column_names), [n for n in table.column_names if n in per_candidate]))
    return out


def part_layout(schema: pa.Schema | None) -> dict | None:
    """The request-row layout's metadata of a part's schema, None for a part of one row per candidate (written
    before request rows, or any other Parquet)."""
    raw = (schema.metadata or {}).get(LAYOUT_KEY) if schema is not None else None
    return json.loads(raw) if raw else None


def _length_column(layout: dict, names: list[str]) -> str | None:
    """The candidate column (among `names`) that gives each request's candidate count: the item id where read."""
    candidates = layout["candidate_columns"]
    return next((c for c in ("item_id", *candidates) if c in candidates and c in names), None)


def read_columns(layout: dict | None, names: list[str], columns: list[str] | None) -> tuple[list[str], list[str]]:
    """For a part with schema `names`: (the requested columns it has, the columns to read for them): a request-row
    part also needs one candidate column to know how many rows each request explodes into."""
    need = list(names) if columns is None else [c for c in columns if c in names]
    length = _length_column(layout, names) if layout is not None else None
    return need, need + ([length] if length is not None and length not in need else [])


def explode(table: pa.Table, layout: dict | None = None) -> pa.Table:
    """A part's request rows (`_nest`) back to one row per candidate, in request order: scalars repeated over the
    request's candidates, lists flattened; the metadata dropped. A table without the layout is returned as it is.
    Raises ValueError when a request's lists disagree in length (a damaged part)."""
    layout = layout if layout is not None else part_layout(table.schema)
    if layout is None:
        return table
    per_candidate = set(layout["candidate_columns"]) & set(table.column_names)
    length_col = _length_column(layout, table.column_names)
    if length_col is None:
        raise ValueError(f"request log: a request-row part needs one of its candidate columns to be read ({layout['candidate_columns']})")
    first = table.column(length_col).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(first), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    repeat = pa.array(np.repeat(np.arange(table.num_rows, dtype=np.int64), lengths))
    columns = []
    for name, col in zip(table.column_names, table.columns):
        col = col.combine_chunks()
        if name not in per_candidate:
            columns.append(col.take(repeat))
            continue
        if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
            raise ValueError(f"request log: candidate column '{name}' of a request-row part is {col.type}, not a list")
        own = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if (own[valid] != lengths[valid]).any():
            bad = int((own[valid] != lengths[valid]).sum())
            raise ValueError(f"request log: column '{name}' has a candidate count unlike '{length_col}' in {bad} request rows")
        flat = col.flatten()  # the values of the valid lists, in order
        if valid.all():
            columns.append(flat)
        else:  # a column absent from some requests' records: null on each of their candidates
            row_valid = np.repeat(valid, lengths)
            index = np.zeros(len(row_valid), dtype=np.int64)
            index[row_valid] = np.arange(int(row_valid.sum()))
            columns.append(flat.take(pa.array(index, mask=~row_valid)))
    return pa.Table.from_arrays(columns, names=table.column_names)


def part_rows(path: Path) -> int:
    """Candidate rows in a part, from its footer alone."""
    meta = pq.read_metadata(path)
    layout = part_layout(meta.schema.to_arrow_schema())
    return int(layout["rows"]) if layout is not None else meta.num_rows


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A part as one row per candidate, whichever its layout (`explode`)."""
    pf = pq.ParquetFile(path)
    layout = part_layout(pf.schema_arrow)
    if layout is None:
        return pf.read(columns=columns)
    need, read = read_columns(layout, pf.schema_arrow.names, columns)
    return explode(pf.read(columns=read), layout).select(need)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table from tables whose schemas differ only in all-null or absent columns (the usual case)."""
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


def _stem(path: Path) -> str:
    """seg-X.arrows, part-X.parquet and .part-X.parquet.<pid>.tmp all share the stem X."""
    name = path.name.lstrip(".")
    for prefix in ("seg-", "part-"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.split(".")[0]


def _part_path(directory: Path, stem: str) -> Path:
    return directory / f"part-{stem}.parquet"


def _leaf(name: str, type_: pa.DataType) -> tuple[str, pa.DataType]:
    """A column's Parquet leaf: its path (a list's values are `<name>.list.element`) and its values' type."""
    while pa.types.is_list(type_) or pa.types.is_large_list(type_):
        name, type_ = f"{name}.list.element", type_.value_type
    return name, type_


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaves a part dictionary-encodes: all but lists of floats (embeddings, and a request's
    per-candidate scores), whose values almost never repeat, so a dictionary only costs time (-28% of a DMAE part's
    write time, the same size; measured in the closing note of issue 10)."""
    leaves = [(f.type, *_leaf(f.name, f.type)) for f in schema]
    return [path for type_, path, leaf in leaves if not (pa.types.is_list(type_) and pa.types.is_floating(leaf))]


def _write_part(directory: Path, stem: str, records: list[pa.RecordBatch]) -> tuple[Path | None, int]:
    """Compact a segment's records into part-<stem>.parquet, one row per request (`_nest`; hidden temporary file,
    fsync, rename); (path, candidate rows)."""
    nested = _nest(records)
    if not nested:
        return None, 0
    try:
        per_candidate = sorted({c for _, cols in nested for c in cols})
        groups = [(_concat([t for t, _ in nested]), per_candidate)]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # a column changed type between requests: one part per schema
        log.warning("request log: records of %s do not share one schema (%s); written as several parts", stem, exc)
        by_schema: dict[pa.Schema, list[tuple[pa.Table, list[str]]]] = {}
        for t, cols in nested:
            by_schema.setdefault(t.schema, []).append((t, cols))
        groups = [(_concat([t for t, _ in g]), g[0][1]) for g in by_schema.values()]
    path = None
    rows = 0
    # the extra parts first, part-<stem> last: once it exists, every part of the segment does (`complete_parts`)
    for k, (table, per_candidate) in reversed(list(enumerate(groups))):
        n = int(pc.sum(pc.list_value_length(table.column("item_id"))).as_py() or 0) if "item_id" in per_candidate else table.num_rows
        layout = {"layout": "request", "version": LAYOUT_VERSION, "candidate_columns": per_candidate, "rows": n}
        table = table.combine_chunks().replace_schema_metadata({LAYOUT_KEY: json.dumps(layout)})
        path = _part_path(directory, stem if k == 0 else f"{stem}_{k}")
        tmp = directory / f".{path.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, use_dictionary=_dictionary_columns(table.schema))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        rows += n
    return path, rows


def complete_parts(files: list[str] | list[Path]) -> list:
    """`files` (Parquet part paths) without the extra parts (part-<stem>_<k>) of a segment whose part-<stem> is not
    among them: a compaction that stopped between them; the segment is still on disk and is read instead."""
    names = {Path(f).name for f in files}
    out = []
    for f in files:
        stem = _stem(Path(f))
        base, sep, k = stem.rpartition("_")
        if sep and k.isdigit() and f"part-{base}.parquet" not in names:
            continue
        out.append(f)
    return out


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _compact_held(directory: Path, seg: Path, fd: int, counts: Callable[[str, int], None] | None = None) -> tuple[Path | None, int] | None:
    """Compact a segment whose lock the caller holds on `fd` into its part and delete it: (part path or None when it
    held no whole record, rows); None when it was deleted already (compacted by someone else before our lock).
    `counts(name, n)` is told about torn_records, compactions and compacted_rows. The caller closes `fd` after."""
    if os.fstat(fd).st_nlink == 0:  # compacted and deleted between our open and our lock
        return None
    stem = _stem(seg)
    part = _part_path(directory, stem)
    if part.exists():  # compacted before, deleting the segment did not happen: never write it twice
        rows = part_rows(part)
    else:
        try:
            tables, torn = _read_records(fd)
            if torn:
                log.warning("request log: %s ends with %d bytes of a record cut short by a crash; dropped", seg, torn)
                if counts is not None:
                    counts("torn_records", 1)
            part, rows = _write_part(directory, stem, tables)
        except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:  # not a full disk: retrying cannot help
            damaged = seg.with_name(f"{DAMAGED_PREFIX}{seg.name[len('seg-'):]}")
            os.replace(seg, damaged)  # out of every reader's and compactor's way (they take seg-*), kept to inspect
            log.error("request log: %s cannot be compacted (%s: %s); moved to %s, its rows are not read", seg, type(exc).__name__, exc, damaged)
            if counts is not None:
                counts("damaged_segments", 1)
            return None, 0
    seg.unlink(missing_ok=True)
    if counts is not None:
        counts("compactions", 1)
        counts("compacted_rows", rows)
    return part, rows


def compact_segment(directory: Path, seg: Path, *, wait_s: float = 0.0, counts: Callable[[str, int], None] | None = None) -> tuple[Path | None, int] | None:
    """Compact one segment that no writer holds into its part and delete it (`_compact_held`). None when it is held
    (by a writer, or by another compactor right now) or gone already. `wait_s`: how long to wait for a held
    segment's lock first (a flush that wants its rows on disk; a segment held longer, e.g. by a forked child that
    inherited it, is left for a later pass)."""
    try:
        fd = os.open(seg, os.O_RDONLY)
    except FileNotFoundError:  # compacted by someone else meanwhile
        return None
    try:
        deadline = time.monotonic() + wait_s
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        return _compact_held(directory, seg, fd, counts)
    finally:
        os.close(fd)  # releases the lock only once the segment is gone


def compact_unheld(directory: str | Path, counts: Callable[[str, int], None] | None = None) -> int:
    """One pass over a request-log folder: every segment no writer holds (rotated, or left by a stopped worker)
    compacted (`compact_segment`); returns the rows compacted. `counts(name, n)`: compactions, compacted_rows,
    compaction_errors, torn_records. A segment that fails to compact stays (logged, counted) for the next pass."""
    directory = Path(directory)
    total = 0
    for seg in sorted((directory / SEGMENTS).glob(f"seg-*{SEGMENT_SUFFIX}")):
        try:
            done = compact_segment(directory, seg, counts=counts)
        except Exception:  # noqa: BLE001 - a full disk: the rows stay in the segment, retried next pass
            log.exception("request log: compacting %s failed; its rows stay there", seg)
            if counts is not None:
                counts("compaction_errors", 1)
            continue
        if done is not None:
            total += done[1]
    return total


def recover_request_log(directory: str | Path) -> int:
    """Compact the segments no live writer holds (left by a killed worker, or rotated and not compacted yet) and
    remove hidden temporary files of dead compactions and segment openings; returns the number of rows compacted.
    Safe while other workers write to (and compact) the same folder."""
    directory = Path(directory)
    seg_dir = directory / SEGMENTS
    recovered = 0
    if seg_dir.is_dir():
        recovered = compact_unheld(directory)
        if recovered:
            log.warning("request log: compacted %d rows that no writer held (a stopped worker's, or rotated)", recovered)
        for opening in seg_dir.glob(f".seg-*{OPENING_SUFFIX}"):  # a writer died between creating and renaming
            try:
                if time.time() - opening.stat().st_mtime < STALE_OPENING_S:
                    continue  # maybe a writer between its create and its lock right now
                fd = os.open(opening, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd):
                    opening.unlink(missing_ok=True)
            finally:
                os.close(fd)
    for tmp in directory.glob(".part-*.tmp"):
        seg = seg_dir / f"seg-{_stem(tmp)}{SEGMENT_SUFFIX}"
        if seg.exists():
            try:
                fd = os.open(seg, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            if fd is not None:
                try:
                    if not _try_lock(fd):
                        continue  # its compaction may be running right now
                finally:
                    os.close(fd)
        tmp.unlink(missing_ok=True)
        log.warning("request log: removed %s, a temporary file of a compaction that did not finish", tmp.name)
    return recovered


def run_compactor(directory: str | Path, wake: int, *, period_s: float = COMPACTOR_PERIOD_S, metrics: bool = False, nice: int = COMPACTOR_NICE) -> int:
    """The compactor process's loop (``compaction="process"``): compact every unheld segment of `directory` each time
    a byte arrives on the file descriptor `wake` (the writer's pipe: one byte per rotation) and every `period_s`
    seconds; after the writer closes the pipe (or dies: end of file), one last pass, then return the rows compacted.
    SIGTERM and SIGINT are ignored: a stopping server signals its whole process group, and this process must outlive
    its writer's last rotation. `metrics`: Prometheus counters (in a BentoML worker's multiprocess folder, inherited
    through the environment, they show on the worker's /metrics)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    # one Arrow thread: a background job must not fan out over the cores that serve requests
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    prometheus = _prometheus_counters() if metrics else None

    def counts(name: str, n: int) -> None:
        if prometheus is not None and n:
            prometheus[name].inc(n)

    total = 0
    while True:
        readable, _, _ = select.select([wake], [], [], period_s)
        end = bool(readable) and not os.read(wake, 65536)
        total += compact_unheld(directory, counts)
        if end:
            return total


# ---- the writer ------------------------------------------------------------------------------------------------
_PROMETHEUS: dict[str, Any] = {}
_LIVE: weakref.WeakSet[RequestLogger] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing's default start on Linux, a worker pool) must not keep its parent's segment
    locks or the compactor's pipe open: the compactor would never see end of file, nor `close()` get the segment."""
    for logger in list(_LIVE):
        logger._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _prometheus_counters() -> dict[str, Any]:
    """ctrflow_request_log_<counter>_total, created once per process (in a BentoML worker: after it set up
    multiprocess metrics, so they show on /metrics)."""
    if not _PROMETHEUS:
        import prometheus_client

        for name in COUNTERS:
            _PROMETHEUS[name] = prometheus_client.Counter(
                f"ctrflow_request_log_{name}", f"ctrflow request log: {name.replace('_', ' ')}"
            )
    return _PROMETHEUS


@dataclass(frozen=True)
class ItemRows:
    """The candidates' item features by reference, for `RequestLogger.log_ranked`: candidate k's values are row
    `rows[k]` of `table` (e.g. a serving worker's item snapshot, one row per item). The rows a request names are
    written into the segment once, the first time one of its records names them; the table's identity tells one
    snapshot from the next (a new table object: its rows are written again)."""

    table: pa.RecordBatch
    rows: np.ndarray  # [n] int, candidate order


@dataclass(frozen=True)
class _FastLayout:
    """The columns of one shape of `log_ranked` record: per-request names (in the record's value order), per-candidate
    arrays (name, numpy dtype), item columns, and the layout frame that declares them (written once per segment)."""

    sid: int
    request: tuple[str, ...]
    arrays: tuple[tuple[str, np.dtype], ...]
    items: tuple[str, ...]
    frame: bytes


def _is_timestamp(value: Any) -> bool:
    return isinstance(value, dt.datetime | np.datetime64)


def _epoch_us(value: Any) -> int | None:
    """A datetime (naive: UTC) or numpy datetime64 as microseconds since the epoch."""
    if isinstance(value, np.datetime64):
        return None if np.isnat(value) else int(value.astype("datetime64[us]").astype(np.int64))
    if value.tzinfo is None:  # naive: its wall-clock time, as Arrow stores a naive timestamp
        value = value.replace(tzinfo=dt.UTC)
    return (value - EPOCH) // dt.timedelta(microseconds=1)


def _json_default(value: Any) -> Any:
    """What orjson cannot write itself: numpy arrays it does not take (strings, strided), pandas' missing values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # log_ranked records a timestamp as microseconds since EPOCH
_TIMESTAMP = pa.timestamp("us", tz="UTC")


class RequestLogger:
    """Durable, thread-safe request log writer (one per worker process): see the module docstring.

    `flush_rows` / `flush_seconds`: compact the current segment into a Parquet part after this many rows / seconds.
    `compaction`: "process" (a compactor process, off this process's GIL) or "thread" (a thread of this process);
    see the module docstring. With "process", compactions, compacted_rows, compaction_errors and torn_records are
    counted by the compactor (its Prometheus counters), not in `stats()`, except for what `flush`/`close` compact here.
    `max_backlog_rows`: rows waiting for compaction above which `backlog_full` is counted and warned about.
    `fsync`: fsync each request's write (power-loss safe; a kill -9 is survived without it).
    `metrics`: also count in Prometheus counters (`ctrflow_request_log_*_total`) for the worker's /metrics.
    `recover`: compact leftovers of crashed workers in `directory` first (`recover_request_log`).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        column_types: dict[str, pa.DataType] | None = None,
        flush_rows: int = 2000,
        flush_seconds: float = 5.0,
        max_backlog_rows: int = 1_000_000,
        fsync: bool = False,
        metrics: bool = False,
        recover: bool = True,
        compaction: str = "thread",
    ):
        if flush_rows < 1 or flush_seconds <= 0 or max_backlog_rows < 1:
            raise ValueError(
                f"RequestLogger: flush_rows and max_backlog_rows must be >= 1 and flush_seconds > 0 "
                f"(got {flush_rows}, {max_backlog_rows}, {flush_seconds})"
            )
        if compaction not in COMPACTION_MODES:
            raise ValueError(f"RequestLogger: compaction must be one of {', '.join(COMPACTION_MODES)} (got '{compaction}')")
        self.compaction = compaction
        self.metrics = metrics
        self.directory = Path(directory)
        self.segments = self.directory / SEGMENTS
        self.segments.mkdir(parents=True, exist_ok=True)
        self.types = {**BASE_TYPES, **(column_types or {})}
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_backlog_rows = max_backlog_rows
        self.fsync = fsync
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._prometheus = _prometheus_counters() if metrics else None
        self._lock = threading.Lock()  # the current segment
        self._count_lock = threading.Lock()
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._fd: int | None = None
        self._seg: Path | None = None
        self._seg_rows = 0
        self._opened_at = 0.0
        self._closed_segments: list[tuple[Path, int, int]] = []  # thread: rotated, still locked: (path, fd, rows)
        self._handed: list[tuple[Path, int]] = []  # process: rotated and unlocked, for the compactor: (path, rows)
        self._compactor: subprocess.Popen | None = None
        # log_ranked: record layouts, and what the current segment holds already (layout frames, item rows)
        self._layouts: dict[tuple, _FastLayout] = {}
        self._seg_layouts: set[int] = set()
        self._items_table: pa.RecordBatch | None = None
        self._items_gen = 0
        self._items_seen: np.ndarray | None = None  # per row of _items_table: written into the current segment
        self._items_whole = False  # _items_table is small: written whole, once per segment
        self._next_sid = 0
        self._wake = threading.Event()
        self._closed = False
        if recover:
            self._count("recovered_rows", recover_request_log(self.directory))
        if compaction == "process":
            self._start_compactor()
        self._thread = threading.Thread(target=self._run, name="request-log-compactor", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        _LIVE.add(self)

    def _forget_in_child(self) -> None:
        """In a forked child: close the inherited segment descriptors and the compactor's pipe (no lock is taken: a
        lock held by another thread at the fork stays held forever in the child); the child writes nothing here."""
        fds = [self._fd, *(fd for _, fd, _ in self._closed_segments)]
        self._fd, self._closed_segments, self._handed, self._closed = None, [], [], True
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        child, self._compactor = self._compactor, None
        if child is not None and child.stdin is not None:
            try:
                child.stdin.close()
            except OSError:
                pass

    # ---- counters --------------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        if not n:
            return
        with self._count_lock:
            self.counts[name] += n
        if self._prometheus is not None:
            self._prometheus[name].inc(n)

    def stats(self) -> dict[str, int]:
        """Every counter (requests, rows, write_errors, late_requests, compactions, compacted_rows,
        compaction_errors, backlog_full, recovered_segments, recovered_rows, torn_records) plus `backlog_rows`: rows
        written but not yet compacted into Parquet."""
        with self._lock:
            self._handed = [(seg, rows) for seg, rows in self._handed if seg.exists()]
            backlog = self._seg_rows + sum(r for _, _, r in self._closed_segments) + sum(r for _, r in self._handed)
        with self._count_lock:
            return {**self.counts, "backlog_rows": backlog}

    # ---- writing ---------------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"seg-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
        opening = self.segments / f".{name}{OPENING_SUFFIX}"
        fd = os.open(opening, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)  # read back at compaction
        path = self.segments / name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we write: a compactor leaves a held segment alone
            os.rename(opening, path)  # visible only once locked: a compactor never takes a segment being opened
        except OSError:
            os.close(fd)
            raise
        self._fd, self._seg, self._seg_rows, self._opened_at = fd, path, 0, time.monotonic()
        self._seg_layouts = set()  # a segment is read alone: it holds its own layout and item frames
        if self._items_seen is not None:
            self._items_seen[:] = False

    # ---- the compactor process (compaction="process") -----------------------------------------------------
    def _start_compactor(self) -> None:
        cmd = [sys.executable, "-m", "ctrflow.request_log", "compact", str(self.directory)]
        if self.metrics:
            cmd.append("--metrics")
        self._compactor = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)

    def _wake_compactor(self) -> None:
        """One byte down the compactor's pipe; a compactor that died is started again (its segments wait on disk)."""
        child = self._compactor
        if child is None or child.poll() is not None:
            if child is not None:
                log.warning("request log: the compactor process exited with %s; starting another", child.returncode)
            self._start_compactor()
            child = self._compactor
        try:
            child.stdin.write(b"\n")
            child.stdin.flush()
        except (OSError, ValueError):  # it died since the poll: the next rotation starts another
            pass

    def _stop_compactor(self, timeout: float = 30.0) -> None:
        child, self._compactor = self._compactor, None
        if child is None:
            return
        try:
            child.stdin.close()  # end of file: its last pass, then it exits
        except OSError:
            pass
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("request log: the compactor did not finish in %.0fs; stopping it (its segments stay on disk)", timeout)
            child.kill()
            child.wait(timeout=10)

    def log_request(
        self,
        *,
        request_id: str,
        user_id: int,
        scenario: str,
        model: str,
        features: pd.DataFrame | pa.Table,
        predictions: np.ndarray,
        item_ids: list[int] | None = None,
        ts: dt.datetime | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write one request durably before returning: a row per candidate with its features (as served) and its
        prediction. `extra` maps column names to a scalar or a per-candidate sequence (e.g. rank, fallback flags).

        Raises ValueError for mismatched lengths, RequestLogError when the write fails (counted in write_errors):
        the caller must not answer as if the request had been logged.
        """
        n = len(features)
        if len(predictions) != n:
            raise ValueError(f"request log: {n} feature rows but {len(predictions)} predictions")
        if item_ids is not None and len(item_ids) != n:
            raise ValueError(f"request log: {n} feature rows but {len(item_ids)} item ids")
        table = self._table_of(request_id, ts, user_id, item_ids, scenario, model, features, predictions, extra or {})
        record = _frame(table)
        with self._lock:
            if self._fd is None:
                self._open_segment_or_fail(request_id)
            self._append(record, n, request_id)

    def log_ranked(
        self,
        *,
        request_id: str,
        user_id: int,
        scenario: str,
        model: str,
        item_ids: Sequence[int] | np.ndarray,
        predictions: np.ndarray,
        features: Mapping[str, Any],
        items: ItemRows | None = None,
        columns: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        ts_us: int | None = None,
    ) -> None:
        """`log_request` for a serving worker's request, ~5x cheaper: the same rows once compacted (and read back),
        written as the request's values (JSON) and raw arrays instead of an Arrow table per request, with the item
        features by reference (`ItemRows`: the rows written once per segment, not once per request).

        `features`: the request's own feature values, one per column (the user's features, an event timestamp as a
        datetime / numpy datetime64); `items`: the candidates' item features; `columns`: the order of the feature
        columns (`features` then the item columns when None); `extra`: scalars, or per-candidate 1-D numeric arrays
        or lists of numbers and None (rank, fallback flags, a challenger's scores); `ts_us`: the request's time,
        microseconds since the epoch (now when None). Column types as `log_request` gives them: declared ones
        (`column_types`), else the first value's. NaN and None are missing, as in `log_request`; an infinite value
        inside a list feature is logged as missing (JSON has no infinity), a top-level one as itself.

        Raises ValueError for mismatched lengths or an extra that is neither, RequestLogError when the write fails."""
        n = len(item_ids)
        if len(predictions) != n:
            raise ValueError(f"request log: {n} candidates but {len(predictions)} predictions")
        rows = None
        if items is not None:
            rows = np.asarray(items.rows)
            if len(rows) != n:
                raise ValueError(f"request log: {n} candidates but {len(rows)} item rows")
            if n and (rows.dtype.kind not in "iu" or int(rows.min()) < 0 or int(rows.max()) >= items.table.num_rows):
                raise ValueError(f"request log: item rows must be integers within the item table's {items.table.num_rows} rows")
            rows = rows.astype(np.int32)
        extra = dict(extra or {})
        scalars, arrays = [], []
        for key, value in extra.items():
            if isinstance(value, str) or np.isscalar(value) or value is None:
                scalars.append(key)
                continue
            if len(value) != n:
                raise ValueError(f"request log: extra column '{key}' has {len(value)} values for {n} candidates")
            array = np.asarray(value)
            if array.dtype.kind == "O":  # numbers and None: None is missing (NaN, as log_request reads it)
                try:
                    array = np.asarray(value, dtype=np.float64)
                except (TypeError, ValueError):
                    array = None
            if array is None or array.dtype.kind not in "biuf" or array.ndim != 1:
                raise ValueError(f"request log: extra column '{key}' must be a scalar or one number per candidate (log_request takes any other)")
            extra[key] = array
            arrays.append(key)
        # a column without a declared type takes its first value's: a value of another Python type is another layout
        undeclared = tuple(type(v) for k, v in features.items() if k not in self.types)
        shape = (
            tuple(features), tuple(scalars), tuple((k, extra[k].dtype) for k in arrays), undeclared,
            tuple(type(extra[k]) for k in scalars if k not in self.types),
            None if items is None else items.table.schema, None if columns is None else tuple(columns),
        )  # fmt: skip
        values: list[Any] = [request_id, time.time_ns() // 1000 if ts_us is None else int(ts_us), int(user_id), scenario, model]
        for value in (*features.values(), *(extra[k] for k in scalars)):
            if isinstance(value, float | np.floating) and value in (np.inf, -np.inf):
                value = "Infinity" if value > 0 else "-Infinity"  # JSON has no infinity; read back as floats
            elif _is_timestamp(value):
                value = _epoch_us(value)
            values.append(value)
        with self._lock:  # one layout id per shape, and the frames a record names written before it, in one write
            layout = self._layouts.get(shape)
            if layout is None:
                layout = self._fast_layout(shape, features, items, columns, extra, scalars, arrays)
            buffers = [np.asarray(item_ids, dtype=np.int64), np.asarray(predictions, dtype=np.float32)]
            buffers += [np.ascontiguousarray(extra[key], dtype=dtype) for key, dtype in layout.arrays[2:]]
            gen = None
            if items is not None:
                gen = self._item_generation(items)
                buffers.append(rows)
            try:
                record = orjson.dumps([layout.sid, gen, n, values], default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)
            except TypeError as exc:  # orjson.JSONEncodeError: a value that has no JSON form
                raise ValueError(f"request log: request {request_id}: a value cannot be logged ({exc})") from None
            if self._fd is None:
                self._open_segment_or_fail(request_id)
            chunks = [] if layout.sid in self._seg_layouts else [layout.frame]
            new = None
            if items is not None:
                frame, new = self._item_frame(items, rows)
                if frame is not None:
                    chunks.append(frame)
            payload = b"".join([JSON_LENGTH.pack(len(record)), record, *(b.data for b in buffers)])
            chunks.append(_framed(FAST_MAGIC, payload))
            self._append(b"".join(chunks), n, request_id)
            # only once written: a failed write closes the segment (the next one starts with nothing written)
            self._seg_layouts.add(layout.sid)
            if new is not None:
                self._items_seen[new] = True

    def _fast_layout(
        self, shape: tuple, features: Mapping[str, Any], items: ItemRows | None, columns: Sequence[str] | None,
        extra: Mapping[str, Any], scalars: list[str], arrays: list[str],
    ) -> _FastLayout:  # fmt: skip
        """A new `log_ranked` record shape: its columns' types (declared, else the first value's) and layout frame."""
        item_names = tuple(items.table.schema.names) if items is not None else ()
        feature_order = list(columns) if columns is not None else [*features, *item_names]
        if sorted(feature_order) != sorted([*features, *item_names]):
            raise ValueError(f"request log: columns {feature_order} are not the features {list(features)} and item columns {list(item_names)}")
        names = ["request_id", "ts", "user_id", "item_id", "scenario", "model", *feature_order, "prediction", *extra]
        if len(set(names)) != len(names):
            raise ValueError(f"request log: a column is named twice among {names}")
        types: dict[str, pa.DataType] = {name: BASE_TYPES[name] for name in ("request_id", "ts", "user_id", "item_id", "scenario", "model", "prediction")}
        for key in [*features, *scalars]:
            value = features[key] if key in features else extra[key]
            declared = self.types.get(key)
            if declared is not None:
                types[key] = declared
            elif _is_timestamp(value):  # an aware datetime as UTC; numpy's and naive ones stay naive, as Arrow reads them
                types[key] = _TIMESTAMP if isinstance(value, dt.datetime) and value.tzinfo is not None else pa.timestamp("us")
            else:
                try:
                    types[key] = pa.null() if value is None else _scalar_array(value, None).type
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    raise ValueError(f"request log: column '{key}': its type cannot be told from {value!r} ({exc})") from None
        dtypes = [("item_id", np.dtype(np.int64)), ("prediction", np.dtype(np.float32))]
        for key in arrays:
            declared = self.types.get(key)
            if declared is None or not (pa.types.is_integer(declared) or pa.types.is_floating(declared) or pa.types.is_boolean(declared)):
                given = np.asarray(extra[key])
                declared = pa.from_numpy_dtype(given.dtype if given.dtype.kind in "biuf" else np.dtype(np.float64))
            types[key] = declared
            dtypes.append((key, np.dtype(declared.to_pandas_dtype())))
        for key in item_names:
            types[key] = items.table.schema.field(key).type
        sid, self._next_sid = self._next_sid, self._next_sid + 1
        if len(self._layouts) >= MAX_LAYOUTS:  # shapes that keep changing (tables with other metadata...): bounded
            self._layouts.clear()
        meta = {"sid": sid, "request": ["request_id", "ts", "user_id", "scenario", "model", *features, *scalars],
                "candidate": [k for k, _ in dtypes], "items": list(item_names)}  # fmt: skip
        schema = pa.schema([pa.field(name, types[name]) for name in names], metadata={FAST_KEY: json.dumps(meta)})
        frame = _framed(LAYOUT_MAGIC, schema.serialize().to_pybytes())
        layout = _FastLayout(sid, tuple(meta["request"]), tuple(dtypes), item_names, frame)
        self._layouts[shape] = layout
        return layout

    def _item_generation(self, items: ItemRows) -> int:
        """The generation of `items.table` (a new table object: its rows are written anew); under the lock."""
        if items.table is not self._items_table:
            self._items_table, self._items_gen = items.table, self._items_gen + 1
            self._items_seen = np.zeros(items.table.num_rows, dtype=bool)
            self._items_whole = items.table.nbytes <= WHOLE_ITEM_TABLE_BYTES
        return self._items_gen

    def _item_frame(self, items: ItemRows, rows: np.ndarray) -> tuple[bytes | None, np.ndarray | None]:
        """(an item frame of the rows the current segment does not hold yet, those rows), or (None, None); under the
        lock. A small table (`WHOLE_ITEM_TABLE_BYTES`) is written whole, once per segment: one frame in all."""
        seen = self._items_seen
        if self._items_whole:
            new = np.arange(items.table.num_rows, dtype=np.int32) if seen.size and not seen[0] else rows[:0]
        else:
            new = np.unique(rows[~seen[rows]])
        if not new.size:
            return None, None
        batch = items.table.take(pa.array(new)) if len(new) < items.table.num_rows else items.table
        batch = batch.append_column(ITEM_ROW, pa.array(new)).replace_schema_metadata({ITEMS_KEY: str(self._items_gen)})
        return _framed(ITEMS_MAGIC, _ipc_stream(batch)), new

    def _open_segment_or_fail(self, request_id: str) -> None:
        try:
            self._open_segment()
        except OSError as exc:
            self._count("write_errors")
            raise RequestLogError(f"request log {self.directory}: request {request_id} not written: {exc}") from exc

    def _append(self, data: bytes, n: int, request_id: str) -> None:
        """Write one request's bytes to the open segment (the lock held); a failed write closes the segment, so
        the torn bytes end it and the next request starts a new one."""
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._count("write_errors")
            self._rotate_locked()
            raise RequestLogError(f"request log {self.directory}: request {request_id} not written: {exc}") from exc
        self._seg_rows += n
        self._count("requests")
        self._count("rows", n)
        if self._closed:
            self._count("late_requests")
        if self._seg_rows >= self.flush_rows and not self._closed:
            self._wake.set()

    def _table_of(
        self, request_id: str, ts: dt.datetime | None, user_id: int, item_ids: list[int] | None, scenario: str,
        model: str, features: pd.DataFrame | pa.Table, predictions: np.ndarray, extra: dict[str, Any],
    ) -> pa.Table:  # fmt: skip
        """The request's rows as Arrow, column by column (no intermediate pandas frame): base columns, the features
        as served, the prediction, then `extra` (scalars repeated, sequences per candidate)."""
        n = len(features)
        if ts is None:
            stamp = dt.datetime.now(dt.UTC)
        else:
            stamp = pd.Timestamp(ts)
            stamp = stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp
            stamp = pa.array([stamp.to_datetime64().astype("datetime64[us]")], pa.timestamp("us")).cast(BASE_TYPES["ts"])
        ids = np.asarray(item_ids if item_ids is not None else features["item_id"], dtype=np.int64)
        # a request's own values once (run-end encoded, expanded when read back); per-candidate values as arrays
        columns: dict[str, Any] = {
            "request_id": constant(request_id, pa.string(), n, cache=False),
            "ts": constant(stamp, BASE_TYPES["ts"], n),
            "user_id": constant(int(user_id), pa.int64(), n, cache=False),
            "item_id": pa.array(ids, pa.int64()),
            "scenario": constant(scenario, pa.string(), n),
            "model": constant(model, pa.string(), n),
        }
        if isinstance(features, pa.Table):  # already Arrow (the service's fast path): taken as they are
            for c in features.column_names:
                if c not in BASE_COLUMNS:
                    columns[c] = features.column(c)
        else:
            for c in features.columns:
                if c not in BASE_COLUMNS:
                    columns[str(c)] = features[c]
        columns["prediction"] = np.asarray(predictions, dtype=np.float32)
        for key, value in extra.items():
            if isinstance(value, str) or np.isscalar(value) or value is None:
                columns[key] = constant(value, self.types.get(key), n)
            elif len(value) != n:
                raise ValueError(f"request log: extra column '{key}' has {len(value)} values for {n} candidates")
            else:
                columns[key] = value if isinstance(value, np.ndarray | pd.Series) else list(value)
        arrays = [
            values if isinstance(values, pa.Array | pa.ChunkedArray) else _to_arrow(name, values, self.types.get(name))
            for name, values in columns.items()
        ]
        return pa.Table.from_arrays(arrays, names=list(columns))

    def column(self, name: str, values: pd.Series | np.ndarray | list) -> pa.Array:
        """One feature column as the log stores it (its declared type when it fits): for callers that build a
        request's Arrow table themselves (`features=` a pa.Table in `log_request`)."""
        return _to_arrow(name, values, self.types.get(name))

    def constant(self, name: str, value: Any, n: int) -> pa.Array:
        """One feature's single value on each of a request's n rows, as the log stores it (`constant`: held once,
        run-end encoded; `column` of n copies once read back)."""
        return constant(value, self.types.get(name), n)

    # ---- compaction ------------------------------------------------------------------------------------
    def _rotate(self) -> bool:
        """Close the current segment for writing; the next request opens another. Thread mode: it stays locked until
        compacted here; process mode: it is unlocked for the compactor. True when a segment was closed."""
        with self._lock:
            return self._rotate_locked()

    def _rotate_locked(self) -> bool:
        if self._fd is None:  # open only once a record is written (an empty request's record too)
            return False
        if self.compaction == "process":
            os.close(self._fd)
            self._handed.append((self._seg, self._seg_rows))
        else:
            self._closed_segments.append((self._seg, self._fd, self._seg_rows))
        self._fd, self._seg, self._seg_rows = None, None, 0
        return True

    def flush(self) -> Path | None:
        """Compact what was written so far into Parquet now; returns the last part written (None when nothing was
        waiting). Rows stay in their segment until their part is on disk. Process mode: this writer's rotated
        segments are compacted here (a segment the compactor is on is waited for, then skipped as done)."""
        self._rotate()
        if self.compaction == "process":
            return self._flush_handed()
        last = None
        with self._compact_lock:
            while True:
                with self._lock:
                    if not self._closed_segments:
                        break
                    seg, fd, rows = self._closed_segments[0]
                try:
                    done = _compact_held(self.directory, seg, fd, self._count)
                except Exception:
                    self._count("compaction_errors")
                    raise
                os.close(fd)  # releases the lock only once the segment is gone
                with self._lock:
                    self._closed_segments.pop(0)
                last = (done[0] if done else None) or last
        return last

    def _flush_handed(self) -> Path | None:
        with self._lock:
            handed = list(self._handed)
        last = None
        for seg, _ in handed:
            try:
                compact_segment(self.directory, seg, wait_s=COMPACTOR_WAIT_S, counts=self._count)
            except Exception:
                self._count("compaction_errors")
                raise
            part = _part_path(self.directory, _stem(seg))
            last = part if part.exists() else last
        with self._lock:
            self._handed = [(seg, rows) for seg, rows in self._handed if seg.exists()]
        return last

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            if self._closed:
                return
            try:
                if self.compaction == "process":
                    if self._rotate():
                        self._wake_compactor()
                else:
                    self.flush()
            except Exception:  # noqa: BLE001 - a full disk must not kill serving; the rows stay in their segments
                log.exception("request log: compaction into %s failed; the rows stay in %s", self.directory, self.segments)
            backlog = self.stats()["backlog_rows"]
            if backlog > self.max_backlog_rows:
                self._count("backlog_full")
                log.warning(
                    "request log: %d rows wait for compaction (more than %d); they are safe in %s",
                    backlog, self.max_backlog_rows, self.segments,
                )  # fmt: skip

    def close(self) -> None:
        """Stop the compactor and compact everything written (idempotent; a request logged after close is still
        written, to a new segment, and compacted by a later close or the next start)."""
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            self._wake.set()
            self._thread.join(timeout=30)
            atexit.unregister(self.close)
        if self._rotate() and self._compactor is not None:
            self._wake_compactor()
        self._stop_compactor()
        try:
            self.flush()  # what the compactor left (it died, or process mode was never started): compacted here
        except Exception:  # noqa: BLE001 - the rows stay in their segments; the next start recovers them
            log.exception("request log: final compaction into %s failed; the next start recovers %s", self.directory, self.segments)
        if self._rotate():  # a request logged while closing (none normally): its segment is compacted too
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - as above: recovered at the next start
                log.exception("request log: compacting %s failed; the next start recovers it", self.segments)

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- reading ---------------------------------------------------------------------------------------------------
def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping integers exact: an int column with missing values becomes nullable Int64 (pandas'
    default, float64, rounds ids above 2^53)."""
    frame = table.to_pandas()
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_integer(column.type) and column.null_count:
            frame[name] = column.to_pandas(types_mapper=lambda t: pd.Int64Dtype() if pa.types.is_integer(t) else None)
    return frame


def read_request_log_table(directory: str | Path) -> pa.Table | None:
    """Every row of a request-log folder as one Arrow table: the Parquet parts, plus the segments not compacted yet
    (a segment whose part exists is skipped: never a row twice). None when nothing was written."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"request log: {directory} is not a directory")
    # segments listed before parts: one compacted in between is then found as its part (listed the other way
    # round, its part would be missed and its segment gone)
    segments = sorted((directory / SEGMENTS).glob(f"seg-*{SEGMENT_SUFFIX}"))
    parts = {p for p in directory.rglob("*.parquet") if not any(s.startswith((".", "_")) for s in p.relative_to(directory).parts)}
    parts = set(complete_parts(sorted(parts)))
    tables: list[pa.Table] = [read_part(p) for p in sorted(parts)]
    part_stems = {_stem(p) for p in parts}
    for seg in segments:
        stem = _stem(seg)
        if stem in part_stems:
            continue
        try:
            records, _ = _read_segment(seg)
        except FileNotFoundError:  # compacted between the listing and now: read its part instead
            part = _part_path(directory, stem)
            records = [read_part(part)] if part.exists() else []
        tables.extend(records)
    if not tables:
        return None
    return _concat(tables)


def read_request_log(directory: str | Path) -> pd.DataFrame:
    """Every logged row of a request-log directory, oldest first (an empty frame when nothing was written yet):
    compacted Parquet parts and un-compacted segments alike, ids as int64 (nullable Int64 where values are missing)."""
    table = read_request_log_table(directory)
    if table is None:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "prediction"])
    return _to_pandas(table).sort_values("ts", kind="stable").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m ctrflow.request_log compact DIR [--metrics]`: the compactor process of a writer (`run_compactor`,
    woken through its standard input), started by `RequestLogger(compaction="process")`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ctrflow.request_log", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compact", help="compact a request-log folder's unheld segments until standard input ends")
    c.add_argument("directory", type=Path)
    c.add_argument("--metrics", action="store_true", help="count in Prometheus counters (a BentoML worker's /metrics)")
    c.add_argument("--period", type=float, default=COMPACTOR_PERIOD_S, help="seconds between passes without a wake-up")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s compactor[%(process)d] %(message)s")
    run_compactor(args.directory, sys.stdin.fileno(), period_s=args.period, metrics=args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
