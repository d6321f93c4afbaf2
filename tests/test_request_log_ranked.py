"""`RequestLogger.log_ranked`, the serving worker's record: the same rows as `log_request` once read back (compacted
or not), item features by reference written once per segment, crash safety, and bad input refused."""

from __future__ import annotations

import datetime as dt
import os
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ctrflow.request_log import (
    HEADER,
    ITEMS_MAGIC,
    SEGMENTS,
    ItemRows,
    RequestLogError,
    RequestLogger,
    _read_records,
    constant,
    read_request_log,
    recover_request_log,
)

BIG = 2**63 - 1
TYPES = {"age": pa.string(), "hist": pa.list_(pa.int64()), "n_events": pa.float64(), "vec": pa.list_(pa.float32()),
         "genres": pa.list_(pa.string()), "year": pa.float64()}  # fmt: skip
# an item table as a serving snapshot holds it: one row per item, the last row all missing (an unknown item)
ITEMS = pa.record_batch({"genres": pa.array([["a", "b"], [], ["c"], None], pa.list_(pa.string())),
                         "year": pa.array([1990.0, None, 2001.5, None])})  # fmt: skip
ORDER = ("event_timestamp", "hist", "age", "genres", "n_events", "vec", "year")  # user and item columns interleaved
TS = 1_700_000_000_000_000


def _request(k: int, n: int = 3) -> dict:
    """Request k: n candidates over the item table (row 3: unknown), user values of every kind."""
    rows = np.array([(k + j) % 4 for j in range(n)], dtype=np.int64)
    user = {"hist": [1, BIG, 3] if k % 3 else [], "age": None if k % 4 == 0 else f"{20 + k}", "n_events": [1.5, float("nan"), float("inf")][k % 3],
            "vec": np.array([0.1, 0.2 + k, np.float32(1e-8)], dtype=np.float32)}  # fmt: skip
    scores = np.linspace(0.1, 0.9, n, dtype=np.float32)
    if n and k % 5 == 0:
        scores[0] = np.nan  # a diverged model: logged as missing, as log_request logs it
    return {"rid": f"r{k}", "user_id": BIG - k, "item_ids": [BIG - 10 * k - j for j in range(n)], "rows": rows, "user": user,
            "scores": scores, "ts": TS + k,
            "extra": {"rank": np.arange(1, n + 1, dtype=np.int32), "fallback_user": bool(k % 2), "fallback_item": rows == 3,
                      "latency_ms": 1.25 * k, "shadow_score": [None] * n if k % 2 else list(np.linspace(0, 1, n))}}  # fmt: skip


def _log_ranked(logger: RequestLogger, r: dict, items: pa.RecordBatch = ITEMS) -> None:
    logger.log_ranked(
        request_id=r["rid"], user_id=r["user_id"], scenario="home", model="m:1", item_ids=r["item_ids"], predictions=r["scores"],
        features={"event_timestamp": pd.Timestamp(r["ts"], unit="us", tz="UTC").to_pydatetime(), **r["user"]}, items=ItemRows(items, r["rows"]), columns=ORDER,
        extra=r["extra"], ts_us=r["ts"],
    )  # fmt: skip


def _log_request(logger: RequestLogger, r: dict, items: pa.RecordBatch = ITEMS) -> None:
    """The same request through log_request: the served table as the service built it before log_ranked."""
    n = len(r["item_ids"])
    taken = items.take(pa.array(r["rows"]))
    cols = {"event_timestamp": constant(pa.array([r["ts"]], pa.timestamp("us", tz="UTC")), None, n)}
    for name in ORDER[1:]:
        cols[name] = taken.column(name) if name in items.schema.names else logger.constant(name, r["user"][name], n)
    logger.log_request(
        request_id=r["rid"], user_id=r["user_id"], scenario="home", model="m:1", features=pa.table(cols), predictions=r["scores"],
        item_ids=r["item_ids"], extra=r["extra"], ts=pd.Timestamp(r["ts"], unit="us", tz="UTC"),
    )  # fmt: skip


def _item_frames(seg) -> list[int]:
    """The rows of each item frame in a segment, in order."""
    data, pos, rows = seg.read_bytes(), 0, []
    while pos + HEADER.size <= len(data):
        magic, length, _ = HEADER.unpack_from(data, pos)
        if magic == ITEMS_MAGIC:
            rows.append(pa.ipc.open_stream(pa.py_buffer(data[pos + HEADER.size : pos + HEADER.size + length])).read_all().num_rows)
        pos += HEADER.size + length
    return rows


