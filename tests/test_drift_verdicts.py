"""Drift verdicts on-call can act on: real Evidently runs on small hand-made frames whose answers can be worked out.

The five faults of issue 14: a 2-row sample was BREACHED (now "not enough data", exit 3); a feature missing in 80%
of current rows was "ok" (now a breach on its missing share); 64-bit ids lost in float64 (coverage now exact); a
served item id 2**63-1 broke every later drift run (now read and compared as int64); a column null in every
reference row stopped drift altogether (now "untestable", the rest checked).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ctrflow.cli import cli
from ctrflow.data.spec import FeatureSpec, FieldSpec
from ctrflow.monitoring import (
    BREACHED,
    EXIT_BREACH,
    EXIT_NOT_ENOUGH_DATA,
    EXIT_OK,
    NOT_ENOUGH_DATA,
    OK,
    drift_report,
    read_current,
    read_request_log,
)
from ctrflow.request_log import RequestLogger

SPEC = FeatureSpec(
    fields=[
        FieldSpec("user_id", "categorical", "user", large=True),
        FieldSpec("item_id", "categorical", "item", large=True),
        FieldSpec("gender", "categorical", "user"),
        FieldSpec("price", "numeric", "item", buckets=4),
    ],
    scenarios=["home", "search"],
)
BIG = 2**62


def rows(n: int, seed: int, scenario: str | None = None) -> pd.DataFrame:
    """n rows of one fixed generator (so two seeds give two samples of one distribution)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user_id": rng.integers(1, 200, n), "item_id": rng.integers(1, 100, n),
        "gender": rng.choice(["F", "M"], n), "price": rng.uniform(1, 100, n).round(2),
    })  # fmt: skip
    if scenario is not None:
        frame["scenario"] = scenario
    return frame


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return rows(2000, 0)


# ---- 1. a sample too small to test is "not enough data", never a breach --------------------------------------
@pytest.mark.parametrize("n", [2, 8, 99])
def test_tiny_current_sample_is_not_enough_data(reference, n, tmp_path):
    r = drift_report(reference, reference.head(n), SPEC, tmp_path, prediction_column=None)
    assert r.verdict == NOT_ENOUGH_DATA and not r.breached and r.exit_code == EXIT_NOT_ENOUGH_DATA == 3
    assert r.reasons == []
    assert f"{n:,} current rows, fewer than min_current_rows=100" in r.overall.notes[0]
    assert "NOT ENOUGH DATA" in r.summary()
    summary = json.loads(r.summary_path.read_text())
    assert summary["verdict"] == "not_enough_data" and summary["exit_code"] == 3
    assert r.html_path.exists()  # a page that says why, for whoever opens the report


def test_enough_rows_of_the_same_distribution_is_ok_with_a_pvalue_test(reference, tmp_path):
    # 150 current rows: the smaller sample is <= pvalue_max_rows (1000), so KS / chi-square p-values are used, not
    # distances (a normed Wasserstein of 150 rows from the same distribution is itself ~0.1: a false alarm)
    r = drift_report(reference, rows(150, 1), SPEC, tmp_path, prediction_column=None)
    assert r.verdict == OK and r.exit_code == EXIT_OK
    assert r.per_feature["price"]["test"] == "ks" and r.per_feature["gender"]["test"] == "chisquare"
    assert r.per_feature["price"]["threshold"] == 0.01
    assert r.per_feature["price"]["score"] > 0.01  # a p-value: same distribution


def test_a_real_shift_in_a_small_sample_is_still_caught(reference, tmp_path):
    cur = rows(150, 1).assign(price=lambda f: f["price"] + 50.0)  # half the range moved: KS p ~ 1e-30
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None)
    assert r.per_feature["price"]["status"] == "drifted" and r.per_feature["price"]["score"] < 1e-10
    assert r.per_feature["gender"]["status"] == "no drift"
    assert r.drifted_share == 0.5 and not r.breached  # 1 of 2 is not more than max_drifted_share 0.5
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None, max_drifted_share=0.4)
    assert r.breached and r.exit_code == EXIT_BREACH and "1 of 2 tested features drifted (share 0.50" in r.reasons[0]


