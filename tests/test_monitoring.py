"""Drift monitoring: real Evidently runs on the tiny synthetic frame, clean and deliberately shifted."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ctrflow.config import DriftParams
from ctrflow.monitoring import DriftInputError, drift_report, read_request_log

SHIFTED = ("region", "price")  # the two features the shifted frame changes


@pytest.fixture(scope="module")
def scored(tiny_frame) -> pd.DataFrame:
    """tiny_frame plus a seeded model-like score in (0, 1)."""
    frame = tiny_frame.copy()
    rng = np.random.default_rng(0)
    frame["prediction"] = rng.beta(2.0, 8.0, len(frame))
    return frame


@pytest.fixture(scope="module")
def shifted(scored) -> pd.DataFrame:
    """A current slice where one categorical is remapped, one numeric scaled and the scores moved up."""
    cur = scored.copy()
    regions = sorted(cur["region"].unique())
    cur["region"] = cur["region"].where(~cur["region"].isin(regions[1:]), regions[0])  # all users in one region
    cur["price"] = cur["price"] * 3.0
    cur["prediction"] = np.clip(cur["prediction"] + 0.3, 0.0, 1.0)
    return cur


@pytest.fixture(scope="module")
def spec(tiny_dataset):
    return tiny_dataset.spec


@pytest.fixture(scope="module")
def shifted_result(scored, shifted, spec, tmp_path_factory):
    return drift_report(scored, shifted, spec, tmp_path_factory.mktemp("shifted"))


def test_request_log_of_same_data_is_not_breached(scored, spec, tmp_path):
    # the serving log: one row per (request, candidate), written as two Parquet parts (list columns round-trip
    # as numpy arrays, which the summaries must accept)
    log = scored.drop(columns=["label", "event_timestamp"]).assign(
        request_id=np.arange(len(scored)) // 20, ts=scored["event_timestamp"]
    )
    (tmp_path / "log").mkdir()
    half = len(log) // 2
    log.iloc[:half].to_parquet(tmp_path / "log" / "part-0.parquet")
    log.iloc[half:].to_parquet(tmp_path / "log" / "part-1.parquet")
    current = read_request_log(tmp_path / "log")
    assert len(current) == len(scored)
    assert isinstance(current["hist_item_ids"].iloc[0], np.ndarray)

    result = drift_report(scored, current, spec, tmp_path / "out")
    assert not result.breached and result.reasons == []
    assert result.drifted_share == 0.0
    assert result.prediction_drift is not None and not result.prediction_drift["drifted"]
    assert "user_id" not in result.per_feature and "item_id" not in result.per_feature  # large ids skipped
    assert {"hist_item_ids__len", "text_emb__norm", "image_emb__norm", "price", "region"} <= set(result.per_feature)
    assert result.id_coverage == {"user_id": 1.0, "item_id": 1.0}
    for path in (result.html_path, result.json_path, result.summary_path):
        assert path.exists() and path.stat().st_size > 0
    assert "<html" in result.html_path.read_text()[:2000].lower()
    evidently_json = json.loads(result.json_path.read_text())
    assert evidently_json["metrics"]
    summary = json.loads(result.summary_path.read_text())
    assert summary["breached"] is False
    assert summary["thresholds"] == DriftParams().model_dump()  # the typed defaults, all recorded
    assert summary["verdict"] == "ok" and summary["exit_code"] == 0
    assert {row["scenario"] for row in summary["scenario_table"]} == set(scored["scenario"].astype(str))
    assert "drift check: ok" in result.summary()


def test_shifted_data_is_breached_and_names_the_features(shifted_result):
    r = shifted_result
    assert r.breached
    assert sorted(r.drifted_features) == sorted(SHIFTED)
    for name in SHIFTED:
        assert r.per_feature[name]["drifted"]
        assert r.per_feature[name]["score"] >= r.per_feature[name]["threshold"]
        assert r.per_feature[name]["test"]  # Evidently's chosen test is reported
    assert not r.per_feature["gender"]["drifted"]
    assert r.prediction_drift["drifted"]
    assert r.drifted_share == pytest.approx(2 / len(r.per_feature))
    # 2 of 11 features is under the 0.5 share, so the breach comes from the prediction alone (overall, and in
    # every scenario, each tested on its own)
    assert len(r.overall.reasons) == 1 and "prediction" in r.overall.reasons[0]
    assert all(p.breached and "prediction" in p.reasons[0] for p in r.scenarios.values())
    text = r.summary()
    assert "BREACHED" in text and "region" in text and "price" in text
    on_disk = json.loads(r.summary_path.read_text())
    assert on_disk["breached"] is True and sorted(on_disk["drifted_features"]) == sorted(SHIFTED)


def test_drifted_share_threshold_names_features_in_reasons(scored, shifted, spec, tmp_path):
    r = drift_report(scored, shifted, spec, tmp_path, max_drifted_share=0.1, fail_on_prediction_drift=False)
    assert r.breached
    assert len(r.overall.reasons) == 1
    assert "2 of 11 tested features drifted (share 0.18 > max_drifted_share 0.1)" in r.overall.reasons[0]
    assert "region (" in r.reasons[0] and "price (" in r.reasons[0]


def test_thresholds_are_respected(scored, shifted, spec, tmp_path):
    r = drift_report(scored, shifted, spec, tmp_path, max_drifted_share=1.0, fail_on_prediction_drift=False)
    assert not r.breached and r.reasons == []
    assert sorted(r.drifted_features) == sorted(SHIFTED)  # still reported, just not a breach
    assert r.prediction_drift["drifted"]


def test_feature_missing_in_every_current_row_breaches(scored, spec, tmp_path):
    cur = scored.assign(price=np.nan)
    r = drift_report(scored, cur, spec, tmp_path, prediction_column=None)
    assert r.breached and r.prediction_drift is None
    assert r.per_feature["price"]["missing"]["drifted"] and r.per_feature["price"]["status"] == "not enough data"
    assert r.drifted_features == ["price"]
    assert any("feature 'price' missing in 100.0% of 6,000 current rows" in reason for reason in r.reasons)


def test_missing_spec_column_names_column_and_frame(scored, spec, tmp_path):
    with pytest.raises(DriftInputError, match=r"current frame \(6,000 rows\) lacks column\(s\) \['price'\]"):
        drift_report(scored, scored.drop(columns="price"), spec, tmp_path)
    with pytest.raises(DriftInputError, match=r"reference frame .* lacks column\(s\) \['prediction'\].*prediction_col"):
        drift_report(scored.drop(columns="prediction"), scored, spec, tmp_path)
    assert not (tmp_path / "drift_report.html").exists()


def test_bad_input_gives_clear_errors(scored, spec, tmp_path):
    with pytest.raises(DriftInputError, match="reference frame is empty"):
        drift_report(scored.iloc[:0], scored, spec, tmp_path)
    # an empty current frame (a request log with no request yet) is "not enough data", like 1..99 rows
    assert drift_report(scored, scored.iloc[:0], spec, tmp_path).verdict == "not_enough_data"
    bad = scored.copy()
    bad["price"] = bad["price"].astype(object)
    bad.loc[:2, "price"] = "n/a"
    with pytest.raises(DriftInputError, match=r"current frame: column 'price' .* 3 of 6,000 rows are not"):
        drift_report(scored, bad, spec, tmp_path)
    with pytest.raises(DriftInputError, match="max_drifted_share"):
        drift_report(scored, scored, spec, tmp_path, max_drifted_share=1.5)
    with pytest.raises(DriftInputError, match="does not exist"):
        read_request_log(tmp_path / "nowhere")
    (tmp_path / "empty_log").mkdir()
    with pytest.raises(DriftInputError, match=r"no \*\.parquet file"):
        read_request_log(tmp_path / "empty_log")