@pytest.mark.parametrize(("flush_rows", "whole_bytes"), [(2, 0), (1000, 1 << 20)])  # items by rows / the table whole
def test_log_ranked_reads_back_as_the_same_rows_as_log_request(tmp_path, monkeypatch, flush_rows, whole_bytes):
    monkeypatch.setattr("ctrflow.request_log.WHOLE_ITEM_TABLE_BYTES", whole_bytes)
    requests = [_request(k, n=[3, 0, 1, 4, 2, 3][k % 6]) for k in range(12)]
    a = RequestLogger(tmp_path / "a", column_types=TYPES, flush_rows=flush_rows, flush_seconds=3600)
    b = RequestLogger(tmp_path / "b", column_types=TYPES, flush_rows=flush_rows, flush_seconds=3600)
    for k, r in enumerate(requests):
        _log_request(a, r)
        _log_ranked(b, r)
        if k == 5:
            a.flush(), b.flush()  # some compacted, the rest read from their segments
    before = read_request_log(tmp_path / "a"), read_request_log(tmp_path / "b")
    pd.testing.assert_frame_equal(before[1], before[0])
    a.close(), b.close()
    after = read_request_log(tmp_path / "a"), read_request_log(tmp_path / "b")
    pd.testing.assert_frame_equal(after[1], after[0])
    log = after[1]
    assert len(log) == sum(len(r["item_ids"]) for r in requests)  # the empty requests hold no row
    # hand-checked values of request 5 (3 candidates, rows 1, 2, 3): items by row, the user's values on each row
    r5 = log[log["request_id"] == "r5"]
    assert r5["item_id"].tolist() == [BIG - 50, BIG - 51, BIG - 52] and (r5["user_id"] == BIG - 5).all()
    assert [list(g) for g in r5["genres"].iloc[:2]] == [[], ["c"]] and r5["genres"].iloc[2] is None
    assert np.isnan(r5["year"].iloc[0]) and r5["year"].iloc[1] == 2001.5 and np.isnan(r5["year"].iloc[2])
    assert np.isnan(r5["prediction"].iloc[0]) and r5["prediction"].iloc[1] == np.float32(0.5)  # NaN: missing
    assert (r5["n_events"] == np.inf).all() and (r5["age"] == "25").all() and (r5["latency_ms"] == 6.25).all()
    assert all(list(v) == [1, BIG, 3] for v in r5["hist"])
    assert all(np.array_equal(v, np.array([0.1, 5.2, 1e-8], dtype=np.float32)) for v in r5["vec"])  # float32 exact
    assert r5["shadow_score"].isna().all() and r5["rank"].tolist() == [1, 2, 3] and r5["fallback_item"].tolist() == [False, False, True]
    assert (r5["ts"] == pd.Timestamp(TS + 5, unit="us", tz="UTC")).all()


def test_item_rows_are_written_once_per_segment_and_again_for_a_new_table(tmp_path, monkeypatch):
    monkeypatch.setattr("ctrflow.request_log.WHOLE_ITEM_TABLE_BYTES", 1000)  # "big" (~1.6 KB) by rows, ITEMS whole
    big = pa.record_batch({"genres": pa.array([["g"]] * 100, pa.list_(pa.string())), "year": pa.array([float(i) for i in range(100)])})
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=50, flush_seconds=3600)
    r = _request(1, n=3)
    for rows in ([0, 1, 2], [1, 2, 3], [2, 3, 3]):  # (two unknown candidates may share the missing row)
        _log_ranked(logger, {**r, "rows": np.array(rows)}, big)
    seg = logger._seg
    assert _item_frames(seg) == [3, 1]  # rows 0-2, then row 3 only; the third request names no new row
    refreshed = pa.record_batch({"genres": big.column("genres"), "year": pa.array([float(-i) for i in range(100)])})
    _log_ranked(logger, {**r, "rid": "after", "rows": np.array([2, 3, 4])}, refreshed)  # a new snapshot: rows again
    assert _item_frames(seg) == [3, 1, 3]
    logger.close()
    log = read_request_log(tmp_path)
    assert log.loc[log["request_id"] == "after", "year"].tolist() == [-2.0, -3.0, -4.0]  # the new snapshot's values
    assert log.loc[log["request_id"] == "r1", "year"].tolist() == [0.0, 1.0, 2.0, 1.0, 2.0, 3.0, 2.0, 3.0, 3.0]

    small = RequestLogger(tmp_path / "small", column_types=TYPES, flush_rows=1000, flush_seconds=3600)
    _log_ranked(small, r)
    _log_ranked(small, {**r, "rows": np.array([0, 0, 3])})
    assert _item_frames(small._seg) == [4]  # a small table: all of it, once
    small.flush()
    _log_ranked(small, r)
    assert _item_frames(small._seg) == [4]  # a new segment holds its own copy: each is read alone
    small.close()