def test_cli_exit_codes(reference, tmp_path):
    ts = tmp_path / "training_set"
    ts.mkdir()
    reference.assign(split="train", label=0).to_parquet(ts / "frame.parquet")
    SPEC.save(ts / "spec.json")
    reference.head(2).to_parquet(tmp_path / "two.parquet")
    rows(300, 1).to_parquet(tmp_path / "same.parquet")
    rows(300, 1).assign(gender=None).to_parquet(tmp_path / "gone.parquet")
    for name, code, text in (("two", 3, "NOT ENOUGH DATA"), ("same", 0, "drift check: ok"), ("gone", 1, "BREACHED")):
        out = CliRunner().invoke(cli, ["monitor", "drift", "--training-set", str(ts), "--current", str(tmp_path / f"{name}.parquet"), "--out", str(tmp_path / name)])
        assert out.exit_code == code, (name, out.output)
        assert text in out.output
        assert (tmp_path / name / "monitor_report.html").exists()


# ---- 2. the missing-value share is a drift signal of its own ------------------------------------------------
def test_feature_missing_in_most_current_rows_breaches(reference, tmp_path):
    cur = rows(500, 1)
    cur["gender"] = cur["gender"].astype(object)
    cur.loc[:399, "gender"] = None  # 400 of 500: 80%
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None)
    m = r.per_feature["gender"]["missing"]
    assert (m["reference_share"], m["current_share"]) == (0.0, 0.8)
    # pooled share 400/2500 = 0.16; se = sqrt(0.16*0.84*(1/2000+1/500)) = 0.0183; z = 0.8/0.0183 = 43.6
    assert m["p_value"] < 1e-100 and m["drifted"]
    assert r.breached and r.exit_code == EXIT_BREACH
    assert r.reasons == [
        "feature 'gender' missing in 80.0% of 500 current rows (reference 0.0%; change > 0.1, z-test p=0)"
    ]
    # the 100 values that did arrive have the reference's distribution: the value test alone says no drift
    assert r.per_feature["gender"]["status"] == "no drift"
    assert r.drifted_features == ["gender"]


def test_small_missing_share_change_is_not_drift(reference, tmp_path):
    cur = rows(500, 1)
    cur.loc[:24, "price"] = np.nan  # 25 of 500 = 5%: under max_missing_share_change 0.1
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None)
    m = r.per_feature["price"]["missing"]
    assert m["current_share"] == 0.05 and not m["drifted"] and r.verdict == OK


def test_feature_missing_in_every_current_row_breaches(reference, tmp_path):
    r = drift_report(reference, rows(300, 1).assign(price=np.nan), SPEC, tmp_path, prediction_column=None)
    assert r.breached and r.per_feature["price"]["missing"]["current_share"] == 1.0
    assert r.per_feature["price"]["status"] == "not enough data"  # no value arrived to value-test
    assert r.per_feature["gender"]["status"] == "no drift"  # the rest is still checked
    assert any("feature 'price' missing in 100.0% of 300 current rows" in x for x in r.reasons)


# ---- 3 and 4. ids stay int64 end to end ---------------------------------------------------------------------
def test_hashed_64_bit_id_coverage_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    ref = rows(1000, 0).assign(
        user_id=(BIG + 2 * rng.integers(0, 100, 1000)).astype("int64"), item_id=(BIG + 2 * rng.integers(0, 50, 1000)).astype("int64")
    )
    cur = ref.head(200).copy()
    cur["user_id"] += 1  # odd: never in the reference (float64 would round BIG + 1 to BIG and call it seen)
    cur.loc[cur.index[:50], "item_id"] += 1  # 50 of 200 unseen
    r = drift_report(ref, cur, SPEC, tmp_path, prediction_column=None)
    assert r.id_coverage == {"user_id": 0.0, "item_id": 0.75}
    assert "user_id coverage (current ids seen in reference): 0.0%" in r.summary()


