"""The durable request log on its own (no server): a killed writer loses nothing it returned from, crash leftovers
are recovered, ids stay int64, a compaction that falls behind is counted, and nothing is ever read twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ctrflow.config import REPO_ROOT
from ctrflow.request_log import SEGMENTS, RequestLogger, read_part, read_request_log, recover_request_log

BIG = 2**63 - 1  # the largest int64 id: float64 cannot hold it
TYPES = {"genre": pa.int64(), "price": pa.float64(), "vec": pa.list_(pa.float32())}


def _features(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    genre = np.empty(n, dtype=object)
    genre[:] = [None if i % 3 == 0 else BIG - i for i in range(n)]  # an int feature with missing values
    vec = np.empty(n, dtype=object)
    vec[:] = [rng.random(4, dtype=np.float32) for _ in range(n)]
    return pd.DataFrame({"user_id": 7, "item_id": np.arange(BIG - n + 1, BIG + 1, dtype=np.int64) if n else [],
                         "genre": genre, "price": rng.random(n), "vec": vec})  # fmt: skip


def _log(logger: RequestLogger, rid: str, n: int = 5, user_id: int = 7) -> pd.DataFrame:
    features = _features(n)
    logger.log_request(
        request_id=rid, user_id=user_id, scenario="home", model="m:1", features=features,
        predictions=np.linspace(0, 1, n), item_ids=features["item_id"].tolist(), extra={"rank": list(range(1, n + 1))},
    )  # fmt: skip
    return features


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from tests.test_request_log import RequestLogger, TYPES, _log
    logger = RequestLogger(sys.argv[1], column_types=TYPES, flush_rows=40, flush_seconds=0.05)
    for i in range(100000):
        _log(logger, f"r{i}")
        print(f"r{i}", flush=True)  # "answered": printed only after log_request returned
    """
)


def test_kill_9_of_a_writer_loses_no_request_it_returned_from(tmp_path):
    log_dir = tmp_path / "log"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(log_dir), str(REPO_ROOT)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    answered: list[str] = []
    deadline = time.monotonic() + 120
    while len(answered) < 300 and time.monotonic() < deadline:  # long enough for several compactions
        line = proc.stdout.readline()
        if not line:
            break
        answered.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    answered += [line.strip() for line in proc.stdout.read().splitlines()]  # printed before the kill landed
    proc.wait(timeout=30)
    assert len(answered) >= 300, "the writer did not get going"

    # before any recovery: compacted parts plus the dead writer's segments
    before = read_request_log(log_dir)
    assert set(answered) <= set(before["request_id"])
    assert before.groupby("request_id").size().eq(5).all()  # never a row twice, never half a request
    assert list((log_dir / SEGMENTS).glob("seg-*")), "the kill should leave a segment behind"

    # the next writer recovers the leftovers into Parquet, once
    with RequestLogger(log_dir, column_types=TYPES) as logger:
        assert logger.stats()["recovered_rows"] >= 5
    assert not list((log_dir / SEGMENTS).glob("seg-*"))
    after = read_request_log(log_dir)
    assert set(answered) <= set(after["request_id"]) and len(after) == len(before)
    assert len(_parts_frame(log_dir)) == len(after)  # every row is in the Parquet parts now


