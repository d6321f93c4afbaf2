"""The Feast feature store on the tiny synthetic dataset: no leakage, parity with the pandas join, online = offline.

One applied store per module (apply + materialize take seconds); every store lives in its own temp copy of the repo.
A crafted user (USER) with known events is appended to the dataset so the leakage cases can be checked by hand.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from ctrflow import features as F
from ctrflow.data.frames import point_in_time_frame
from ctrflow.data.spec import FeatureSpec, FieldKind
from ctrflow.data.tables import TS_DTYPE, Dataset, behaviour_at
from ctrflow.local_services import ONLINE_STORES

USER = 9_001  # not among the synthetic users (1..200)
T0 = pd.Timestamp("2026-01-10", tz="UTC")
HOUR = pd.Timedelta(hours=1)
UNKNOWN = 987_654


def _crafted(ds: Dataset) -> Dataset:
    """tiny_dataset + USER: item 1 at T0; items 2 and 3 at the same instant T0+1h; a negative; item 5 at T0+3h."""
    rows = pd.DataFrame(
        {
            "user_id": np.int64(USER),
            "item_id": np.array([1, 2, 3, 4, 5], dtype=np.int64),
            "scenario": "home",
            "label": np.array([1, 1, 1, 0, 1], dtype=np.int64),
            "event_timestamp": pd.Series([T0, T0 + HOUR, T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR]).astype(TS_DTYPE),
        }
    )
    inter = pd.concat([ds.interactions, rows], ignore_index=True)
    users = pd.concat([ds.users, pd.DataFrame({"user_id": [USER], "age_bucket": ["25-34"], "gender": ["F"], "region": ["r1"]})])
    return Dataset(ds.name, inter, users.reset_index(drop=True), ds.items, ds.spec)


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> Dataset:
    return _crafted(tiny_dataset)


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("feast")
    F.write_feature_tables(dataset, root / "data")
    repo = F.copy_repo(root / "repo")
    return F.apply_repo(repo, root / "data")


@pytest.fixture(scope="module", params=ONLINE_STORES)
def online_store(request, dataset, tmp_path_factory, online_repo):
    """An applied store whose online store is SQLite or Redis (one parameter), materialized past the last event."""
    root = tmp_path_factory.mktemp(f"feast-{request.param}")
    F.write_feature_tables(dataset, root / "data")
    repo = online_repo(F.copy_repo(root / "repo"), request.param)
    store = F.apply_repo(repo, root / "data")
    assert type(store._get_provider().online_store).__name__.lower().startswith(request.param)
    F.materialize(store, end=(dataset.interactions.event_timestamp.max() + pd.Timedelta(days=1)).to_pydatetime())
    return store


@pytest.fixture(scope="module")
def offline(store, dataset) -> pd.DataFrame:
    return F.historical_frame(store, dataset.interactions)


def _same(a: object, b: object) -> bool:
    """Cell equality where missing == missing and vectors compare by value."""
    a_missing = a is None or (np.isscalar(a) and pd.isna(a))
    b_missing = b is None or (np.isscalar(b) and pd.isna(b))
    if a_missing or b_missing:
        return a_missing and b_missing
    if isinstance(a, list | np.ndarray) or isinstance(b, list | np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _assert_columns_equal(got: pd.DataFrame, want: pd.DataFrame, columns: list[str]) -> None:
    for c in columns:
        bad = [i for i, (x, y) in enumerate(zip(got[c], want[c])) if not _same(x, y)]
        assert not bad, f"column {c}: {len(bad)} rows differ, first row {bad[0]}: {got[c].iloc[bad[0]]!r} != {want[c].iloc[bad[0]]!r}"


def _entities(user: int, items: list[int], at: pd.Timestamp) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.full(len(items), user, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "scenario": "home",
            "label": np.int64(0),
            "event_timestamp": pd.Series([at] * len(items)).astype(TS_DTYPE),
        }
    )


def test_feature_stamped_after_an_event_is_never_joined(store, dataset):
    """The event itself, same-instant events and later events never reach an entity row; profiles need a stamp <= t."""
    times = [T0 - pd.Timedelta(microseconds=1), T0, T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR, T0 + 400 * 24 * HOUR]
    entity = pd.concat([_entities(USER, [7], t) for t in times], ignore_index=True)
    frame = F.historical_frame(store, entity)
    assert frame["hist_item_ids"].tolist() == [[], [], [1], [1, 2, 3], [1, 2, 3], [1, 2, 3, 5]]
    assert frame["user_n_events"].tolist() == [0, 0, 1, 3, 4, 5]
    assert frame["user_n_pos"].tolist() == [0, 0, 1, 3, 3, 4]
    # the event's own item and its same-instant neighbour are absent at T0+1h (behaviour rows hold only t' < t)
    own = F.historical_frame(store, dataset.interactions[dataset.interactions.user_id == USER])
    assert own["hist_item_ids"].tolist() == [[], [1], [1], [1, 2, 3], [1, 2, 3]]
    # a profile row (stamped 1970-01-01) is not joined to an entity row before it
    before = F.historical_frame(store, _entities(1, [1], F.PROFILE_TIMESTAMP - pd.Timedelta(days=1)))
    assert before[["age_bucket", "category", "price"]].isna().all(axis=None)
    assert before["text_emb"].iloc[0] is None
    after = F.historical_frame(store, _entities(1, [1], F.PROFILE_TIMESTAMP))
    assert after["age_bucket"].iloc[0] == dataset.users.set_index("user_id").loc[1, "age_bucket"]


def test_historical_frame_equals_point_in_time_frame(offline, dataset):
    want = point_in_time_frame(dataset)
    assert list(offline.columns) == list(want.columns)
    assert offline.dtypes.astype(str).to_dict() == want.dtypes.astype(str).to_dict()
    assert offline.index.equals(want.index)
    _assert_columns_equal(offline, want, list(want.columns))
    # and the behaviour sequence is the obvious one, strictly before each event
    sample = dataset.interactions.sample(50, random_state=0)
    for i, row in sample.iterrows():
        assert offline.at[i, "hist_item_ids"] == behaviour_at(dataset.interactions, row.user_id, row.event_timestamp, 10)


def test_online_equals_offline_after_materialize(online_store, dataset):
    store = online_store
    end = dataset.interactions.event_timestamp.max() + pd.Timedelta(days=1)
    items = [1, 2, 3, 5, 42, 150]
    busiest = int(dataset.interactions.user_id.value_counts().index[0])
    for user in (USER, busiest, 17):
        online = F.online_frame(store, user, items, "search")
        assert len(online) == len(items) and online["item_id"].tolist() == items
        assert (online["scenario"] == "search").all() and "label" not in online.columns
        offline = F.historical_frame(store, _entities(user, items, end))
        features = [c for c in offline.columns if c not in ("scenario", "label", "event_timestamp")]
        assert [c for c in online.columns if c not in ("scenario", "event_timestamp")] == features
        _assert_columns_equal(online, offline, features)
        assert online["user_n_events"].dtype == np.int64
        # online serves the state after the user's last event: every positive so far (last max_len)
        assert online["hist_item_ids"].iloc[0] == behaviour_at(dataset.interactions, user, end, 10)
    assert F.online_frame(store, USER, items, "home")["hist_item_ids"].iloc[0] == [1, 2, 3, 5]


def test_unknown_user_and_item_are_missing_not_errors(online_store, dataset):
    store = online_store
    online = F.online_frame(store, UNKNOWN, [1, UNKNOWN], "home")
    assert online["hist_item_ids"].tolist() == [[], []]
    assert online["user_n_events"].tolist() == [0, 0] and online["user_n_events"].dtype == np.int64
    assert online["age_bucket"].isna().all()
    assert online.loc[0, "category"] == dataset.items.set_index("item_id").loc[1, "category"]
    assert pd.isna(online.loc[1, "category"]) and np.isnan(online.loc[1, "price"]) and online.loc[1, "text_emb"] is None
    offline = F.historical_frame(store, _entities(UNKNOWN, [1, UNKNOWN], T0))
    assert offline["hist_item_ids"].tolist() == [[], []] and offline["user_n_pos"].tolist() == [0, 0]
    assert offline["age_bucket"].isna().all() and pd.isna(offline.loc[1, "category"]) and offline.loc[1, "image_emb"] is None
    assert F.online_frame(store, 1, [], "home").empty


def test_historical_frame_keeps_order_index_and_extra_columns(store, offline, dataset):
    entity = dataset.interactions.sample(300, random_state=1)  # shuffled, with a non-contiguous index
    entity = entity.assign(split=np.where(entity.label == 1, "train", "test"), weight=np.arange(300) / 10)
    got = F.historical_frame(store, entity, service="multi_scenario")
    assert got.index.equals(entity.index)
    assert list(got.columns[: entity.shape[1]]) == list(entity.columns)
    pd.testing.assert_frame_equal(got[entity.columns], entity)
    _assert_columns_equal(got, offline.loc[entity.index], [c for c in got.columns if c not in ("split", "weight")])
    with pytest.raises(KeyError, match="event_timestamp"):
        F.historical_frame(store, entity.drop(columns="event_timestamp"))
    with pytest.raises(KeyError, match="no_such_service"):
        F.historical_frame(store, entity, service="no_such_service")


def test_views_follow_the_spec_and_repo_copies_do_not_clash(store, tiny_dataset, tmp_path):
    """A second repo copy on a dataset without embeddings has no embedding features; the first keeps its own."""
    spec = FeatureSpec.from_dict(tiny_dataset.spec.to_dict())
    spec.fields = [f for f in spec.fields if f.kind is not FieldKind.EMBEDDING]
    small = Dataset("small", tiny_dataset.interactions.head(500), tiny_dataset.users,
                    tiny_dataset.items.drop(columns=["text_emb", "image_emb"]), spec)
    F.write_feature_tables(small, tmp_path / "data")
    repo = F.copy_repo(tmp_path / "repo")
    assert not (repo / "data").exists() and (repo / "feature_store.yaml").exists()
    other = F.apply_repo(repo, tmp_path / "data")
    names = {f.name for f in other.get_feature_view("item_profile").features}
    assert names == {"category", "price"}
    assert {f.name for f in store.get_feature_view("item_profile").features} == {"category", "price", "text_emb", "image_emb"}
    assert sorted(s.name for s in other.list_feature_services()) == sorted(F.SERVICES)
    frame = F.historical_frame(other, small.interactions.tail(20))
    assert "text_emb" not in frame.columns and len(frame) == 20


def test_write_feature_tables_rejects_bad_input_with_a_clear_message(tiny_dataset, tmp_path):
    dupes = Dataset("d", tiny_dataset.interactions, pd.concat([tiny_dataset.users, tiny_dataset.users.head(3)]),
                    tiny_dataset.items, tiny_dataset.spec)
    with pytest.raises(F.FeatureTableError, match="'user_id' must be unique, 3 rows"):
        F.write_feature_tables(dupes, tmp_path)
    no_col = Dataset("d", tiny_dataset.interactions, tiny_dataset.users.drop(columns="gender"), tiny_dataset.items,
                     tiny_dataset.spec)
    with pytest.raises(F.FeatureTableError, match="gender"):
        F.write_feature_tables(no_col, tmp_path)
    items = tiny_dataset.items.copy()
    items["text_emb"] = [v[:3] for v in items["text_emb"]]
    with pytest.raises(F.FeatureTableError, match=r"text_emb.*dim=32, 150 rows"):
        F.write_feature_tables(Dataset("d", tiny_dataset.interactions, tiny_dataset.users, items, tiny_dataset.spec), tmp_path)
    assert not (tmp_path / "user_profile.parquet").exists()


def test_profiles_are_stamped_before_every_interaction(store, dataset):
    import pyarrow.parquet as pq

    source = store.get_feature_view("user_profile").batch_source.path
    stamps = pq.read_table(source, columns=["event_timestamp"]).column(0).to_pandas()
    assert (stamps == F.PROFILE_TIMESTAMP).all()
    assert F.PROFILE_TIMESTAMP < dataset.interactions.event_timestamp.min() - timedelta(days=365)
    assert store.get_feature_view("user_behaviour").ttl in (None, timedelta(0))


def test_sequences_of_floats_or_with_missing_elements_are_written_as_text_lists(tiny_dataset, tmp_path):
    """Integer tags that met a NaN in pandas come back as floats ([1.0, nan]), and a None may sit inside a list:
    the column is written as text lists (every element as text, missing elements dropped) instead of stopping with
    arrow's bare "Expected bytes, got a 'float' object"; all-int lists stay int lists."""
    import dataclasses

    import pyarrow.parquet as pq

    from ctrflow.data.spec import Entity, FieldSpec

    spec = dataclasses.replace(
        tiny_dataset.spec,
        fields=[
            *tiny_dataset.spec.fields,
            FieldSpec("tags", FieldKind.SEQUENCE, Entity.ITEM, max_len=3),
            FieldSpec("codes", FieldKind.SEQUENCE, Entity.ITEM, max_len=3),
        ],
    )
    items = tiny_dataset.items.copy()
    n = len(items)
    tags = [np.array([1.0, np.nan]), [2, None], None, np.array([], dtype=float)] + [np.array([3.0])] * (n - 4)
    items["tags"] = pd.Series(tags, dtype=object).to_numpy()
    items["codes"] = pd.Series([np.array([i, i + 1], dtype=np.int64) for i in range(n)], dtype=object).to_numpy()
    F.write_feature_tables(Dataset("d", tiny_dataset.interactions, tiny_dataset.users, items, spec), tmp_path)
    table = pq.read_table(tmp_path / "item_profile.parquet")
    assert str(table.schema.field("tags").type) == "list<element: string>"
    assert table.column("tags").to_pylist()[:5] == [["1.0"], ["2"], None, [], ["3.0"]]
    assert str(table.schema.field("codes").type) == "list<element: int64>"
    assert table.column("codes").to_pylist()[:2] == [[0, 1], [1, 2]]