def test_served_item_id_2_63_minus_1_does_not_break_drift(reference, tmp_path):
    """The service accepts any int64 item id; an unknown one is logged with null item features and must stay
    exact through the request log, its sampled read and the coverage figure."""
    top = 2**63 - 1
    cur = rows(150, 1)
    cur.loc[0, "item_id"] = top
    cur.loc[0, "price"] = np.nan  # unknown item: no features
    with RequestLogger(tmp_path / "log", flush_rows=100) as log:
        for start in range(0, 150, 50):
            chunk = cur.iloc[start : start + 50]
            log.log_request(
                request_id=f"r{start}", user_id=int(chunk["user_id"].iloc[0]), scenario="home", model="m",
                features=chunk[["gender", "price"]], item_ids=chunk["item_id"].tolist(),
                predictions=np.full(len(chunk), 0.1),
            )  # fmt: skip
    logged = read_request_log(tmp_path / "log")
    assert logged["item_id"].dtype == np.int64 and top in set(logged["item_id"].tolist())
    sampled, info = read_current(tmp_path / "log", max_rows=100, seed=3)
    assert len(sampled) == 100 and info["rows_total"] == 150 and info["sampled"]
    assert sampled["item_id"].dtype == np.int64
    r = drift_report(reference, logged, SPEC, tmp_path / "out", prediction_column=None)
    assert r.verdict == OK
    # every logged user id is one of the reference's (same generator, ids 1..199, seen in 2,000 rows) except by
    # chance; the item ids are 1..99 (all seen) plus the one 2**63-1: exactly 149 of 150
    assert r.id_coverage["item_id"] == pytest.approx(149 / 150)


# ---- 5. a column that cannot be tested is reported, the rest checked ----------------------------------------
def test_column_null_in_every_reference_row_is_untestable_and_the_rest_is_checked(reference, tmp_path):
    ref = reference.assign(gender=None)
    cur = rows(300, 1).assign(gender=None, price=lambda f: f["price"] + 50.0)
    r = drift_report(ref, cur, SPEC, tmp_path, prediction_column=None)
    assert r.per_feature["gender"]["status"] == "untestable" and r.per_feature["gender"]["test"] is None
    assert not r.per_feature["gender"]["missing"]["drifted"]  # null before, null now: nothing moved
    assert any("'gender' is untestable: null in all 2,000 reference rows" in n for n in r.overall.notes)
    assert r.per_feature["price"]["status"] == "drifted"  # still checked, and drifted
    assert r.drifted_share == 1.0 and r.breached  # 1 of 1 tested feature


# ---- per scenario ----------------------------------------------------------------------------------------------
def test_a_feature_gone_in_one_scenario_is_caught_in_that_scenario(tmp_path):
    ref = pd.concat([rows(1800, 0, "home"), rows(600, 1, "search")], ignore_index=True)
    cur = pd.concat([rows(900, 2, "home"), rows(100, 3, "search").assign(price=np.nan)], ignore_index=True)
    r = drift_report(ref, cur, SPEC, tmp_path, prediction_column=None)
    # overall the missing share is 100/1000 = 0.1, not more than 0.1: only the scenario view sees it
    assert r.overall.verdict == OK and r.per_feature["price"]["missing"]["current_share"] == 0.1
    assert r.scenarios["home"].verdict == OK and r.scenarios["search"].verdict == BREACHED
    assert r.breached and len(r.reasons) == 1
    # pooled 100/2400; se = sqrt(0.0417*0.9583*(1/600+1/100)) = 0.0214; z = 1/0.0214 = 46.8: p ~ 1e-154
    assert r.reasons[0].startswith(
        "scenario 'search': feature 'price' missing in 100.0% of 100 current rows (reference 0.0%; change > 0.1, z-test p="
    )
    assert r.scenarios["search"].per_feature["price"]["missing"]["p_value"] < 1e-100
    table = {row["scenario"]: row for row in r.scenario_table()}
    assert table["search"]["drifted_features"] == ["price"] and table["home"]["drifted_features"] == []
    assert (tmp_path / "scenarios" / "search" / "drift_report.html").exists()
    on_disk = json.loads(r.summary_path.read_text())
    assert [row["verdict"] for row in on_disk["scenario_table"]] == ["ok", "breached"]