def test_a_record_torn_by_a_crash_and_a_dead_temp_file_are_cleaned_up(tmp_path):
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600)
    _log(logger, "whole")
    seg = next((tmp_path / SEGMENTS).glob("seg-*"))
    stem = seg.name[len("seg-") : -len(".arrows")]
    # what a kill in the middle of a write and in the middle of a compaction leave
    with open(seg, "ab") as fh:
        fh.write(seg.read_bytes()[:40])
    (tmp_path / f".part-{stem}.parquet.999.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / ".part-20200101T000000000000-1-deadbeef.parquet.tmp").write_bytes(b"old format temp file")
    dead = tmp_path / SEGMENTS / ".seg-20200101T000000000000-1-deadbeef.arrows.opening"  # a writer died opening it
    dead.write_bytes(b"")
    os.utime(dead, (time.time() - 120, time.time() - 120))
    fresh = tmp_path / SEGMENTS / ".seg-20200101T000000000001-2-deadbeef.arrows.opening"  # one being opened right now
    fresh.write_bytes(b"")
    assert read_request_log(tmp_path)["request_id"].tolist() == ["whole"] * 5  # the torn tail is never misread
    os.close(logger._fd)  # the worker dies: its lock goes with it
    logger._fd = None
    logger._closed = True

    assert recover_request_log(tmp_path) == 5
    assert not list(tmp_path.glob(".*.tmp")) and list((tmp_path / SEGMENTS).iterdir()) == [fresh]  # never one in use
    assert read_request_log(tmp_path)["request_id"].tolist() == ["whole"] * 5


def test_ids_stay_int64_end_to_end(tmp_path):
    from ctrflow.monitoring import read_request_log as monitoring_read

    with RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600) as logger:
        features = _log(logger, "a", user_id=BIG)
        logger.flush()
        _log(logger, "b", user_id=BIG)  # left in its segment until close: read from both at once
        mixed = read_request_log(tmp_path)
    for frame in (mixed, read_request_log(tmp_path), monitoring_read(tmp_path)):
        assert frame["item_id"].dtype == np.int64 and frame["user_id"].dtype == np.int64
        assert frame["item_id"].max() == BIG and (frame["user_id"] == BIG).all()
        assert frame["item_id"].iloc[:5].tolist() == features["item_id"].tolist()
        assert str(frame["genre"].dtype) == "Int64"  # missing values: nullable, not float64
        assert frame["genre"].iloc[:5].tolist() == [pd.NA if v is None else v for v in features["genre"]]


def test_two_workers_share_a_folder_and_recovery_leaves_a_live_segment_alone(tmp_path):
    a = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600)
    _log(a, "from-a")
    b = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600)  # recovers at start: a is alive
    assert b.stats()["recovered_rows"] == 0
    _log(b, "from-b")
    assert len(list((tmp_path / SEGMENTS).glob("seg-*"))) == 2
    a.close()
    b.close()
    log = read_request_log(tmp_path)
    assert sorted(log["request_id"].unique()) == ["from-a", "from-b"] and len(log) == 10


