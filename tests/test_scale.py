"""Training sets whose cost grows with rows: the ASOF behaviour join equals Feast's point-in-time join on ML-100K.

The features step reads the profile views through Feast's `get_historical_features` and the behaviour view
through an ASOF JOIN over the same Parquet source; the join every view used to go through (behaviour_join="feast",
which pairs each event with all of its user's earlier behaviour rows) is the reference here. ML-100K ships in the
recbole wheel (`make install`); nothing derived from it is written outside pytest's temp folders.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctrflow import features as F
from ctrflow.config import load_params
from ctrflow.data import load_source
from ctrflow.data.splits import make_split
from ctrflow.data.tables import behaviour_arrow, behaviour_at
from ctrflow.steps import TRAINING_FRAME, features_step


def _cells_equal(got: pd.Series, want: pd.Series) -> list[int]:
    """Rows where two columns differ (missing == missing; list cells compare by value and length)."""
    bad = []
    for i, (a, b) in enumerate(zip(got, want)):
        a_missing = a is None or (np.isscalar(a) and pd.isna(a))
        b_missing = b is None or (np.isscalar(b) and pd.isna(b))
        if a_missing or b_missing:
            same = a_missing and b_missing
        elif isinstance(a, list | np.ndarray) or isinstance(b, list | np.ndarray):
            same = np.array_equal(np.asarray(a), np.asarray(b)) and len(a) == len(b)
        else:
            same = a == b
        if not same:
            bad.append(i)
    return bad


@pytest.fixture(scope="module")
def ml100k_step(tmp_path_factory):
    """The features step on ML-100K, as the pipeline runs it (default params, data.source=movielens)."""
    root = tmp_path_factory.mktemp("ml100k")
    params = load_params(overrides={"data": {"source": "movielens"}})
    dataset = load_source("movielens", max_len=params["data"]["max_len"])
    dataset.save(root / "dataset")
    with pytest.MonkeyPatch.context() as mp:  # the training set is written in several slices, as at scale
        mp.setattr("ctrflow.steps.WRITE_SLICE_ROWS", 30_000)
        summary = features_step(params, root / "dataset", root / "repo", root / "training_set")
    return params, dataset, root, summary


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_asof_training_set_equals_feast_join_on_ml100k(ml100k_step):
    """Row for row, every column (names, order, dtypes, values) and every split: the new training set == Feast's."""
    params, dataset, root, summary = ml100k_step
    got = pd.read_parquet(root / "training_set" / TRAINING_FRAME)
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(root / "repo"))
    entity_df = dataset.interactions.copy()
    entity_df["split"] = make_split(entity_df, params["data"]["split"], seed=params["data"]["seed"]).to_numpy()
    want = F.historical_frame(store, entity_df, service=params["features"]["service"], behaviour_join="feast")
    want = want.reset_index(drop=True)
    assert len(got) == len(want) == 100_000 == summary["rows"]
    assert list(got.columns) == list(want.columns)
    # through Parquet as the step writes it: the same dtypes as the reference frame written the same way
    want_io = want.copy()
    want_io.to_parquet(root / "want.parquet", index=False)
    want_io = pd.read_parquet(root / "want.parquet")
    assert got.dtypes.astype(str).to_dict() == want_io.dtypes.astype(str).to_dict()
    for c in want.columns:
        bad = _cells_equal(got[c], want[c])
        assert not bad, f"column {c}: {len(bad)} rows differ, first {bad[0]}: {got[c].iloc[bad[0]]!r} != {want[c].iloc[bad[0]]!r}"
    assert got["split"].value_counts().to_dict() == want["split"].value_counts().to_dict() == summary["splits"]
    assert set(got["split"]) == {"train", "valid", "test"}
    # not vacuous: most events have a history, and the longest ones are cut at max_len
    lengths = got["hist_item_ids"].map(len)
    assert (lengths > 0).mean() > 0.9 and lengths.max() == params["data"]["max_len"]