def test_a_scenario_with_too_few_rows_is_not_enough_data_not_a_breach(tmp_path):
    ref = pd.concat([rows(1800, 0, "home"), rows(600, 1, "search")], ignore_index=True)
    cur = pd.concat([rows(900, 2, "home"), rows(5, 3, "search").assign(price=np.nan)], ignore_index=True)
    r = drift_report(ref, cur, SPEC, tmp_path, prediction_column=None)
    assert r.scenarios["search"].verdict == NOT_ENOUGH_DATA and r.verdict == OK
    # a scenario with no traffic at all is listed too (a surface down shows up in the table), still not a breach
    r = drift_report(ref, rows(900, 2, "home"), SPEC, tmp_path, prediction_column=None)
    assert r.scenarios["search"].verdict == NOT_ENOUGH_DATA and r.scenarios["search"].n_current == 0 and r.verdict == OK
    assert r.scenarios["search"].notes == ["scenario 'search' has no current rows (reference 600)"]


def test_sampled_read_is_seeded_and_uniform(tmp_path):
    frame = rows(1000, 0).assign(row=np.arange(1000))
    (tmp_path / "log").mkdir()
    frame.iloc[:600].to_parquet(tmp_path / "log" / "part-a.parquet")
    frame.iloc[600:].to_parquet(tmp_path / "log" / "part-b.parquet")
    a, info = read_current(tmp_path / "log", max_rows=300, seed=1)
    b, _ = read_current(tmp_path / "log", max_rows=300, seed=1)
    c, _ = read_current(tmp_path / "log", max_rows=300, seed=2)
    assert info == {**info, "rows_total": 1000, "rows_read": 300, "sampled": True, "seed": 1}
    assert a["row"].tolist() == b["row"].tolist() != c["row"].tolist()
    assert a["row"].is_unique and set(a["row"]) <= set(range(1000))
    assert 0 < (a["row"] >= 600).sum() < 300  # both parts contribute
    full, info = read_current(tmp_path / "log", max_rows=5000)
    assert len(full) == 1000 and not info["sampled"]


def test_a_log_of_request_row_parts_flat_parts_and_segments_reads_as_one_sampled_frame(tmp_path):
    """An upgraded log holds parts of both layouts (a row per candidate, written before request rows; a row per
    request) and segments not compacted yet: read_current counts candidate rows across all three, samples them as
    one source, and reads a column selection without the item ids."""
    frame = rows(300, 0).assign(row=np.arange(300).astype(float))
    log_dir = tmp_path / "log"
    (log_dir / "_segments").mkdir(parents=True)
    frame.iloc[:100].to_parquet(log_dir / "part-0-old.parquet")  # the earlier layout: plain rows
    logger = RequestLogger(log_dir, flush_seconds=3600, compaction="thread")
    for start in range(100, 300, 50):
        chunk = frame.iloc[start : start + 50]
        logger.log_request(
            request_id=f"r{start}", user_id=int(chunk["user_id"].iloc[0]), scenario="home", model="m",
            features=chunk[["gender", "price", "row"]], item_ids=chunk["item_id"].tolist(), predictions=np.full(50, 0.1),
        )  # fmt: skip
        if start == 150:
            logger.flush()  # r100 and r150 in a request-row part; r200 and r250 stay in the segment
    full, info = read_current(log_dir)
    assert info["rows_total"] == 300 and sorted(full["row"].tolist()) == list(range(300))
    a, info = read_current(log_dir, max_rows=120, seed=4, columns=["row", "price"])
    b, _ = read_current(log_dir, max_rows=120, seed=4, columns=["row", "price"])
    assert list(a.columns) == ["row", "price"] and info["rows_total"] == 300 and len(a) == 120
    assert a["row"].tolist() == b["row"].tolist() and a["row"].is_unique
    assert (a["row"] < 100).any() and ((a["row"] >= 100) & (a["row"] < 200)).any() and (a["row"] >= 200).any()
    by_row = frame.set_index("row")["price"]
    assert np.allclose(a["price"].to_numpy(), by_row.loc[a["row"]].to_numpy())  # each value on its own row
    logger.close()