def test_a_compaction_that_falls_behind_is_counted_and_loses_nothing(tmp_path, monkeypatch):
    import prometheus_client

    from ctrflow import request_log

    def before(name: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(f"ctrflow_request_log_{name}_total") or 0.0

    start = {n: before(n) for n in ("requests", "backlog_full", "compaction_errors")}
    real = request_log._write_part
    monkeypatch.setattr(request_log, "_write_part", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=5, flush_seconds=0.05, max_backlog_rows=8, metrics=True)
    for i in range(4):
        _log(logger, f"r{i}")
    deadline = time.monotonic() + 30
    while logger.stats()["backlog_full"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = logger.stats()
    assert stats["backlog_full"] >= 1 and stats["compaction_errors"] >= 1 and stats["backlog_rows"] == 20
    assert before("backlog_full") > start["backlog_full"] and before("requests") == start["requests"] + 4
    assert read_request_log(tmp_path)["request_id"].nunique() == 4  # safe in the segments meanwhile
    monkeypatch.setattr(request_log, "_write_part", real)  # the disk has room again
    logger.close()
    assert logger.stats()["backlog_rows"] == 0
    assert _parts_frame(tmp_path)["request_id"].nunique() == 4


def test_bad_arguments_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="flush_rows"):
        RequestLogger(tmp_path, flush_rows=0)
    with RequestLogger(tmp_path) as logger, pytest.raises(ValueError, match="predictions"):
        logger.log_request(
            request_id="x", user_id=1, scenario="home", model="m:1", features=_features(3), predictions=np.zeros(2)
        )


def test_a_requests_shared_values_are_written_once_and_read_back_on_every_row(tmp_path):
    """The request id, user, scenario, model and a user feature (a list) are one run-end encoded value in the
    segment's record, and every one of the request's rows holds it when read back (segment and Parquet part alike)."""
    from ctrflow.request_log import _read_segment, constant

    hist = list(range(50))
    n = 4
    features = pa.table({"item_id": pa.array([11, 12, 13, 14], pa.int64()), "hist": constant(hist, pa.list_(pa.int64()), n)})
    logger = RequestLogger(tmp_path, column_types={"hist": pa.list_(pa.int64())}, flush_seconds=60, recover=False)
    logger.log_request(
        request_id="r1", user_id=7, scenario="home", model="m:1", features=features, predictions=np.array([0.1, 0.2, 0.3, 0.4]),
        item_ids=[11, 12, 13, 14], extra={"fallback_user": False, "latency_ms": 2.5},
    )  # fmt: skip
    (seg,) = (tmp_path / SEGMENTS).glob("seg-*")
    data = seg.read_bytes()
    record = pa.ipc.open_stream(data[16:]).read_all()  # past the 16-byte header: the raw record as written
    for name in ("request_id", "ts", "user_id", "scenario", "model", "hist", "fallback_user", "latency_ms"):
        assert pa.types.is_run_end_encoded(record.schema.field(name).type), name
    assert len(record.column("hist").chunk(0).values) == 1  # the 50 ids once, not once per candidate
    (table,), torn = _read_segment(seg)
    assert torn == 0 and table.schema.field("hist").type == pa.list_(pa.int64())
    for read in (read_request_log(tmp_path), None):
        if read is None:
            logger.close()  # compacted into Parquet: the same rows
            read = read_request_log(tmp_path)
            assert not list((tmp_path / SEGMENTS).glob("seg-*"))
        assert len(read) == n and read["request_id"].tolist() == ["r1"] * n and read["user_id"].tolist() == [7] * n
        assert read["item_id"].tolist() == [11, 12, 13, 14] and read["scenario"].tolist() == ["home"] * n
        assert all(list(h) == hist for h in read["hist"]) and read["latency_ms"].tolist() == [2.5] * n
        assert read["fallback_user"].tolist() == [False] * n and read["ts"].nunique() == 1


# ---- compaction in a process of its own (compaction="process", what the service uses) ------------------------
def _wait(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _parquet_requests(directory) -> pd.Series:
    """request_id of every candidate row in the compacted parts (not the segments)."""
    parts = [p for p in directory.glob("part-*.parquet")]
    return pd.concat([read_part(p, columns=["request_id"]).to_pandas()["request_id"] for p in parts]) if parts else pd.Series([], dtype=object)


def _parts_frame(directory) -> pd.DataFrame:
    """The compacted parts alone (not the segments), one row per candidate."""
    return pd.concat([read_part(p).to_pandas() for p in sorted(directory.glob("part-*.parquet"))], ignore_index=True)


def test_a_compactor_process_compacts_rotated_segments_off_the_writers_process(tmp_path):
    import psutil

    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=10, flush_seconds=0.05, compaction="process")
    child = logger._compactor
    assert child is not None and child.pid != os.getpid()
    # right after the fork its command line is the parent's, or empty during exec: wait for the compactor's own
    _wait(lambda: "compact" in psutil.Process(child.pid).cmdline(), what="the compactor's exec")
    for i in range(30):
        _log(logger, f"r{i}")
    # while the writer is open, its rotated segments reach Parquet through the other process, never through this one
    _wait(lambda: _parquet_requests(tmp_path).nunique() >= 28, what="the compactor process")
    assert logger.stats()["compactions"] == 0 and logger.stats()["compacted_rows"] == 0
    logger.close()
    assert child.returncode == 0  # its standard input ended: a last pass, then it exited
    assert not list((tmp_path / SEGMENTS).iterdir())
    written = _parquet_requests(tmp_path)
    assert sorted(written.unique()) == sorted(f"r{i}" for i in range(30)) and len(written) == 150  # once each
    assert logger.stats()["backlog_rows"] == 0


def test_a_compactor_that_dies_is_replaced_and_close_compacts_what_it_left(tmp_path):
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_rows=5, flush_seconds=3600, compaction="process")
    first = logger._compactor
    first.kill()
    first.wait(timeout=30)
    for i in range(4):  # each request fills a segment: rotated, and a new compactor is started at the first
        _log(logger, f"r{i}")
    _wait(lambda: logger._compactor is not first and logger._compactor is not None, what="a new compactor")
    second = logger._compactor
    second.kill()  # this one dies too: the rows wait in their segments, and close() compacts them here
    second.wait(timeout=30)
    _log(logger, "last")
    logger.close()
    assert not list((tmp_path / SEGMENTS).glob("seg-*"))
    assert sorted(_parquet_requests(tmp_path).unique()) == ["last", "r0", "r1", "r2", "r3"]
    assert len(read_request_log(tmp_path)) == 25


