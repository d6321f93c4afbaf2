"""Online quality: delayed clicks joined to the request log, AUC and calibration per scenario, model and window."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from ctrflow.cli import cli
from ctrflow.monitoring.quality import QualityInputError, join_labels, quality_report

T0 = pd.Timestamp("2026-01-01 00:00", tz="UTC")
HOUR = pd.Timedelta(hours=1)


def served(predictions, scenario="home", model="m1", start=T0, step=pd.Timedelta(minutes=1), **extra) -> pd.DataFrame:
    n = len(predictions)
    return pd.DataFrame({
        "request_id": [f"r{i // 2}-{scenario}-{start.value}" for i in range(n)], "item_id": np.arange(n, dtype=np.int64) + 2**62,
        "ts": [start + i * step for i in range(n)], "scenario": scenario, "model": model,
        "prediction": np.asarray(predictions, dtype="float32"), **extra,
    })  # fmt: skip


def clicks_of(log: pd.DataFrame, clicked: np.ndarray, delay=pd.Timedelta(minutes=5)) -> pd.DataFrame:
    rows = log[clicked.astype(bool)]
    return pd.DataFrame({"request_id": rows["request_id"], "item_id": rows["item_id"], "clicked": 1, "timestamp": rows["ts"] + delay})


def horizon(at: pd.Timestamp) -> pd.DataFrame:
    """A feedback row far from any served key: the feed has reached `at` (closes the windows before it)."""
    return pd.DataFrame({"request_id": ["heartbeat"], "item_id": np.array([0], dtype=np.int64), "clicked": [0], "timestamp": [at]})


def test_hand_computed_auc_and_calibration():
    # the textbook example: scores 0.1, 0.4, 0.35, 0.8 with labels 0, 0, 1, 1: of the 4 (pos, neg) pairs, 3 are
    # ordered right ((0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4)), one wrong (0.35 < 0.4): AUC = 3/4
    log = served([0.1, 0.4, 0.35, 0.8])
    labels = pd.concat([clicks_of(log, np.array([0, 0, 1, 1])), horizon(T0 + 3 * HOUR)], ignore_index=True)
    r = quality_report(log, labels, min_labelled_rows=1)
    assert r.overall["auc"] == pytest.approx(0.75)
    assert r.overall["predicted_ctr"] == pytest.approx((0.1 + 0.4 + 0.35 + 0.8) / 4)  # 0.4125
    assert r.overall["observed_ctr"] == 0.5 and r.overall["ratio"] == pytest.approx(0.5 / 0.4125)
    assert r.join == r.join | {"served": 4, "labelled": 4, "clicked": 2, "pending": 0, "late_clicks": 0, "unmatched_clicks": 0}


def test_online_auc_equals_offline_auc_on_the_same_rows(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.6, 3000)
    y = (rng.uniform(size=3000) < p).astype(int)  # clicks drawn from the scores: calibrated
    log = served(p, step=pd.Timedelta(seconds=10))
    labels = pd.concat([clicks_of(log, y), horizon(T0 + 24 * HOUR)], ignore_index=True)
    r = quality_report(log, labels, tmp_path)
    offline = roc_auc_score(y, log["prediction"].astype("float64"))
    assert r.join["labelled"] == 3000 and r.join["clicked"] == y.sum()
    assert abs(r.overall["auc"] - offline) < 0.01
    assert r.overall["auc"] == pytest.approx(offline, abs=1e-12)  # the join is exact: equal, not only close
    assert r.verdict == "ok" and r.exit_code == 0
    joined = pd.read_parquet(tmp_path / "labelled_requests.parquet")
    assert joined["clicked"].tolist() == y.tolist() and joined["item_id"].dtype == np.int64


def test_attribution_window_late_unmatched_and_pending():
    log = served([0.2] * 6, step=HOUR)  # served at 00:00, 01:00, ..., 05:00
    labels = pd.DataFrame({
        "request_id": [log.request_id[0], log.request_id[1], "never-served", log.request_id[4]],
        "item_id": np.array([log.item_id[0], log.item_id[1], 7, log.item_id[4]], dtype=np.int64),
        "clicked": [1, 1, 1, 1],
        # row 0 clicked after 30 min (in the 1 h window); row 1 after 2 h (late); row 4 after 10 min
        "timestamp": [log.ts[0] + HOUR / 2, log.ts[1] + 2 * HOUR, log.ts[2], log.ts[4] + HOUR / 6],
    })  # fmt: skip
    joined, counts = join_labels(log, labels, window_s=3600)
    # the feed reaches 04:10 (row 4's click): windows closed for rows 0-3 (ts + 1 h <= 04:10); row 4 clicked inside
    # its window (final although the window is still open); row 5 (05:00) pending. Row 1's click came 2 h late.
    assert counts == counts | {"served": 6, "labelled": 5, "clicked": 2, "pending": 1, "late_clicks": 1, "unmatched_clicks": 1}
    assert joined["clicked"].tolist() == [1, 0, 0, 0, 1]


def test_per_scenario_model_window_and_a_click_drop_in_one_scenario():
    rng = np.random.default_rng(1)
    home = served(rng.uniform(0.05, 0.3, 2000), "home", "m1", step=pd.Timedelta(minutes=1))
    search = served(rng.uniform(0.05, 0.3, 2000), "search", "m1", step=pd.Timedelta(minutes=1))
    y_home = (rng.uniform(size=2000) < home["prediction"]).astype(int)
    y_search = (rng.uniform(size=2000) < search["prediction"] * 0.4).astype(int)  # the click rate dropped by 60%
    log = pd.concat([home, search], ignore_index=True)
    labels = pd.concat([clicks_of(home, y_home.to_numpy()), clicks_of(search, y_search.to_numpy()), horizon(T0 + 48 * HOUR)])
    r = quality_report(log, labels, time_window="1D")
    assert r.by_scenario["home"]["verdict"] == "ok" and r.by_scenario["search"]["verdict"] == "breached"
    assert r.by_scenario["search"]["ratio"] == pytest.approx(y_search.mean() / search["prediction"].mean())
    assert any(x.startswith("scenario 'search': observed CTR") for x in r.reasons) and r.exit_code == 1
    assert not any("scenario 'home'" in x for x in r.reasons)
    assert set(r.by_model) == {"m1"} and {s["model"] for s in r.series} == {"all"}  # one model: no per-model rows
    # 2,000 minutes = 1 day 9 h 20 min: two daily windows, each with "all" and both scenarios
    assert [(s["start"][:10], s["scenario"]) for s in r.series] == [
        ("2026-01-01", "all"), ("2026-01-01", "home"), ("2026-01-01", "search"),
        ("2026-01-02", "all"), ("2026-01-02", "home"), ("2026-01-02", "search"),
    ]  # fmt: skip
    assert sum(s["n"] for s in r.series if s["scenario"] == "all") == 4000


def test_shadow_scores_are_compared_on_the_same_rows():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.05, 0.5, 2000)
    y = (rng.uniform(size=2000) < truth).astype(int)
    served_score = np.clip(truth + rng.normal(0, 0.2, 2000), 0.01, 0.99)  # the served model: noisier
    log = served(served_score, shadow_score=truth, shadow_model="challenger")
    log.loc[:99, "shadow_score"] = np.nan  # the shadow did not score the first 100 rows
    labels = pd.concat([clicks_of(log, y), horizon(T0 + 48 * HOUR)], ignore_index=True)
    r = quality_report(log, labels)
    s = r.shadow["overall"]
    assert r.shadow["model"] == "challenger" and s["n"] == 1900
    assert s["shadow_auc"] == pytest.approx(roc_auc_score(y[100:], truth[100:]))
    assert s["served_auc"] == pytest.approx(roc_auc_score(y[100:], log["prediction"].to_numpy()[100:]))
    assert s["auc_difference"] > 0  # the challenger ranks better on the same traffic
    assert "shadow 'challenger'" in r.summary()


def test_not_enough_labels_and_bad_feeds():
    log = served([0.2] * 10)
    r = quality_report(log, pd.concat([clicks_of(log, np.ones(10)), horizon(T0 + 5 * HOUR)]))
    assert r.verdict == "not_enough_data" and r.exit_code == 3 and r.reasons == []
    with pytest.raises(QualityInputError, match=r"label feed \(1 rows\) lacks column\(s\) \['clicked'\]"):
        quality_report(log, horizon(T0).drop(columns="clicked"))
    bad = horizon(T0).assign(clicked=2)
    with pytest.raises(QualityInputError, match=r"'clicked' must be 0 or 1; 1 of 1 rows are not \(e\.g\. 2\)$"):
        quality_report(log, bad)
    with pytest.raises(QualityInputError, match="'item_id' must be int64"):
        quality_report(log, horizon(T0).assign(item_id=1.0))


def test_cli_monitor_quality(tmp_path):
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.4, 1000)
    log = served(p)
    (tmp_path / "log").mkdir()
    log.to_parquet(tmp_path / "log" / "part-0.parquet")
    labels = pd.concat([clicks_of(log, (rng.uniform(size=1000) < p).astype(int)), horizon(T0 + 48 * HOUR)])
    labels.to_parquet(tmp_path / "labels.parquet")
    out = CliRunner().invoke(cli, ["monitor", "quality", "--requests", str(tmp_path / "log"), "--labels", str(tmp_path / "labels.parquet"), "--out", str(tmp_path / "q")])
    assert out.exit_code == 0, out.output
    assert "online quality: ok" in out.output
    summary = json.loads((tmp_path / "q" / "quality_summary.json").read_text())
    assert summary["join"]["labelled"] == 1000 and summary["verdict"] == "ok"
    assert (tmp_path / "q" / "quality_over_time.png").read_bytes()[:4] == b"\x89PNG"


def test_evidently_online_quality_snapshot_agrees():
    from ctrflow.monitoring.report import quality_snapshot

    log = served([0.1, 0.4, 0.35, 0.8])
    labels = pd.concat([clicks_of(log, np.array([0, 0, 1, 1])), horizon(T0 + 3 * HOUR)], ignore_index=True)
    joined, _ = join_labels(log, labels, window_s=3600)
    values = {m["config"]["type"].split(":")[-1] + m["config"].get("column", ""): m["value"] for m in quality_snapshot(joined, None).dict()["metrics"]}
    assert values["RocAuc"] == pytest.approx(0.75)  # Evidently's ROC AUC: the hand-computed 3/4 again
    assert values["MeanValueclicked"] == 0.5 and values["MeanValueprediction"] == pytest.approx(0.4125)


def test_two_models_are_scored_apart_per_window():
    rng = np.random.default_rng(4)
    a = served(rng.uniform(0.05, 0.4, 600), "home", "champion", step=pd.Timedelta(minutes=2))
    b = served(rng.uniform(0.05, 0.4, 600), "home", "canary", start=T0 + pd.Timedelta(minutes=1), step=pd.Timedelta(minutes=2))
    y_a = (rng.uniform(size=600) < a["prediction"]).astype(int).to_numpy()
    y_b = (rng.uniform(size=600) < b["prediction"]).astype(int).to_numpy()
    log = pd.concat([a, b], ignore_index=True)
    labels = pd.concat([clicks_of(a, y_a), clicks_of(b, y_b), horizon(T0 + 48 * HOUR)], ignore_index=True)
    r = quality_report(log, labels, time_window="1D", min_labelled_rows=100)
    assert r.by_model["canary"]["auc"] == pytest.approx(roc_auc_score(y_b, b["prediction"].astype("float64")))
    assert r.by_model["champion"]["auc"] == pytest.approx(roc_auc_score(y_a, a["prediction"].astype("float64")))
    per_model = [(s["start"][:10], s["model"], s["n"]) for s in r.series if s["model"] != "all"]
    # 600 rows 2 minutes apart = 20 h: one daily window, one row per model
    assert per_model == [("2026-01-01", "canary", 600), ("2026-01-01", "champion", 600)]


def test_quality_step_reads_only_the_join_columns_and_records_sampling(tmp_path):
    from ctrflow.steps import quality_step

    rng = np.random.default_rng(5)
    p = rng.uniform(0.05, 0.4, 1000)
    log = served(p).assign(gender="F", hist_item_ids=[[1, 2, 3]] * 1000)  # features the join never needs
    (tmp_path / "log").mkdir()
    log.to_parquet(tmp_path / "log" / "part-0.parquet")
    y = (rng.uniform(size=1000) < p).astype(int)
    labels = pd.concat([clicks_of(log, y), horizon(T0 + 48 * HOUR)])
    labels.to_parquet(tmp_path / "labels.parquet")
    r = quality_step({"quality": {"max_log_rows": 400}}, tmp_path / "log", tmp_path / "labels.parquet", tmp_path / "q")
    assert r.join["served"] == 400 and r.join["log_sampled"] == {"rows_total": 1000, "rows_read": 400, "seed": 0}
    assert r.join["clicked"] + r.join["unmatched_clicks"] == y.sum()  # a click is in the sample or counted unmatched
    joined = pd.read_parquet(tmp_path / "q" / "labelled_requests.parquet")
    assert "hist_item_ids" not in joined.columns and "gender" not in joined.columns


def test_a_served_score_that_is_no_probability_is_a_breach_not_ok():
    # inf / NaN scores made the predicted CTR inf or NaN, the z-test's variance -inf, and the group came out "ok"
    p = np.full(400, 0.2)
    y = np.zeros(400, dtype=int)
    y[::5] = 1  # 80 clicks of 400: observed 0.2 = predicted 0.2, calibrated
    p[:3] = [np.inf, np.nan, 1.5]  # three rows with no probability
    log = served(p, step=pd.Timedelta(seconds=10))
    labels = pd.concat([clicks_of(log, y), horizon(T0 + 24 * HOUR)], ignore_index=True)
    r = quality_report(log, labels, min_labelled_rows=100)
    assert r.verdict == "breached" and r.exit_code == 1
    assert r.reasons == [
        "request log: prediction must be a probability in [0, 1]; 3 of 400 labelled rows broke it (e.g. inf, nan, 1.5); "
        "those rows are left out of AUC and calibration"
    ]
    assert r.join["invalid_predictions"] == 3
    # the 397 valid rows: 79 clicks (row 0 was one of the 80, left out), predicted 0.2 each
    assert r.overall["n"] == 397 and r.overall["clicks"] == 79
    assert r.overall["predicted_ctr"] == pytest.approx(0.2) and r.overall["observed_ctr"] == pytest.approx(79 / 397)
    assert r.overall["verdict"] == "ok"  # calibrated on what is left: the breach is the invalid rows alone


def test_a_request_log_with_no_request_yet_is_not_enough_data(tmp_path):
    # an empty log (Parquet without rows) was exit 2 "holds no rows"; a fresh log (only its segment folder) too
    from ctrflow.request_log import RequestLogger

    (tmp_path / "log").mkdir()
    served([0.2]).head(0).to_parquet(tmp_path / "log" / "part-0.parquet")
    fresh = RequestLogger(tmp_path / "fresh", flush_rows=1)
    horizon(T0).to_parquet(tmp_path / "labels.parquet")
    for log in ("log", "fresh"):
        args = ["monitor", "quality", "--requests", str(tmp_path / log), "--labels", str(tmp_path / "labels.parquet"), "--out", str(tmp_path / f"q_{log}")]
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 3, (log, out.output)
        assert "NOT ENOUGH DATA (0 labelled of 0 served rows" in out.output
    fresh.close()
