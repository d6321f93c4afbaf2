"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import build_model, to_tensors
from ctrflow.training.metrics import auc, evaluate, gauc, logloss, predict, scenario_auc


def test_auc_by_hand() -> None:
    # positives .35, .8; negatives .1, .4: pairs won (.35>.1), (.8>.1), (.8>.4); lost (.35<.4) -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie counts half: positive .5 vs negative .5 -> 0.5
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_auc_undefined_for_one_class_is_nan_not_an_error() -> None:
    assert math.isnan(auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(auc([], []))


def test_logloss_by_hand() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)
    # probabilities of exactly 0/1 are clipped, never inf
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))
    # one class is fine for logloss
    assert logloss([1, 1], [0.5, 0.5]) == pytest.approx(math.log(2))


def test_gauc_by_hand() -> None:
    labels = [1, 0, 1, 0, 1, 1, 1]
    scores = [0.9, 0.5, 0.2, 0.3, 0.6, 0.4, 0.7]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    # a: positives .9, .2 vs negative .5 -> 1/2; b: .6 > .3 -> 1; c: one class, left out
    # impression-weighted: (3 * 0.5 + 2 * 1.0) / 5
    assert gauc(labels, scores, groups) == pytest.approx(0.7)


def test_gauc_matches_sklearn_per_group_with_ties() -> None:
    rng = np.random.default_rng(0)
    n = 2_000
    groups = rng.integers(0, 40, n)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n), 1)  # many ties
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(labels[m])) == 2:
            num += m.sum() * roc_auc_score(labels[m], scores[m])
            den += m.sum()
    assert gauc(labels, scores, groups) == pytest.approx(num / den, abs=1e-12)


def test_gauc_without_any_two_class_group_is_nan() -> None:
    assert math.isnan(gauc([1, 0], [0.3, 0.4], [1, 2]))


def test_scenario_auc_by_name() -> None:
    out = scenario_auc([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["home", "home", "search", "search", "live"])
    assert list(out) == ["home", "live", "search"]
    assert out["home"] == pytest.approx(1.0)
    assert out["search"] == pytest.approx(0.0)
    assert math.isnan(out["live"])


def test_length_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        auc([0, 1, 1], [0.1, 0.2])


def test_evaluate_decodes_scenarios_and_groups_users(tiny_dataset, tiny_frame) -> None:
    torch.set_num_threads(1)
    enc = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:3000])
    frame = tiny_frame.iloc[3000:3600].copy()
    frame.loc[frame.index[:5], "scenario"] = "never-seen"  # encoded as 0 -> reported as "unknown"
    frame.loc[frame.index[:5], "label"] = 1
    batch = to_tensors(enc.transform(frame))
    torch.manual_seed(0)
    model = build_model("dcnv2", enc, {"embedding_dim": 4, "mlp": [8], "cross_layers": 1})
    out = evaluate(model, batch, enc, user_ids=frame["user_id"].to_numpy())
    scores = predict(model, batch)
    labels = frame["label"].to_numpy()
    assert out["n"] == 600
    assert out["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["logloss"] == pytest.approx(logloss(labels, scores))
    assert out["gauc"] == pytest.approx(gauc(labels, scores, frame["user_id"].to_numpy()))
    expected_names = set(frame["scenario"].where(frame["scenario"] != "never-seen", "unknown"))
    assert set(out["scenario_auc"]) == expected_names
    home = (frame["scenario"] == "home").to_numpy()
    assert out["scenario_auc"]["home"] == pytest.approx(auc(labels[home], scores[home]))
    assert out["scenario_auc"]["unknown"] is None  # one class: undefined, reported as None


def test_evaluate_without_raw_user_ids_leaves_unknown_users_out_of_gauc(tiny_dataset, tiny_frame) -> None:
    torch.set_num_threads(1)
    enc = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame.iloc[:3000])
    frame = tiny_frame.iloc[3000:3600].copy()
    frame.loc[frame.index[:50], "user_id"] = -1  # unknown to the encoder: encoded 0, cannot be told apart
    batch = to_tensors(enc.transform(frame))
    torch.manual_seed(0)
    model = build_model("dcnv2", enc, {"embedding_dim": 4, "mlp": [8], "cross_layers": 1})
    scores = predict(model, batch)
    known = batch["user_id"].numpy() != 0
    out = evaluate(model, batch, enc)
    assert out["gauc"] == pytest.approx(
        gauc(frame["label"].to_numpy()[known], scores[known], frame["user_id"].to_numpy()[known])
    )
    assert out["n"] == 600