def kill_9_writer_after(script: str, log_dir, requests: int) -> list[str]:
    """Run a writer script (it prints its compactor's pid, then each request id once logged), kill -9 it after
    `requests` answers, wait for the compactor's last pass; the ids it answered."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(log_dir), str(REPO_ROOT)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    compactor = psutil.Process(int(proc.stdout.readline()))
    answered: list[str] = []
    while len(answered) < requests:
        line = proc.stdout.readline()
        assert line, "the writer stopped"
        answered.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    answered += [line.strip() for line in proc.stdout.read().splitlines()]
    proc.wait(timeout=30)
    compactor.wait(timeout=60)  # end of file on its pipe: the last pass takes the dead writer's segment too
    return answered


def test_the_compactor_outlives_a_kill_9_of_its_writer_and_compacts_everything_it_answered(tmp_path):
    log_dir = tmp_path / "log"
    writer = WRITER.replace("flush_seconds=0.05)", "flush_seconds=0.05, compaction='process')").replace(
        "for i in range(100000):", "print(logger._compactor.pid, flush=True)\nfor i in range(100000):"
    )
    answered = kill_9_writer_after(writer, log_dir, 300)
    assert not list((log_dir / SEGMENTS).glob("seg-*"))
    written = _parquet_requests(log_dir)
    assert set(answered) <= set(written) and written.value_counts().eq(5).all()


def test_a_segment_is_never_visible_before_its_writer_holds_it(tmp_path, monkeypatch):
    """A compactor pass (another worker's, a starting worker's recovery) that lands between a segment's creation and
    its writer's lock must not take it: it would compact the empty file, delete it, and the writer's rows would go
    into a deleted file. Made deterministic: a full pass runs inside the writer's own lock call."""
    from ctrflow import request_log
    from ctrflow.request_log import compact_unheld

    real = request_log.fcntl.flock
    passes = []

    def flock_after_a_pass(fd: int, op: int) -> None:
        if op == request_log.fcntl.LOCK_EX and os.fstat(fd).st_size == 0:  # the writer's lock of a segment it just created
            passes.append(compact_unheld(tmp_path))
        real(fd, op)

    monkeypatch.setattr(request_log.fcntl, "flock", flock_after_a_pass)
    # process mode: rotated segments are compacted by path, by whoever takes them (the writer's fd is closed)
    with RequestLogger(tmp_path, column_types=TYPES, flush_rows=1, flush_seconds=3600, recover=False, compaction="process") as logger:
        for i in range(5):  # each request opens a new segment
            _log(logger, f"r{i}", n=1)
            logger.flush()
    assert len(passes) == 5
    assert sorted(read_request_log(tmp_path)["request_id"]) == [f"r{i}" for i in range(5)]
    assert not list((tmp_path / SEGMENTS).iterdir())


def test_an_unknown_compaction_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compaction must be one of process, thread"):
        RequestLogger(tmp_path, compaction="sidecar")


def test_a_part_dictionary_encodes_everything_but_float_vectors(tmp_path):
    import pyarrow.parquet as pq

    with RequestLogger(tmp_path, column_types=TYPES) as logger:
        for i in range(3):
            _log(logger, f"r{i}")
    (part,) = tmp_path.glob("part-*.parquet")
    meta = pq.ParquetFile(part).metadata.row_group(0)
    encodings = {meta.column(k).path_in_schema.split(".")[0]: set(meta.column(k).encodings) for k in range(meta.num_columns)}
    dictionary = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert not encodings["vec"] & dictionary  # an embedding: values never repeat, a dictionary only costs time
    assert encodings["request_id"] & dictionary and encodings["genre"] & dictionary
    assert len(read_part(part)) == 15


