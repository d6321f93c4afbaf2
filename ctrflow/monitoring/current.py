"""Reading the current frame for monitoring: a request-log folder, a folder of Parquet files or one file, sampled
down to a bounded number of rows so memory stays bounded however large the log grows.

Sampling rule: when the source holds N > `max_rows` rows, `max_rows` row positions are drawn uniformly without
replacement with `numpy.random.default_rng(seed)` over the rows in source order (Parquet files of a row per candidate in
name order, then a request log's request-row parts in name order, one row per candidate once exploded, then the
segments not compacted yet), and only those rows are kept while the source is read batch by batch (peak memory:
the sample plus one record batch). The same log and seed give the same sample. Ids stay int64 (nullable Int64
where values are missing), never float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ctrflow.request_log import (
    SEGMENT_SUFFIX,
    SEGMENTS,
    _concat,
    _read_segment,
    _stem,
    _to_pandas,
    complete_parts,
    explode,
    part_layout,
    read_columns,
    read_part,
)

REQUESTS_PER_BATCH = 256  # a request-row part is read this many requests (~25,600 rows at 100 candidates) at a time


class CurrentInputError(ValueError):
    """The current frame cannot be read; the message names the path and the cause."""


def read_current(
    path: str | Path, *, max_rows: int | None = None, seed: int = 0, columns: list[str] | None = None
) -> tuple[pd.DataFrame, dict]:
    """Rows of a request log (or a Parquet slice) as a frame, sampled to at most `max_rows` (module docstring).

    Returns (frame, sampling) where sampling = {rows_total, rows_read, sampled, seed, rule}; a log whose files hold
    no row yet gives an empty frame with the log's columns (the monitors call that "not enough data"). Raises
    CurrentInputError when the path is missing, holds no Parquet (nor segment), or cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise CurrentInputError(f"request log: {path} does not exist")
    if path.is_dir() and not any(path.rglob("*.parquet")) and not any((path / SEGMENTS).glob(f"seg-*{SEGMENT_SUFFIX}")):
        if (path / SEGMENTS).is_dir():  # a service's log before its first request: no row yet, no column either
            return pd.DataFrame(), {"rows_total": 0, "rows_read": 0, "sampled": False, "seed": seed, "rule": "all rows"}
        raise CurrentInputError(f"request log: no *.parquet file under {path}")
    try:
        # segments listed before the parts: one compacted in between is then read as its part, never missed
        listed = sorted((path / SEGMENTS).glob(f"seg-*{SEGMENT_SUFFIX}")) if path.is_dir() else []
        dataset = pads.dataset(str(path), format="parquet", partitioning="hive")  # skips _segments and .tmp files
        files = complete_parts(dataset.files)  # a compaction stopped between a segment's parts: its segment counts
        # a request log's parts hold a row per request (request_log.explode); other Parquet, a row per candidate
        nested = {f: part_layout(pq.read_schema(f)) for f in files}
        nested = {f: layout for f, layout in nested.items() if layout is not None}
        flat = [f for f in files if f not in nested]
        if len(flat) != len(dataset.files):
            dataset = pads.dataset(flat, format="parquet", partitioning="hive", partition_base_dir=str(path)) if flat else None
        segments = _segment_tables(path, files, listed) if path.is_dir() else []
        # a request-row part's candidate rows are in the layout just read from its footer
        n_parts = (dataset.count_rows() if dataset is not None else 0) + sum(int(layout["rows"]) for layout in nested.values())
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CurrentInputError(f"request log: cannot read Parquet at {path}: {exc}") from exc
    total = n_parts + sum(t.num_rows for t in segments)
    if total == 0:  # a log with no request yet (a quiet hour): not enough data to test, never a usage error
        if dataset is not None and (dataset.files or not segments):
            empty_table = dataset.schema.empty_table()
        elif segments:
            empty_table = segments[0].slice(0, 0)
        else:
            empty_table = read_part(Path(next(iter(nested)))).slice(0, 0)
        empty = _to_pandas(empty_table)
        if columns is not None:
            empty = empty[[c for c in columns if c in empty.columns]]
        return empty, {"rows_total": 0, "rows_read": 0, "sampled": False, "seed": seed, "rule": "all rows"}
    keep = None
    if max_rows is not None and total > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))
    tables: list[pa.Table] = []
    offset = 0
    try:
        if dataset is not None:
            cols = None if columns is None else [c for c in columns if c in dataset.schema.names]
            # little read-ahead: the point of sampling is bounded memory, not scan speed
            for batch in dataset.to_batches(columns=cols, batch_readahead=1, fragment_readahead=1):
                tables.append(_take(pa.Table.from_batches([batch]), keep, offset))
                offset += batch.num_rows
        for f, layout in nested.items():
            for t in _request_rows(Path(f), layout, columns, path if path.is_dir() else None):
                tables.append(_take(t, keep, offset))
                offset += t.num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CurrentInputError(f"request log: cannot read Parquet at {path}: {exc}") from exc
    for t in segments:
        t = t.select([c for c in t.column_names if columns is None or c in columns])
        tables.append(_take(t, keep, offset))
        offset += t.num_rows
    table = _concat([t for t in tables if t.num_rows] or tables[:1])
    frame = _to_pandas(table)
    if "ts" in frame.columns:
        frame = frame.sort_values("ts", kind="stable").reset_index(drop=True)
    sampling = {
        "rows_total": int(total),
        "rows_read": len(frame),
        "sampled": keep is not None,
        "seed": seed,
        "rule": "uniform without replacement over rows in source order (numpy default_rng(seed))" if keep is not None else "all rows",
    }
    return frame, sampling


def _take(table: pa.Table, keep: np.ndarray | None, offset: int) -> pa.Table:
    if keep is None:
        return table
    lo, hi = np.searchsorted(keep, [offset, offset + table.num_rows])
    return table.take(pa.array(keep[lo:hi] - offset))


def _request_rows(path: Path, layout: dict, columns: list[str] | None, base_dir: Path | None) -> Iterator[pa.Table]:
    """A request-row part (request_log.explode) a few requests at a time, as rows per candidate; under `base_dir`
    with its hive partition columns (``date=.../``), as the dataset gives the other Parquet files."""
    source = pads.dataset(str(path), format="parquet", partitioning="hive", partition_base_dir=str(base_dir)) if base_dir else pads.dataset(str(path), format="parquet")
    need, read = read_columns(layout, source.schema.names, columns)
    for batch in source.to_batches(columns=read, batch_size=REQUESTS_PER_BATCH, batch_readahead=1):
        yield explode(pa.Table.from_batches([batch]), layout).select(need)


def _segment_tables(directory: Path, files: list[str], segments: list[Path]) -> list[pa.Table]:
    """The rows of `segments` (listed before the parts `files`) not compacted yet (a segment whose part is among
    `files` is skipped: never a row twice; one compacted since the listing is read from its part)."""
    part_stems = {_stem(Path(f)) for f in files}
    tables: list[pa.Table] = []
    for seg in segments:
        if _stem(seg) in part_stems:
            continue
        try:
            records, _ = _read_segment(seg)
        except FileNotFoundError:  # compacted since the listing: its part was not in the dataset; read it now
            part = directory / f"part-{_stem(seg)}.parquet"
            records = [read_part(part)] if part.exists() else []
        tables.extend(records)
    return tables