def test_request_row_parts_in_hive_folders_keep_their_partition_column_and_an_empty_request_its_columns(tmp_path):
    """read_current reads a folder with partitioning="hive": request-row parts moved under date=.../ keep their
    `date` on every candidate row, as one-row-per-candidate files do; a log holding only a request with no candidate
    (not compacted yet) still reports its columns. Both found by a break-it review."""
    import shutil

    log_dir = tmp_path / "log"
    logger = RequestLogger(log_dir, flush_seconds=3600, compaction="thread")
    for i in range(2):
        logger.log_request(request_id=f"r{i}", user_id=7, scenario="home", model="m", features=pd.DataFrame({"x": [1.0, 2.0]}),
                           predictions=np.zeros(2), item_ids=[1, 2])  # fmt: skip
    part = logger.flush()
    (log_dir / "date=2024-01-01").mkdir()
    shutil.move(part, log_dir / "date=2024-01-01" / part.name)
    flat = read_request_log(log_dir)
    (log_dir / "date=2024-01-02").mkdir()
    flat.to_parquet(log_dir / "date=2024-01-02" / "part-old.parquet")  # the earlier layout, another day
    frame, info = read_current(log_dir, columns=["request_id", "date"])
    assert list(frame.columns) == ["request_id", "date"] and info["rows_total"] == 8
    assert sorted(frame["date"].astype(str)) == ["2024-01-01"] * 4 + ["2024-01-02"] * 4
    logger.close()

    empty_dir = tmp_path / "empty"
    logger = RequestLogger(empty_dir, flush_seconds=3600, compaction="thread")
    logger.log_request(request_id="z", user_id=1, scenario="s", model="m", features=pd.DataFrame({"x": pd.Series([], dtype="float64")}),
                       predictions=np.zeros(0), item_ids=[])  # fmt: skip
    frame, info = read_current(empty_dir)
    assert len(frame) == 0 and info["rows_total"] == 0 and {"request_id", "item_id", "x", "prediction"} <= set(frame.columns)
    logger.close()


def test_unknown_users_in_the_request_log_are_not_a_missing_feature(reference, tmp_path):
    # the service flags rows of users it does not know (fallback_user): their user features are null by design
    cur = rows(400, 1).assign(fallback_user=False)
    cur["gender"] = cur["gender"].astype(object)
    cur.loc[:99, "gender"] = None
    cur.loc[:99, "fallback_user"] = True  # 100 cold-start rows
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None)
    m = r.per_feature["gender"]["missing"]
    assert (m["n_current"], m["current_share"], m["drifted"]) == (300, 0.0, False) and r.verdict == OK
    cur.loc[100:199, "gender"] = None  # 100 known users lost their profile too: 100 of 300 known rows
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None)
    assert r.breached and r.reasons[0].startswith("feature 'gender' missing in 33.3% of 300 current rows")