def test_a_forked_child_does_not_keep_the_writers_segment_or_its_compactor_alive(tmp_path):
    """A worker that forks (a multiprocessing pool) after logging: the child inherits the segment's lock and the
    compactor's pipe unless they are closed in it; close() in the parent then waited for the compactor's 30 s
    timeout and blocked on the segment's lock for as long as the child lived."""
    logger = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600, compaction="process")
    _log(logger, "before-fork")
    pid = os.fork()
    if pid == 0:  # the child: lives on past the parent's close
        time.sleep(60)
        os._exit(0)
    try:
        started = time.monotonic()
        logger.close()
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert took < 20, f"close() waited {took:.0f}s on a forked child"
    assert _parquet_requests(tmp_path).tolist() == ["before-fork"] * 5 and not list((tmp_path / SEGMENTS).iterdir())


def test_a_compaction_stopped_between_a_segments_parts_never_loses_or_doubles_a_row(tmp_path, monkeypatch):
    """Records without one schema are written as several parts (part-X_1, then part-X last). A compactor killed
    between them leaves part-X_1 and the segment: readers ignore the orphan part and read the segment, and the next
    pass writes both parts; before, part-X was written first and a kill after it lost the rest of the segment."""
    from ctrflow import request_log

    logger = RequestLogger(tmp_path, column_types=TYPES, flush_seconds=3600, compaction="process")
    for i, extra in enumerate((1, "one")):  # an undeclared extra column, int then string: two schemas
        f = _features(5)
        logger.log_request(request_id=f"r{i}", user_id=7, scenario="home", model="m:1", features=f,
                           predictions=np.zeros(5), item_ids=f["item_id"].tolist(), extra={"note": extra})  # fmt: skip
    logger._rotate()
    (seg,) = (tmp_path / SEGMENTS).glob("seg-*")
    real, calls = os.replace, []

    def crash_at_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(request_log.os, "replace", crash_at_the_second)
    with pytest.raises(OSError, match="killed"):
        request_log.compact_segment(tmp_path, seg)
    monkeypatch.setattr(request_log.os, "replace", real)
    (orphan,) = tmp_path.glob("part-*")
    assert orphan.name.endswith("_1.parquet") and seg.exists()  # the segment is kept: nothing is lost
    assert request_log.complete_parts([orphan]) == []  # readers skip the orphan and read the segment instead
    logger.close()  # the next pass writes both parts
    parts = sorted(tmp_path.glob("part-*"))
    assert len(parts) == 2 and not list((tmp_path / SEGMENTS).iterdir())
    assert request_log.complete_parts(parts) == parts
    written = sorted(rid for p in parts for rid in read_part(p).column("request_id").to_pylist())
    assert written == ["r0"] * 5 + ["r1"] * 5


def test_requests_logged_while_closing_and_an_empty_request_are_compacted_by_close(tmp_path):
    for mode in ("process", "thread"):
        directory = tmp_path / mode
        logger = RequestLogger(directory, column_types=TYPES, flush_seconds=3600, compaction=mode)
        _log(logger, "a")
        logger.close()
        _log(logger, "late")  # answered after close: written, and compacted by the next close
        _log(logger, "empty", n=0)
        logger.close()
        assert logger.stats()["late_requests"] == 2 and logger.stats()["backlog_rows"] == 0
        assert not list((directory / SEGMENTS).iterdir()), mode
        assert sorted(_parquet_requests(directory).unique()) == ["a", "late"]


def _fast_record(logger: RequestLogger, rid: str, n: int, hist: list[int], age: float, shadow: bool = False) -> None:
    """A request logged as the service does (`OnlineScorer.log_features`): the user's values once (`constant`)."""
    features = _features(n, seed=len(rid))
    columns = {
        "hist": logger.constant("hist", hist, n),
        "age": logger.constant("age", age, n),
        "genre": logger.column("genre", features["genre"]),
        "vec": logger.column("vec", features["vec"]),
    }
    if shadow:  # a challenger attached for this request only
        columns["shadow_score"] = pa.array(np.linspace(0.2, 0.4, n), pa.float32())
    logger.log_request(
        request_id=rid, user_id=7, scenario="home", model="m:1", features=pa.table(columns),
        predictions=np.linspace(0, 1, n), item_ids=features["item_id"].tolist(), extra={"rank": list(range(1, n + 1))},
    )  # fmt: skip


