"""Canonical tables every source produces, and the behaviour sequence built from them.

interactions: user_id int64, item_id int64, scenario str, label int64 in {0,1}, event_timestamp datetime64[us, UTC]
users:        user_id int64 + the user fields of the spec
items:        item_id int64 + the item fields of the spec
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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


def behaviour_table(interactions: pd.DataFrame, max_len: int) -> pd.DataFrame:
    """Per (user, event time): the user's last `max_len` positive items strictly before that time.

    A row stamped t holds only events with timestamp < t, so a point-in-time join at t never sees the event
    itself or anything at the same instant (no label leakage).
    """
    df = interactions[["user_id", "item_id", "label", "event_timestamp"]].sort_values(
        ["user_id", "event_timestamp"], kind="stable"
    )
    users = df["user_id"].to_numpy()
    items = df["item_id"].to_numpy()
    labels = df["label"].to_numpy()
    ts = df["event_timestamp"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy().astype("datetime64[us]").view(np.int64)

    out_user, out_ts, out_seq, out_n, out_pos = [], [], [], [], []
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])
    for s, e in zip(starts, ends):
        u_ts = ts[s:e]
        pos_mask = labels[s:e] == 1
        pos_ts = u_ts[pos_mask]
        pos_items = items[s:e][pos_mask]
        times = np.unique(u_ts)
        n_before = np.searchsorted(u_ts, times, side="left")
        k_before = np.searchsorted(pos_ts, times, side="left")
        for k in k_before:
            out_seq.append(pos_items[max(0, k - max_len) : k].tolist())
        out_user.append(np.full(len(times), users[s]))
        out_ts.append(times)
        out_n.append(n_before)
        out_pos.append(k_before)
    if not out_user:
        return pd.DataFrame(columns=["user_id", "event_timestamp", HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS])
    return pd.DataFrame(
        {
            "user_id": np.concatenate(out_user).astype(np.int64),
            "event_timestamp": pd.to_datetime(np.concatenate(out_ts), unit="us", utc=True).astype(TS_DTYPE),
            HIST_FIELD: out_seq,
            "user_n_events": np.concatenate(out_n).astype(np.int64),
            "user_n_pos": np.concatenate(out_pos).astype(np.int64),
        }
    )


def behaviour_at(interactions: pd.DataFrame, user_id: int, at: pd.Timestamp, max_len: int) -> list[int]:
    """Reference (slow, obvious) version of one sequence, for tests and serving fallbacks."""
    u = interactions[(interactions.user_id == user_id) & (interactions.label == 1)]
    u = u[u.event_timestamp < at].sort_values("event_timestamp", kind="stable")
    return u.item_id.tolist()[-max_len:]