def test_behaviour_table_is_the_obvious_one_with_ties_and_closing_rows():
    """Hand-made log: two events at one instant, a user with no positives, max_len cuts the oldest first."""
    ts = pd.to_datetime(["2026-01-01 00:00", "2026-01-01 01:00", "2026-01-01 01:00", "2026-01-01 02:00",
                         "2026-01-01 03:00", "2026-01-01 00:30"], utc=True).astype("datetime64[us, UTC]")
    inter = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 1, 2], "item_id": [10, 11, 12, 13, 14, 20], "label": [1, 1, 1, 0, 1, 0],
         "event_timestamp": ts}
    )
    table = behaviour_arrow(inter, max_len=2, closing=True).to_pydict()
    assert table["user_id"] == [1, 1, 1, 1, 1, 2, 2]
    assert table["hist_item_ids"] == [[], [10], [11, 12], [11, 12], [12, 14], [], []]
    assert table["user_n_events"] == [0, 1, 3, 4, 5, 0, 1]
    assert table["user_n_pos"] == [0, 1, 3, 3, 4, 0, 0]
    closing = [t.isoformat() for t in table["event_timestamp"][4:5]]
    assert closing == ["2026-01-01T03:00:00.000001+00:00"]
    # each non-closing row is what the slow obvious reference gives at its instant
    for u, t, hist in zip(table["user_id"], table["event_timestamp"], table["hist_item_ids"]):
        assert hist == behaviour_at(inter, u, pd.Timestamp(t), 2)


# ---- bounded memory: training rows over the budget stream from disk, with the same batches -----------------
def test_streamed_training_equals_in_memory(tiny_training_set, tmp_path):
    """Over `train.memory_budget_mb` the train split is encoded chunk by chunk to memory-mapped files; the encoder,
    every split's values, the batches and the trained weights and metrics equal those of the in-memory tensors."""
    import torch

    from ctrflow.data.spec import FeatureSpec
    from ctrflow.models import build_model
    from ctrflow.steps import SPEC_FILE
    from ctrflow.training.recipe import SplitData, model_params, train_evaluate_save
    from ctrflow.training.stream import DiskRows, encoded_row_bytes
    from ctrflow.training.trainer import TrainConfig, Trainer

    path = tiny_training_set / TRAINING_FRAME
    spec = FeatureSpec.load(tiny_training_set / SPEC_FILE)
    n_train = int((pd.read_parquet(path, columns=["split"]).split == "train").sum())
    budget = n_train * encoded_row_bytes(spec) / 2**20 / 2  # half of what the train rows need: streams
    memory = SplitData.from_parquet(path, spec, memory_budget_mb=None)
    streamed = SplitData.from_parquet(path, spec, memory_budget_mb=budget)
    assert isinstance(streamed.tensors["train"], DiskRows) and not isinstance(memory.tensors["train"], DiskRows)
    assert streamed.encoder.to_dict() == memory.encoder.to_dict()
    for split in ("train", "valid", "test"):
        assert set(streamed.tensors[split]) == set(memory.tensors[split])
        for k, v in memory.tensors[split].items():
            assert torch.equal(streamed.tensors[split][k], v), (split, k)
        np.testing.assert_array_equal(streamed.user_ids[split], memory.user_ids[split])
    # the trainer's batches (several per epoch, a short last one) gather the same rows from disk
    cfg = TrainConfig(epochs=2, batch_size=700, patience=5, progress=False, stream_order="rows")
    trainer = Trainer(build_model("lr", memory.encoder, model_params({}, "lr")), cfg)
    for idx in list(trainer.batch_indices(n_train, 1))[:3]:
        for k, v in memory.tensors["train"].items():
            assert torch.equal(streamed.tensors["train"][k][idx], v[idx])
    streamed.tensors["train"].release()  # dropping the mapped pages loses nothing
    assert torch.equal(streamed.tensors["train"]["item_id"], memory.tensors["train"]["item_id"])

    runs = {}
    for name, data in (("memory", memory), ("streamed", streamed)):
        runs[name] = train_evaluate_save(
            lambda data=data: build_model("dcnv2", data.encoder, model_params({}, "dcnv2")), data, cfg,
            model_dir=tmp_path / name,
        )
    assert runs["memory"].fit.epochs == 2
    want, got = runs["memory"].model.state_dict(), runs["streamed"].model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert runs["streamed"].metrics == runs["memory"].metrics
    assert [h["train_loss"] for h in runs["streamed"].fit.history] == [h["train_loss"] for h in runs["memory"].fit.history]