def test_usage_error_exits_2_with_a_readable_message(reference, tmp_path, monkeypatch, capsys):
    from ctrflow.cli import main

    ts = tmp_path / "training_set"
    ts.mkdir()
    reference.assign(split="train", label=0).to_parquet(ts / "frame.parquet")
    SPEC.save(ts / "spec.json")
    rows(300, 1).drop(columns="price").to_parquet(tmp_path / "cur.parquet")
    argv = ["ctrflow", "monitor", "drift", "--training-set", str(ts), "--current", str(tmp_path / "cur.parquet"), "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "current frame (300 rows) lacks column(s) ['price']" in err


# ---- odd request logs (breaker): ±inf, values numpy cannot bin, a log with no row yet ----------------------------
def test_non_finite_values_are_counted_as_missing_not_a_crash(reference, tmp_path):
    # ±inf used to reach Evidently as an empty column ("An empty column 'price' was provided") and stop the report
    ref = reference.assign(prediction=np.linspace(0.1, 0.9, len(reference)))
    cur = rows(300, 1).assign(prediction=np.linspace(0.1, 0.9, 300))
    cur.loc[:199, "price"] = np.inf  # 200 of 300
    cur.loc[:, "prediction"] = -np.inf  # a model answering -inf everywhere
    r = drift_report(ref, cur, SPEC, tmp_path, prediction_column="prediction")
    assert r.breached and r.exit_code == EXIT_BREACH
    assert r.per_feature["price"]["missing"]["current_share"] == 200 / 300
    assert r.reasons[0].startswith("feature 'price' missing in 66.7% of 300 current rows (reference 0.0%")
    assert r.reasons[1].startswith("prediction 'prediction' missing or non-finite in 100.0% of 300 current rows")
    assert "'price': 200 of 300 current values are ±inf, counted as missing" in r.overall.notes
    assert "'prediction': 300 of 300 current values are ±inf, counted as missing" in r.overall.notes
    # the 100 finite prices left (min_current_rows) are from the reference's distribution
    assert r.per_feature["price"]["status"] == "no drift" and r.per_feature["price"]["test"] == "ks"


@pytest.mark.parametrize(("n", "test"), [(300, "ks"), (1500, "wasserstein")])
def test_a_value_numpy_cannot_bin_is_still_tested(reference, n, test, tmp_path):
    # 1e300 in every row: Evidently's histogram pads the constant range by +-0.5, lost to rounding at 1e300, and
    # numpy refused to bin it ("Too many bins for data range"), which stopped the whole report (exit 2)
    cur = rows(n, 1).assign(price=1e300)
    r = drift_report(reference, cur, SPEC, tmp_path, prediction_column=None, max_drifted_share=0.4)
    price = r.per_feature["price"]
    assert price["test"] == test and price["status"] == "drifted" and r.breached
    if test == "ks":  # every current value above every reference value: KS statistic 1, p ~ 0
        assert price["score"] < 1e-100
    else:  # Wasserstein distance = 1e300 - mean(ref) (all mass moved to one point above), over std(ref)
        ref = reference["price"].to_numpy()
        assert price["score"] == pytest.approx((1e300 - ref.mean()) / ref.std(), rel=1e-9)
    assert r.per_feature["gender"]["status"] == "no drift"  # the other columns still went through Evidently
    assert f"'price': tested by ctrflow ({test}), not Evidently: its histogram cannot bin these values" in r.overall.notes


def test_a_request_log_with_no_row_yet_is_not_enough_data(reference, tmp_path):
    # an empty log (the service up, no request yet) was exit 2 "holds no rows"; one row was exit 3
    ts = tmp_path / "training_set"
    ts.mkdir()
    reference.assign(split="train", label=0).to_parquet(ts / "frame.parquet")
    SPEC.save(ts / "spec.json")
    (tmp_path / "log").mkdir()
    rows(5, 1).assign(scenario="home").head(0).to_parquet(tmp_path / "log" / "part-0.parquet")
    frame, info = read_current(tmp_path / "log")
    assert len(frame) == 0 and "price" in frame.columns and info["rows_total"] == 0
    out = CliRunner().invoke(cli, ["monitor", "drift", "--training-set", str(ts), "--current", str(tmp_path / "log"), "--out", str(tmp_path / "out")])
    assert out.exit_code == EXIT_NOT_ENOUGH_DATA, out.output
    assert "NOT ENOUGH DATA (reference 2,000 rows, current 0 rows)" in out.output
    assert "0 current rows, fewer than min_current_rows=100" in out.output
    # a service's log before its first request: only the (empty) segment folder, no Parquet, no column at all
    fresh = RequestLogger(tmp_path / "fresh", flush_rows=1)
    out = CliRunner().invoke(cli, ["monitor", "drift", "--training-set", str(ts), "--current", str(tmp_path / "fresh"), "--out", str(tmp_path / "out1")])
    fresh.close()
    assert out.exit_code == EXIT_NOT_ENOUGH_DATA, out.output
    assert "NOT ENOUGH DATA (reference 2,000 rows, current 0 rows)" in out.output
    # a folder without any Parquet is still a usage error (a wrong path)
    (tmp_path / "nothing").mkdir()
    out = CliRunner().invoke(cli, ["monitor", "drift", "--training-set", str(ts), "--current", str(tmp_path / "nothing"), "--out", str(tmp_path / "out2")])
    assert out.exit_code != 0 and "no *.parquet file under" in str(out.exception)