def test_a_part_holds_one_row_per_request_and_reads_back_as_the_rows_logged(tmp_path):
    """Parts store a request's own values once (the user's history was ~half a part's write time, repeated per
    candidate) and its candidates' values as lists; every reader gets the rows as logged, one per candidate."""
    import pyarrow.parquet as pq

    from ctrflow.request_log import LAYOUT_KEY, part_rows

    types = {**TYPES, "hist": pa.list_(pa.int64()), "age": pa.float64()}
    logger = RequestLogger(tmp_path, column_types=types, flush_seconds=3600, compaction="thread")
    _fast_record(logger, "r0", 4, [1, 2, 3], 31.0)
    _fast_record(logger, "r1", 3, [], float("nan"), shadow=True)  # an empty history, a missing age, a shadow score
    _fast_record(logger, "r2", 0, [9], 40.0)  # no candidate: no row
    _fast_record(logger, "r3", 5, [4], 22.0)
    logged = read_request_log(tmp_path)  # from the segment, before compaction
    assert list(logged["request_id"]) == ["r0"] * 4 + ["r1"] * 3 + ["r3"] * 5
    assert logger.flush() is not None
    (part,) = tmp_path.glob("part-*.parquet")
    plain = pq.read_table(part)
    assert plain.column("request_id").to_pylist() == ["r0", "r1", "r3"]  # one row per request
    assert plain.schema.field("hist").type == pa.list_(pa.int64())  # once per request, not a list per candidate
    assert plain.column("hist").to_pylist() == [[1, 2, 3], [], [4]] and plain.column("age").to_pylist() == [31.0, None, 22.0]
    assert [len(v) for v in plain.column("item_id").to_pylist()] == [4, 3, 5]
    assert plain.column("shadow_score").to_pylist()[0] is None  # absent from r0's record: null on its candidates
    layout = json.loads(plain.schema.metadata[LAYOUT_KEY])
    assert layout["version"] == 2 and layout["rows"] == 12 and part_rows(part) == 12
    assert set(layout["candidate_columns"]) == {"item_id", "genre", "vec", "prediction", "rank", "shadow_score"}
    back = read_request_log(tmp_path)
    pd.testing.assert_frame_equal(back, logged)
    assert back["item_id"].dtype == np.int64 and back["item_id"].max() == BIG
    import duckdb  # any SQL engine unnests the lists (the module docstring's query)

    sql = f"SELECT request_id, unnest(item_id) AS item_id, unnest(prediction) AS p FROM read_parquet('{tmp_path}/*.parquet')"
    pd.testing.assert_frame_equal(duckdb.sql(sql).df(), logged[["request_id", "item_id", "prediction"]].rename(columns={"prediction": "p"}))
    assert back["shadow_score"].isna().tolist() == [True] * 4 + [False] * 3 + [True] * 5
    logger.close()


def test_a_value_shared_in_some_records_and_per_candidate_in_others_becomes_per_candidate(tmp_path):
    """A column is held once per request only where every record held it once; a record that gave it per candidate
    (a writer's pandas path) makes it a list per candidate for the whole part: never a value lost or guessed."""
    import pyarrow.parquet as pq

    types = {**TYPES, "hist": pa.list_(pa.int64()), "age": pa.float64()}
    logger = RequestLogger(tmp_path, column_types=types, flush_seconds=3600, compaction="thread")
    _fast_record(logger, "r0", 2, [1, 2], 30.0)
    features = _features(3).assign(hist=[[5], [5, 6], []], age=[20.0, 21.0, None])  # differs per candidate
    logger.log_request(request_id="r1", user_id=7, scenario="home", model="m:1", features=features, predictions=np.zeros(3))
    logged = read_request_log(tmp_path)
    logger.flush()
    (part,) = tmp_path.glob("part-*.parquet")
    assert pq.read_schema(part).field("hist").type == pa.list_(pa.list_(pa.int64()))
    back = read_request_log(tmp_path)
    pd.testing.assert_frame_equal(back, logged)
    assert back["hist"].map(list).tolist() == [[1, 2], [1, 2], [5], [5, 6], []] and back["age"].tolist()[2:4] == [20.0, 21.0]
    logger.close()