def test_block_windows_cover_every_row_once_in_sorted_windows():
    """10 rows in blocks of 3 (the last one of 1 row), 2 blocks per window: 4 blocks in 2 windows, each window's
    blocks ascending, together every row once; the same generator seed gives the same order, another seed another."""
    import torch

    from ctrflow.training.stream import block_windows

    windows = list(block_windows(10, 3, 2, torch.Generator().manual_seed(0)))
    assert [len(w) for w in windows] == [2, 2]
    blocks = [b for w in windows for b in w]
    assert sorted(blocks) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(w == sorted(w) for w in windows)
    assert windows == list(block_windows(10, 3, 2, torch.Generator().manual_seed(0)))
    orders = {tuple(b for w in block_windows(10, 3, 2, torch.Generator().manual_seed(s)) for b in w) for s in range(8)}
    assert len(orders) > 1  # the block order is drawn, not fixed
    assert list(block_windows(5, 10, 4, torch.Generator())) == [[(0, 5)]]  # one short block
    with pytest.raises(ValueError, match="block_rows"):
        list(block_windows(5, 0, 1, torch.Generator()))


def test_block_order_reads_every_streamed_row_once_per_epoch_from_its_window(tmp_path):
    """`stream_order: blocks` on DiskRows: each epoch's batches together hold every row exactly once, every batch
    lies inside one window of `stream_window_blocks` blocks, the epochs differ, and `rows` gives the in-memory
    permutation's batches (checked against `batch_indices`)."""
    import torch

    from ctrflow.training.stream import DiskRows
    from ctrflow.training.trainer import TrainConfig, Trainer, gather_rows

    n, block, window = 1_000, 64, 3
    np.save(tmp_path / "row.npy", np.arange(n, dtype=np.int64))
    np.save(tmp_path / "label.npy", (np.arange(n) % 2).astype(np.float32))
    rows = DiskRows(tmp_path, ["row", "label"])
    cfg = TrainConfig(batch_size=50, progress=False, stream_block_rows=block, stream_window_blocks=window)
    trainer = Trainer(torch.nn.Linear(1, 1), cfg)
    seen_by_epoch = []
    for epoch in (1, 2):
        seen = []
        for source, idx in trainer.epoch_batches(rows, epoch):
            batch = gather_rows(source, idx)["row"].numpy()
            assert len(batch) <= cfg.batch_size
            assert len(np.unique(batch // block)) <= window  # at most `window` blocks in a batch
            seen.append(batch)
        seen = np.concatenate(seen)
        assert np.array_equal(np.sort(seen), np.arange(n))
        seen_by_epoch.append(seen)
    assert not np.array_equal(seen_by_epoch[0], seen_by_epoch[1])
    assert not np.array_equal(seen_by_epoch[0], np.arange(n))  # shuffled within windows too
    ordered = Trainer(torch.nn.Linear(1, 1), TrainConfig(batch_size=50, progress=False, stream_order="rows"))
    got = [gather_rows(s, i)["row"] for s, i in ordered.epoch_batches(rows, 1)]
    want = list(ordered.batch_indices(n, 1))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="stream_order"):
        TrainConfig(stream_order="files")


def test_block_order_trains_streamed_rows_to_the_in_memory_quality(tiny_training_set, monkeypatch):
    """The default streamed order (blocks) reaches the trainer through `train_evaluate_save` (windows are read and
    the batches differ from the in-memory run: once, the rows went in as a plain dict and were gathered row by row,
    unreleased) and trains DCNv2 on the tiny training set to a validation AUC within 0.02 of the in-memory run."""
    from ctrflow.data.spec import FeatureSpec
    from ctrflow.models import build_model
    from ctrflow.steps import SPEC_FILE
    from ctrflow.training.recipe import SplitData, model_params, train_evaluate_save
    from ctrflow.training.stream import DiskRows, encoded_row_bytes
    from ctrflow.training.trainer import TrainConfig

    path = tiny_training_set / TRAINING_FRAME
    spec = FeatureSpec.load(tiny_training_set / SPEC_FILE)
    n_train = int((pd.read_parquet(path, columns=["split"]).split == "train").sum())
    budget = n_train * encoded_row_bytes(spec) / 2**20 / 2
    cfg = TrainConfig(epochs=2, batch_size=256, patience=5, progress=False, stream_block_rows=512, stream_window_blocks=4)
    reads = []
    real_read = DiskRows.read_window
    monkeypatch.setattr(DiskRows, "read_window", lambda self, blocks: reads.append(blocks) or real_read(self, blocks))
    aucs, losses = {}, {}
    for name, mb in (("memory", None), ("blocks", budget)):
        data = SplitData.from_parquet(path, spec, memory_budget_mb=mb)
        assert isinstance(data.tensors["train"], DiskRows) == (name == "blocks")
        run = train_evaluate_save(lambda data=data: build_model("dcnv2", data.encoder, model_params({}, "dcnv2")),
                                  data, cfg)
        aucs[name] = run.fit.best_valid_auc
        losses[name] = [h["train_loss"] for h in run.fit.history]
    n_blocks = -(-n_train // 512)
    assert sum(len(b) for b in reads) == 2 * n_blocks  # every block once per epoch, 2 epochs
    assert losses["blocks"] != losses["memory"]
    assert aucs["memory"] > 0.6, aucs
    assert abs(aucs["blocks"] - aucs["memory"]) < 0.02, aucs


def test_every_step_ends_with_rows_seconds_and_peak_memory(caplog):
    """The closing line of a metered step: rows from its result, seconds, and a peak that saw its allocation."""
    import logging

    from ctrflow.meter import metered, progress

    @metered("demo")
    def step(n: int) -> dict:
        block = np.ones(n, dtype=np.uint8)  # 64 MiB touched: the step's peak must count it
        progress(n // 2, n, "half")
        return {"rows": int(block.sum() // 2**20)}

    with caplog.at_level(logging.INFO, logger="ctrflow"):
        assert step(64 * 2**20) == {"rows": 64}
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrflow"]
    closing = [line for line in lines if "peak RSS" in line and "so far" not in line]
    assert len(closing) == 1 and closing[0].startswith("demo: 64 rows, ")
    peak = float(closing[0].split("peak RSS ")[1].split(" MB")[0].replace(",", ""))
    assert peak >= 64
    assert any(line.startswith("demo: half: 33,554,432/67,108,864 rows (50%)") and "ETA" in line for line in lines)


# ---- bounded memory: the training set joined and written a user range at a time ---------------------------------
def test_chunked_training_set_equals_one_chunk_with_all_null_chunks(tiny_dataset, tmp_path):
    """With a tiny `chunk_rows` (many user ranges, merged back into row order through temporary files) the training
    frame equals the one-chunk frame: rows in the entity order (shuffled here), index, dtypes and every value, in
    memory and through Parquet. An unknown user's chunk has every user-profile column null and an int64 profile field
    null where the rest of the chunks have none: the fixed schema keeps the types, pandas reads float64 with NaN as
    for the whole frame. The behaviour table written in batches equals the one built at once."""
    import pyarrow.parquet as pq

    from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
    from ctrflow.steps import write_frame

    users = tiny_dataset.users.assign(n_kids=(tiny_dataset.users.user_id % 3).astype("int64"))
    spec = FeatureSpec.from_dict(tiny_dataset.spec.to_dict())
    spec.fields.append(FieldSpec("n_kids", FieldKind.NUMERIC, Entity.USER, buckets=3))
    ds = type(tiny_dataset)(tiny_dataset.name, tiny_dataset.interactions, users, tiny_dataset.items, spec)
    F.write_feature_tables(ds, tmp_path / "data", chunk_rows=700)  # ~9 batches of whole users
    written = pq.read_table(tmp_path / "data" / "user_behaviour.parquet")
    assert pq.ParquetFile(tmp_path / "data" / "user_behaviour.parquet").metadata.num_row_groups > 1
    at_once = behaviour_arrow(ds.interactions, spec["hist_item_ids"].max_len, closing=True)
    assert written.select(at_once.column_names).equals(at_once.cast(written.select(at_once.column_names).schema))
    store = F.apply_repo(F.copy_repo(tmp_path / "repo"), tmp_path / "data")

    unknown = 987_654  # no profile row, more rows than a chunk: a chunk (user range) of its own, user fields all null
    last = ds.interactions.event_timestamp.max()
    extra = pd.DataFrame({"user_id": [unknown] * 61 + [5], "item_id": [1] * 60 + [unknown, unknown], "scenario": "home",
                          "label": 0, "event_timestamp": pd.Series([last] * 62).astype("datetime64[us, UTC]")})
    entity = pd.concat([ds.interactions.iloc[:1500], extra], ignore_index=True).sample(frac=1, random_state=0)
    entity["split"] = np.where(np.arange(len(entity)) % 5 == 0, "test", "train")
    assert F._user_ranges(entity.user_id.to_numpy(), 60)[-1] == (unknown, unknown)

    whole = F.historical_frame(store, entity, lists=False)
    chunks = list(F.historical_chunks(store, entity, lists=False, chunk_rows=60))
    assert len(chunks) > 10 and sorted(np.concatenate([p for p, _ in chunks]).tolist()) == list(range(len(entity)))
    lone = chunks[-1][1]
    assert set(lone.user_id) == {unknown} and lone[["gender", "region", "n_kids"]].isna().all().all()
    assert lone["n_kids"].dtype == np.float64 and chunks[0][1]["n_kids"].dtype == np.int64
    chunked = F.historical_frame(store, entity, lists=False, chunk_rows=60)
    assert list(chunked.index) == list(whole.index) and list(chunked.columns) == list(whole.columns)
    assert chunked.dtypes.to_dict() == whole.dtypes.to_dict() and whole["n_kids"].dtype == np.float64
    for c in whole.columns:
        assert not _cells_equal(chunked[c], whole[c]), c

    write_frame(whole.reset_index(drop=True), tmp_path / "want.parquet")  # today's way: the whole frame at once
    want = pd.read_parquet(tmp_path / "want.parquet")
    for name, rows in (("one", None), ("many", 60)):
        n = F.write_historical_frame(store, entity, tmp_path / f"{name}.parquet", chunk_rows=rows, slice_rows=97)
        got = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert n == len(got) == len(entity) and list(got.columns) == list(want.columns)
        assert got.dtypes.to_dict() == want.dtypes.to_dict()
        for c in want.columns:
            bad = _cells_equal(got[c], want[c])
            assert not bad, f"{name}: column {c}: {len(bad)} rows differ, first {bad[0]}"
    assert not list(tmp_path.glob(".*.chunks"))  # the chunk files are gone
    # not vacuous: unknown users/items are null, known ones are not, histories are there
    assert want.loc[want.user_id == unknown, "gender"].isna().all() and want.loc[want.user_id != unknown, "gender"].notna().all()
    assert want.loc[want.item_id == unknown, "category"].isna().all() and want["hist_item_ids"].map(len).max() == 10


def test_user_ranges_and_first_rows_per_key(tmp_path):
    """Chunks are whole users of about chunk_rows rows (a heavy user alone); register's item rows are the first of
    each item in file order, read in batches, as drop_duplicates of the whole file keeps them."""
    from ctrflow.steps import first_rows_per_key

    users = np.array([3, 1, 1, 2, 9, 9, 9, 9, 9, 2, 4])  # counts: 1:2, 2:2, 3:1, 4:1, 9:5
    assert F._user_ranges(users, None) == [None] and F._user_ranges(users, 11) == [None]
    assert F._user_ranges(users, 4) == [(1, 2), (3, 4), (9, 9)]
    assert F._user_ranges(users, 1) == [(1, 1), (2, 2), (3, 3), (4, 4), (9, 9)]

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"item_id": rng.integers(0, 40, 1000), "price": np.arange(1000.0),
                          "emb": [np.full(3, i, dtype=np.float32) for i in range(1000)], "other": "x"})
    frame.to_parquet(tmp_path / "f.parquet", index=False)
    got = first_rows_per_key(tmp_path / "f.parquet", "item_id", ["price", "emb", "not_there"], batch_rows=77)
    want = frame.drop_duplicates(subset=["item_id"]).reset_index(drop=True)
    assert list(got.columns) == ["item_id", "price", "emb"] and len(got) == len(want) == 40
    assert got[["item_id", "price"]].equals(want[["item_id", "price"]])
    assert all(np.array_equal(a, b) for a, b in zip(got["emb"], want["emb"]))


def test_drift_reference_is_read_in_batches_and_equals_the_tail(tiny_training_set):
    """The drift reference (the last n train rows) read batch by batch equals the whole-frame tail, for n larger
    than one batch, n spanning batches, n above the split's size, and a split that is not there."""
    from ctrflow.steps import last_split_rows, load_training_set

    frame, spec = load_training_set(tiny_training_set)
    n_train = int((frame["split"] == "train").sum())
    for split, n, batch in (("train", 7, 5), ("train", 130, 64), ("train", n_train + 10, 100), ("valid", 3, 1000)):
        got, got_spec = last_split_rows(tiny_training_set, split, n, batch_rows=batch)
        want = frame[frame["split"] == split].tail(n).reset_index(drop=True)
        assert len(got) == min(n, len(want)) and got_spec.to_dict() == spec.to_dict()
        pd.testing.assert_frame_equal(got, want)
    empty, _ = last_split_rows(tiny_training_set, "holdout", 5)
    assert empty.empty and list(empty.columns) == list(frame.columns)
