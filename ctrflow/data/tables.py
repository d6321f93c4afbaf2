"""Canonical tables every source produces, and the behaviour sequence built from them.

interactions: user_id int64, item_id int64, scenario str, label int64 in {0,1}, event_timestamp datetime64[us, UTC]
users:        user_id int64 + the user fields of the spec
items:        item_id int64 + the item fields of the spec
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec

TS_DTYPE = "datetime64[us, UTC]"
INTERACTION_COLUMNS = ["user_id", "item_id", "scenario", "label", "event_timestamp"]
HIST_FIELD = "hist_item_ids"
BEHAVIOUR_COUNT_FIELDS = ("user_n_events", "user_n_pos")


@dataclass
class Dataset:
    """One dataset in canonical form, with the spec that describes its fields."""

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    spec: FeatureSpec

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.interactions.to_parquet(directory / "interactions.parquet", index=False)
        self.users.to_parquet(directory / "users.parquet", index=False)
        self.items.to_parquet(directory / "items.parquet", index=False)
        self.spec.extra["dataset"] = self.name
        self.spec.save(directory / "spec.json")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Dataset:
        directory = Path(directory)
        spec = FeatureSpec.load(directory / "spec.json")
        return cls(
            name=spec.extra.get("dataset", directory.name),
            interactions=pd.read_parquet(directory / "interactions.parquet"),
            users=pd.read_parquet(directory / "users.parquet"),
            items=pd.read_parquet(directory / "items.parquet"),
            spec=spec,
        )


def to_utc_us(ts: pd.Series) -> pd.Series:
    """Timestamps as microsecond UTC: DuckDB-backed Feast fails on nanosecond tz-aware columns.

    Numbers are read as epoch seconds, text as date-times (naive ones as UTC). Raises pandas' errors
    (ValueError, OverflowError, TypeError) on values that do not convert; loaders use `parse_timestamps`.
    """
    if pd.api.types.is_numeric_dtype(ts):
        ts = pd.to_datetime(ts, unit="s", utc=True)
    else:
        ts = pd.to_datetime(ts, utc=True)
    return ts.astype(TS_DTYPE)


def parse_timestamps(raw: pd.Series) -> pd.Series:
    """`raw` as datetime64[us, UTC] when every value converts (epoch seconds, date-time text), else `raw` unchanged.

    Never raises: a column that does not convert (epoch milliseconds read as seconds, text that is no date) goes
    to validation as it is, which names the table, the column, the likely unit and how many rows, and writes its
    report; a bare pandas error here would name nothing. Text is tried as pandas infers it, then as ISO 8601 (the
    format validation checks text against).
    """
    try:
        return to_utc_us(raw)
    except (ValueError, OverflowError, TypeError):
        pass
    if not pd.api.types.is_numeric_dtype(raw):
        try:
            return pd.to_datetime(raw, utc=True, format="ISO8601").astype(TS_DTYPE)
        except (ValueError, OverflowError, TypeError):
            pass
    return raw


def standard_fields(max_len: int, count_buckets: int = 10) -> list[FieldSpec]:
    """Fields every dataset has: ids, scenario, the behaviour sequence and its counts."""
    return [
        FieldSpec("user_id", FieldKind.CATEGORICAL, Entity.USER, large=True),
        FieldSpec("item_id", FieldKind.CATEGORICAL, Entity.ITEM, large=True),
        FieldSpec("scenario", FieldKind.CATEGORICAL, Entity.CONTEXT),
        FieldSpec(HIST_FIELD, FieldKind.SEQUENCE, Entity.USER, max_len=max_len, vocab_of="item_id"),
        FieldSpec("user_n_events", FieldKind.NUMERIC, Entity.USER, buckets=count_buckets),
        FieldSpec("user_n_pos", FieldKind.NUMERIC, Entity.USER, buckets=count_buckets),
    ]


def behaviour_arrow(interactions: pd.DataFrame, max_len: int, closing: bool = False) -> pa.Table:
    """Per (user, distinct event time t): the user's last `max_len` positive items strictly before t, and the counts
    of their events and positive events strictly before t, in one ordered pass (a sort, then vectorised slices).

    Returns an Arrow table sorted by (user_id, event_timestamp): user_id int64, event_timestamp timestamp[us, UTC],
    hist_item_ids list<int64> (oldest first), user_n_events int64, user_n_pos int64. With `closing`, each user also
    gets one row stamped 1 µs after their last event, holding all of their events (the state served online).
    Cost: O(n log n) for the sort plus O(rows x max_len) for the lists, whatever the events per user (the
    per-user-pairs cost of a point-in-time join is what this avoids). A row stamped t holds only events with
    timestamp < t, so a point-in-time join at t never sees the event itself or anything at the same instant.
    `behaviour_batches` gives the same rows a range of users at a time (bounded memory).
    """
    batches = list(behaviour_batches(interactions, max_len, closing=closing))
    return pa.concat_tables(batches) if len(batches) > 1 else batches[0]


BEHAVIOUR_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC")),
        pa.field(HIST_FIELD, pa.list_(pa.int64())),
        pa.field("user_n_events", pa.int64()),
        pa.field("user_n_pos", pa.int64()),
    ]
)


def behaviour_batches(
    interactions: pd.DataFrame, max_len: int, closing: bool = False, batch_rows: int | None = None
) -> Iterator[pa.Table]:
    """`behaviour_arrow`'s rows (the same values, the same order) as Arrow tables of whole users, each of about
    `batch_rows` rows (None: one table; a user with more rows than that is one table of their own).

    The sort and the per-event arrays (a few int64 per interaction) are built once; the item lists, rows x up to
    `max_len` int64 (4 GB on 10M events with full histories), only one batch at a time. Always yields at least one
    table (an empty one when there are no interactions), each with `BEHAVIOUR_SCHEMA`.
    """
    df = interactions[["user_id", "item_id", "label", "event_timestamp"]]
    ts_all = df["event_timestamp"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[us]").view(np.int64)
    users_all = df["user_id"].to_numpy(dtype=np.int64)
    order = np.lexsort((ts_all, users_all))  # stable: by user, then time, then input order
    users, ts = users_all[order], ts_all[order]
    del ts_all, users_all
    items = df["item_id"].to_numpy(dtype=np.int64)[order]
    positive = df["label"].to_numpy()[order] == 1
    del order
    n = len(users)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0)) if n else np.zeros(0, dtype=np.int64)
    first = new_user.copy()  # the first event of each (user, time): the state "strictly before t" is read there
    first[1:] |= ts[1:] != ts[:-1]
    at = np.flatnonzero(first)
    row_ts = ts[at]
    start = user_start[at]
    del first, user_start
    if closing and n:
        ends = np.append(np.flatnonzero(new_user)[1:], n)  # one past each user's last event
        starts = np.flatnonzero(new_user)
        at = np.concatenate([at, ends])
        row_ts = np.concatenate([row_ts, ts[ends - 1] + 1])
        start = np.concatenate([start, starts])
        keep = np.lexsort((row_ts, users[start]))
        at, row_ts, start = at[keep], row_ts[keep], start[keep]
    del ts, new_user
    cum_pos = np.zeros(n + 1, dtype=np.int64)  # positives in [0, i)
    np.cumsum(positive, out=cum_pos[1:])
    pos_items = items[positive]
    del items, positive
    row_users = users[start]
    rows = len(at)
    # cut points between rows of different users, the first at or after each multiple of batch_rows
    cuts = [0]
    if batch_rows and rows > batch_rows:
        boundary = np.flatnonzero(row_users[1:] != row_users[:-1]) + 1
        while rows - cuts[-1] > batch_rows:
            i = np.searchsorted(boundary, cuts[-1] + batch_rows)
            if i == len(boundary):
                break
            cuts.append(int(boundary[i]))
    cuts.append(rows)
    for a, b in zip(cuts[:-1], cuts[1:]):
        hi = cum_pos[at[a:b]]
        lo = np.maximum(cum_pos[start[a:b]], hi - max_len)
        lengths = hi - lo
        offsets = np.zeros(b - a + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        hist = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(pos_items[take], pa.int64()))
        del take
        yield pa.Table.from_arrays(
            [
                pa.array(row_users[a:b], pa.int64()),
                pa.array(row_ts[a:b], pa.timestamp("us", tz="UTC")),
                hist,
                pa.array(at[a:b] - start[a:b], pa.int64()),
                pa.array(hi - cum_pos[start[a:b]], pa.int64()),
            ],
            schema=BEHAVIOUR_SCHEMA,
        )


def behaviour_table(interactions: pd.DataFrame, max_len: int) -> pd.DataFrame:
    """Per (user, event time): the user's last `max_len` positive items strictly before that time (as lists), and
    the counts of events and positive events before it; `behaviour_arrow` as a pandas frame.

    A row stamped t holds only events with timestamp < t, so a point-in-time join at t never sees the event
    itself or anything at the same instant (no label leakage).
    """
    table = behaviour_arrow(interactions, max_len)
    return pd.DataFrame(
        {
            "user_id": table.column("user_id").to_numpy(),
            "event_timestamp": pd.Series(table.column("event_timestamp").to_pandas()).astype(TS_DTYPE),
            HIST_FIELD: table.column(HIST_FIELD).to_pylist(),
            "user_n_events": table.column("user_n_events").to_numpy(),
            "user_n_pos": table.column("user_n_pos").to_numpy(),
        }
    )


def behaviour_at(interactions: pd.DataFrame, user_id: int, at: pd.Timestamp, max_len: int) -> list[int]:
    """Reference (slow, obvious) version of one sequence, for tests and serving fallbacks."""
    u = interactions[(interactions.user_id == user_id) & (interactions.label == 1)]
    u = u[u.event_timestamp < at].sort_values("event_timestamp", kind="stable")
    return u.item_id.tolist()[-max_len:]