def test_a_torn_record_after_its_item_frame_drops_that_request_only(tmp_path):
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=1000, flush_seconds=3600)
    _log_ranked(logger, _request(1))
    seg = logger._seg
    whole = seg.stat().st_size
    _log_ranked(logger, _request(2))
    with open(seg, "r+b") as fh:
        fh.truncate(whole + 30)  # a crash in the middle of the second request's write
    records, torn = _read_records(seg)
    assert torn == 30 and sum(r.table.num_rows for r in records) == 1
    os.close(logger._fd)  # the worker dies
    logger._fd, logger._closed = None, True
    assert recover_request_log(tmp_path) == 3
    assert read_request_log(tmp_path)["request_id"].tolist() == ["r1"] * 3


def test_a_failed_write_closes_the_segment_and_the_next_request_starts_a_new_one(tmp_path, monkeypatch):
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=1000, flush_seconds=3600)
    _log_ranked(logger, _request(1))
    first = logger._seg
    real_write = os.write

    def half_then_fail(fd, data):  # a disk that fills in the middle of a record
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(RequestLogError, match="request r2 not written: .*No space left"):
        _log_ranked(logger, _request(2))
    monkeypatch.setattr(os, "write", real_write)
    _log_ranked(logger, _request(3))
    assert logger._seg != first and _item_frames(logger._seg) == [4]  # the new segment has its own item rows
    assert logger.stats()["write_errors"] == 1
    logger.close()
    assert sorted(set(read_request_log(tmp_path)["request_id"])) == ["r1", "r3"]


