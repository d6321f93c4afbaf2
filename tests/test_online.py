"""The service's fast scoring path (ctrflow/online.py) against today's path, on a real Feast store (SQLite online
store): same scores for every model family, same request-log rows, and a re-materialised item value served after
the refresh."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

SERVICE = "ctr_ranking"


@pytest.fixture(scope="module")
def online(tmp_path_factory, tiny_dataset, tiny_frame):
    """A Feast repo applied and materialised from the tiny dataset, and an encoder fitted on its frame."""
    from ctrflow import features
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.models.base import to_tensors

    root = tmp_path_factory.mktemp("online")
    repo = features.copy_repo(root / "repo")
    features.write_feature_tables(tiny_dataset, repo / "data")
    store = features.apply_repo(repo, repo / "data")
    features.materialize(store)
    encoder = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame)
    tensors = to_tensors(encoder.transform(tiny_frame))
    return {"repo": repo, "store": store, "encoder": encoder, "tensors": tensors, "frame": tiny_frame}


def _requests(frame: pd.DataFrame) -> list[tuple[int, str, list[int]]]:
    """A known user with 100 known candidates, an unknown user, and unknown items mixed with known ones."""
    user = int(frame["user_id"].iloc[0])
    items = [int(i) for i in pd.unique(frame["item_id"])[:100]]
    scenarios = sorted(frame["scenario"].unique())
    unknown_user, unknown_item = int(frame["user_id"].max()) + 1000, int(frame["item_id"].max()) + 1000
    return [
        (user, scenarios[0], items),
        (user, scenarios[-1], items[:7]),
        (unknown_user, scenarios[0], items[:5]),
        (user, scenarios[0], [unknown_item, *items[:3], unknown_item + 1]),
        (int(frame["user_id"].iloc[-1]), scenarios[-1], items[::-1][:50]),
    ]


def test_value_encoder_equals_the_encoder_on_every_field(online):
    from ctrflow.online import ValueEncoder

    encoder = online["encoder"]
    frame = online["frame"]
    for f in encoder.spec.fields:
        enc = ValueEncoder(encoder, f)
        values = list(frame[f.column].iloc[:20]) + [None]
        if f.kind.value == "categorical":
            values += [float("nan"), "no-such-value", 10**12]
            if enc.int_vocab:
                values += [str(encoder.vocabs[f.name][0])]  # a string of digits matches the integer id
        if f.kind.value == "numeric":
            values += [float("nan"), -1e9, 1e9, *encoder.boundaries[f.name]]
        if f.kind.value == "sequence":
            values += [[], list(range(3 * f.max_len)), [10**12]]
        for v in values:
            cell = pd.Series([v], dtype=object)
            expected = encoder._encode(f, cell)[0]
            np.testing.assert_array_equal(enc(v), expected, err_msg=f"field {f.name}, value {v!r}")


def test_value_encoder_by_hand():
    """Hand-computed codes: vocabulary index + 1, 0 for unknown; numeric buckets by the boundaries (side right)."""
    from ctrflow.data.spec import Entity, FieldKind, FieldSpec
    from ctrflow.online import ValueEncoder

    cat = FieldSpec("c", FieldKind.CATEGORICAL, Entity.USER)
    num = FieldSpec("x", FieldKind.NUMERIC, Entity.USER, buckets=3)
    seq = FieldSpec("s", FieldKind.SEQUENCE, Entity.USER, max_len=3, vocab_of="c")
    fake = type("E", (), {"vocabs": {"c": [10, 20, 30]}, "boundaries": {"x": [1.0, 2.0]}})()
    assert int(ValueEncoder(fake, cat)(20)) == 2 and int(ValueEncoder(fake, cat)(99)) == 0
    assert int(ValueEncoder(fake, cat)("30")) == 3 and int(ValueEncoder(fake, cat)(None)) == 0
    assert [int(ValueEncoder(fake, num)(v)) for v in (0.5, 1.0, 1.5, 2.0, 7.0, math.nan)] == [1, 2, 2, 3, 3, 0]
    assert ValueEncoder(fake, seq)([10, 99, 20, 30]).tolist() == [0, 2, 3]  # the 3 most recent, in order
    assert ValueEncoder(fake, seq)([30]).tolist() == [3, 0, 0]


@pytest.mark.parametrize("family", ["dcnv2", "deepfm", "dgenctr", "din", "dmae", "early_fusion", "gsvr", "lr", "mmoe", "ple", "sharedbottom", "simtier", "star"])
def test_fast_path_scores_equal_the_frame_path_for_every_family(online, family):
    from ctrflow import features
    from ctrflow.models import build_model, known_models
    from ctrflow.online import OnlineScorer
    from ctrflow.training.artifact import Scorer
    from ctrflow.training.trainer import seed_everything

    assert family in known_models()
    seed_everything(0)
    model = build_model(family, online["encoder"], {})
    model.prepare(online["tensors"])  # DMAE fills its per-item modality table; a no-op elsewhere
    model.eval()
    scorer = Scorer(model, online["encoder"])
    fast = OnlineScorer(online["store"], SERVICE, model, online["encoder"], refresh_s=0)
    for user, scenario, items in _requests(online["frame"]):
        expected = scorer.score(features.online_frame(online["store"], user, items, scenario, service=SERVICE))
        got = fast.rank_scores(user, scenario, items)
        assert got.scores.shape == (len(items),) and got.scores.dtype == np.float32
        np.testing.assert_allclose(got.scores, expected, rtol=0, atol=1e-6, err_msg=f"{family}: user {user}, {scenario}")
        assert set(got.timings) == {"feature_read", "encode", "model"}


def test_user_read_direct_and_through_get_online_features_agree(online):
    """Views without TTL are read through the provider directly; the public get_online_features path (used for views
    with a TTL) gives the same values, for a known and an unknown user."""
    from ctrflow.models import build_model
    from ctrflow.online import OnlineScorer

    fast = OnlineScorer(online["store"], SERVICE, build_model("lr", online["encoder"], {}), online["encoder"], refresh_s=0)
    assert fast._views is not None  # the tiny repo's user views have no TTL
    frame = online["frame"]
    for user in (int(frame["user_id"].iloc[0]), int(frame["user_id"].max()) + 1000):
        direct = fast.read_user(user)
        fast._views = None
        public = fast.read_user(user)
        fast._views = fast._direct_views()
        assert direct.keys() == public.keys()
        for name in direct:
            a, b = direct[name], public[name]
            if isinstance(a, list | np.ndarray):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            else:
                assert (pd.isna(a) and pd.isna(b)) or a == b, f"{name}: {a!r} != {b!r}"


@pytest.mark.parametrize("to_constant", [True, False], ids=["constant", "column"])
def test_request_log_rows_equal_the_frame_path(online, tmp_path, to_constant):
    """The features logged from the fast path are the values online_frame serves, column for column: with the user's
    values converted once by the log's declared types (`RequestLogger.constant`, as the service does) and by the
    column conversion (`to_arrow` alone)."""
    from ctrflow import features
    from ctrflow.models import build_model
    from ctrflow.online import OnlineScorer
    from ctrflow.request_log import RequestLogger, read_request_log, schema_for_spec

    encoder = online["encoder"]
    model = build_model("dcnv2", encoder, {})
    types = schema_for_spec(encoder.spec, encoder.vocabs)
    logs = {k: RequestLogger(tmp_path / k, column_types=types, flush_seconds=60, recover=False) for k in ("frame", "fast")}
    fast = OnlineScorer(
        online["store"], SERVICE, model, encoder, refresh_s=0, to_arrow=logs["fast"].column,
        to_constant=logs["fast"].constant if to_constant else None,
    )  # fmt: skip
    for k, (user, scenario, items) in enumerate(_requests(online["frame"])):
        ranked = fast.rank_scores(user, scenario, items)
        common = {"request_id": str(k), "user_id": user, "scenario": scenario, "model": "m:1", "item_ids": items}
        frame = features.online_frame(online["store"], user, items, scenario, service=SERVICE)
        logs["frame"].log_request(features=frame, predictions=ranked.scores, **common)
        logs["fast"].log_request(features=fast.log_features(ranked, user, items, scenario), predictions=ranked.scores, **common)
    for log in logs.values():
        log.close()
    old, new = (read_request_log(tmp_path / k).drop(columns=["ts", "event_timestamp"]) for k in ("frame", "fast"))
    assert list(new.columns) == list(old.columns)
    assert len(new) == len(old) == sum(len(r[2]) for r in _requests(online["frame"]))
    for c in old.columns:
        for a, b in zip(old[c], new[c]):
            if isinstance(a, np.ndarray | list) or isinstance(b, np.ndarray | list):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=c)
            else:
                assert (pd.isna(a) and pd.isna(b)) or a == b, f"column {c}: {a!r} != {b!r}"


def test_a_rematerialised_item_value_is_served_after_the_refresh(online, tiny_dataset):
    from ctrflow import features
    from ctrflow.models import build_model
    from ctrflow.online import OnlineScorer
    from ctrflow.training.artifact import Scorer

    store, encoder = online["store"], online["encoder"]
    model = build_model("dcnv2", encoder, {})
    fast = OnlineScorer(store, SERVICE, model, encoder, refresh_s=0)
    user, scenario, items = _requests(online["frame"])[0]
    item = items[0]
    before = fast.rank_scores(user, scenario, items).scores
    assert not fast.refresh()  # nothing materialised since the snapshot

    changed = tiny_dataset.items.copy()
    row = changed["item_id"] == item
    other = sorted(set(changed["category"].dropna()) - set(changed.loc[row, "category"]))[0]
    changed.loc[row, "category"] = other
    changed.loc[row, "price"] = float(changed["price"].max()) * 10  # the top bucket
    try:
        features.write_feature_tables(dataclasses.replace(tiny_dataset, items=changed), online["repo"] / "data")
        features.materialize(store)
        stale = fast.rank_scores(user, scenario, items).scores
        np.testing.assert_array_equal(stale, before)  # the snapshot is kept until the refresh
        assert fast.refresh()
        after = fast.rank_scores(user, scenario, items)
        expected = Scorer(model, encoder).score(features.online_frame(store, user, items, scenario, service=SERVICE))
        np.testing.assert_allclose(after.scores, expected, rtol=0, atol=1e-6)
        assert after.scores[0] != before[0]  # the re-materialised value changed this candidate's score
        np.testing.assert_array_equal(after.scores[1:], before[1:])
        row_index = after.snapshot.row_of[item]
        price = encoder.spec["price"]
        assert int(after.snapshot.encoded["price"][row_index]) == len(encoder.boundaries[price.name]) + 1
    finally:  # the module's other tests read the original values
        features.write_feature_tables(tiny_dataset, online["repo"] / "data")
        features.materialize(store)


def test_refresh_thread_swaps_without_failing_requests(online):
    """With a refresh period, a worker's watcher swaps in a new snapshot by itself; requests keep being answered."""
    import time

    from ctrflow import features
    from ctrflow.models import build_model
    from ctrflow.online import OnlineScorer

    model = build_model("lr", online["encoder"], {})
    fast = OnlineScorer(online["store"], SERVICE, model, online["encoder"], refresh_s=0.05)
    try:
        first = fast.snapshot
        user, scenario, items = _requests(online["frame"])[0]
        features.materialize(online["store"])
        deadline = time.monotonic() + 30
        answered = 0
        while fast.snapshot is first and time.monotonic() < deadline:
            assert fast.rank_scores(user, scenario, items).scores.shape == (len(items),)
            answered += 1
        assert fast.snapshot is not first and fast.refreshes == 1 and fast.refresh_errors == 0
        assert answered > 0
        assert fast.snapshot.marker == features.materialization_marker(online["repo"])
    finally:
        fast.close()