def test_a_damaged_request_row_part_is_an_error_not_misaligned_rows():
    from ctrflow.request_log import explode

    layout = {"layout": "request", "version": 2, "candidate_columns": ["item_id", "prediction"], "rows": 3}
    table = pa.table({"request_id": ["a", "b"], "item_id": [[1, 2], [3]], "prediction": [[0.1, 0.2], [0.3, 0.4]]})
    with pytest.raises(ValueError, match="'prediction' has a candidate count unlike 'item_id' in 1 request rows"):
        explode(table, layout)
    good = explode(table.set_column(2, "prediction", pa.array([[0.1, 0.2], [0.3]])), layout)
    assert good.column("request_id").to_pylist() == ["a", "a", "b"] and good.column("prediction").to_pylist() == [0.1, 0.2, 0.3]


def test_a_categorical_column_and_a_request_of_several_batches_are_read_and_compacted_whole(tmp_path):
    """Found by a break-it review of the request-row parts: a record is not always "schema + one batch". A categorical
    column adds a dictionary batch (the whole segment became unreadable and uncompactable, forever), and a table of
    chunked columns writes several batches (all but the first were dropped: candidates lost)."""
    logger = RequestLogger(tmp_path, flush_seconds=3600, compaction="thread")
    common = {"user_id": 1, "scenario": "s", "model": "m"}
    logger.log_request(request_id="plain", features=pd.DataFrame({"x": [1, 2]}), predictions=np.zeros(2), item_ids=[1, 2], **common)
    cat = pd.DataFrame({"x": [3, 4], "genre": pd.Categorical(["a", "b"])})
    logger.log_request(request_id="cat", features=cat, predictions=np.zeros(2), item_ids=[3, 4], **common)
    chunked = pa.concat_tables([pa.table({"x": [10]}), pa.table({"x": [20, 30]})])  # 3 candidates in 2 chunks
    logger.log_request(request_id="chunked", features=chunked, predictions=np.array([0.1, 0.2, 0.3]), item_ids=[5, 6, 7], **common)
    before = read_request_log(tmp_path)
    assert before["request_id"].tolist() == ["plain"] * 2 + ["cat"] * 2 + ["chunked"] * 3
    assert before["x"].tolist() == [1, 2, 3, 4, 10, 20, 30] and before["genre"].astype(object).tolist()[2:4] == ["a", "b"]
    logger.flush()
    assert not list((tmp_path / SEGMENTS).iterdir()) and logger.stats()["compacted_rows"] == 7
    after = read_request_log(tmp_path)
    assert after["x"].tolist() == before["x"].tolist() and after["item_id"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert after["genre"].astype(object).tolist()[2:4] == ["a", "b"]
    np.testing.assert_allclose(after["prediction"].to_numpy()[4:], [0.1, 0.2, 0.3], rtol=1e-6)
    logger.close()


def test_constant_reuses_one_row_arrays_of_repeated_scalars_keyed_by_exact_type_and_bounded(monkeypatch) -> None:
    """A request's repeated values (model tag, scenario, a user's gender) are converted once and reused; True and 1
    are equal dict keys but must stay a bool and an int64; a request id is never kept; a full cache drops its oldest
    entry (clearing all of it at once cost ~1 ms on one request)."""
    from ctrflow import request_log as rl

    monkeypatch.setattr(rl, "_SCALARS", {})
    a, b = rl.constant("m:1", pa.string(), 5), rl.constant("m:1", pa.string(), 7)
    assert a.values.buffers()[-1].address == b.values.buffers()[-1].address and len(a) == 5 and len(b) == 7
    assert rl.dense(pa.table({"x": b})).column("x").to_pylist() == ["m:1"] * 7
    assert rl.constant(True, None, 2).values.type == pa.bool_() and rl.constant(1, None, 2).values.type == pa.int64()
    assert rl.constant(1.5, None, 2).values.to_pylist() == [1.5]  # floats are converted, not kept
    rl.constant("r" * 32, pa.string(), 3, cache=False)
    assert ("r" * 32) not in {k[1] for k in rl._SCALARS} and 1.5 not in {k[1] for k in rl._SCALARS}
    rl.constant("z" * 300, pa.string(), 2)  # long strings are not kept (the bound is in entries)
    assert ("z" * 300) not in {k[1] for k in rl._SCALARS}
    monkeypatch.setattr(rl, "_SCALARS_MAX", 3)
    for v in range(10):
        rl.constant(v, pa.int64(), 1)
    assert [k[1] for k in rl._SCALARS] == [7, 8, 9]  # the oldest go first, one at a time