def test_bad_arguments_are_refused_with_the_reason_and_write_nothing(tmp_path):
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600)
    r = _request(1)
    cases = [
        ({"scores": r["scores"][:2]}, "3 candidates but 2 predictions"),
        ({"rows": np.array([0, 1])}, "3 candidates but 2 item rows"),
        ({"rows": np.array([0, 1, 4])}, "item rows must be integers within the item table's 4 rows"),
        ({"extra": {"rank": np.arange(5)}}, "extra column 'rank' has 5 values for 3 candidates"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _log_ranked(logger, {**r, **change})
    with pytest.raises(ValueError, match="are not the features"):
        logger.log_ranked(request_id="x", user_id=1, scenario="s", model="m", item_ids=[1], predictions=np.zeros(1),
                          features={"age": "1"}, items=ItemRows(ITEMS, np.array([0])), columns=("age",))  # fmt: skip
    assert logger.stats()["requests"] == 0
    logger.close()
    assert read_request_log(tmp_path).empty


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from tests.test_request_log_ranked import RequestLogger, TYPES, _request, _log_ranked
    logger = RequestLogger(sys.argv[1], column_types=TYPES, flush_rows=40, flush_seconds=0.05, compaction="process")
    print(logger._compactor.pid, flush=True)
    for i in range(100000):
        r = _request(i)
        _log_ranked(logger, r)
        print(r["rid"], flush=True)  # "answered": printed only after log_ranked returned
    """
)


def test_kill_9_of_a_log_ranked_writer_loses_no_request_it_returned_from(tmp_path):
    from test_request_log import kill_9_writer_after  # tests/ is on sys.path (pytest prepends it)

    log_dir = tmp_path / "log"
    answered = kill_9_writer_after(WRITER, log_dir, 300)
    assert not list((log_dir / SEGMENTS).glob("seg-*"))  # all compacted, none set aside as damaged
    assert not list((log_dir / SEGMENTS).glob("damaged-*"))
    log = read_request_log(log_dir)
    assert set(answered) <= set(log["request_id"])
    sizes = log.groupby("request_id").size()
    assert (sizes == 3).all()  # every request whole: never a torn one half-read


def _simple(logger: RequestLogger, rid: str, n: int = 2, **kw) -> None:
    logger.log_ranked(request_id=rid, user_id=1, scenario="s", model="m", item_ids=list(range(n)),
                      predictions=np.zeros(n, np.float32), **{"features": {}, **kw})  # fmt: skip


def test_a_value_without_a_json_form_is_refused_and_the_next_request_still_reads_back(tmp_path):
    """Found by review: the refused request had marked its item rows written, so the next record named rows no frame
    held and the segment could never be read."""
    logger = RequestLogger(tmp_path, flush_seconds=3600)
    items = pa.record_batch({"year": pa.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="request bad: a value cannot be logged"):
        _simple(logger, "bad", features={"x": dt.timedelta(seconds=1)}, items=ItemRows(items, np.array([0, 1])))
    with pytest.raises(ValueError, match="column 'x': its type cannot be told"):
        _simple(logger, "bad", features={"x": object()}, items=ItemRows(items, np.array([0, 1])))
    _simple(logger, "good", features={"x": np.array(["a", "b"]), "y": np.arange(6.0)[::2]}, items=ItemRows(items, np.array([1, 0])))
    logger.close()
    log = read_request_log(tmp_path)
    assert log["request_id"].tolist() == ["good"] * 2 and log["year"].tolist() == [2.0, 1.0]
    assert list(log["x"].iloc[0]) == ["a", "b"] and list(log["y"].iloc[0]) == [0.0, 2.0, 4.0]


def test_values_whose_type_changes_between_requests_read_back_as_log_request_gives_them(tmp_path):
    """Found by review: an undeclared column took its first value's type for good (None, then a float, then +inf
    broke the segment), an extra scalar in one request and an array in another broke the part, and an empty
    list<string> did not decode."""
    requests = [
        ({"f": None, "tags": None}, {"x": 1}),
        ({"f": 1.5, "tags": []}, {"x": np.array([3, 4])}),
        ({"f": float("inf"), "tags": ["a"]}, {"x": 2}),
    ]
    types = {"tags": pa.list_(pa.string())}
    a = RequestLogger(tmp_path / "a", column_types=types, flush_seconds=3600)
    b = RequestLogger(tmp_path / "b", column_types=types, flush_seconds=3600)
    for k, (features, extra) in enumerate(requests):
        _simple(b, f"r{k}", features=features, extra=extra)
        table = pa.table({name: a.constant(name, v, 2) for name, v in features.items()})
        a.log_request(request_id=f"r{k}", user_id=1, scenario="s", model="m", features=table, predictions=np.zeros(2, np.float32),
                      item_ids=[0, 1], extra=extra)  # fmt: skip
    a.close(), b.close()
    got, want = read_request_log(tmp_path / "b"), read_request_log(tmp_path / "a")
    pd.testing.assert_frame_equal(got.drop(columns="ts"), want.drop(columns="ts"))
    assert got["f"].tolist()[2:] == [1.5, 1.5, np.inf, np.inf] and got["x"].tolist() == [1, 1, 3, 4, 2, 2]


def test_item_rows_must_be_integers_within_the_table(tmp_path):
    logger = RequestLogger(tmp_path, flush_seconds=3600)
    items = pa.record_batch({"year": pa.array([1.0, 2.0])})
    for rows in (np.array([2**32, 1]), np.array([0.7, 1.0]), np.array([-1, 0])):  # never wrapped or truncated
        with pytest.raises(ValueError, match="item rows must be integers within the item table's 2 rows"):
            _simple(logger, "x", items=ItemRows(items, rows))
    logger.close()


def test_two_threads_with_new_layouts_at_once_each_get_their_own(tmp_path):
    import threading

    logger = RequestLogger(tmp_path, flush_seconds=3600)
    start = threading.Barrier(2)

    def write(name: str) -> None:
        start.wait()
        for k in range(50):
            _simple(logger, f"{name}{k}", features={name: k if name == "i" else str(k)})

    threads = [threading.Thread(target=write, args=(name,)) for name in ("i", "s")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    logger.close()
    log = read_request_log(tmp_path)
    assert len(log) == 200 and log.loc[log["request_id"] == "s7", "s"].tolist() == ["7", "7"]


def test_a_segment_that_cannot_be_decoded_is_set_aside_and_the_rest_is_compacted(tmp_path):
    import zlib

    from ctrflow.request_log import DAMAGED_PREFIX, FAST_MAGIC, JSON_LENGTH, compact_unheld

    logger = RequestLogger(tmp_path, flush_seconds=3600)
    _simple(logger, "before")
    logger.flush()
    _simple(logger, "damaged")
    body = b'[99, null, 1, ["x", 0, 1, "s", "m"]]'  # a record naming a layout its segment does not hold
    payload = JSON_LENGTH.pack(len(body)) + body + np.zeros(1, np.int64).tobytes() + np.zeros(1, np.float32).tobytes()
    os.write(logger._fd, HEADER.pack(FAST_MAGIC, len(payload), zlib.crc32(payload)) + payload)
    seg = logger._seg
    logger._rotate()
    _simple(logger, "after")
    logger.flush()
    compact_unheld(tmp_path)
    assert not seg.exists() and (seg.parent / f"{DAMAGED_PREFIX}{seg.name[4:]}").exists()
    logger.close()
    assert sorted(set(read_request_log(tmp_path)["request_id"])) == ["after", "before"]
