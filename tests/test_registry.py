"""The model registry on a real BentoML model store in a temporary BENTOML_HOME: register, gate, promote,
rollback, list, and the stage ledger's history."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ctrflow import registry


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_dataset, tiny_frame):
    """A real (untrained) DCNv2 artifact: the registry stores whatever the trainer saves."""
    from ctrflow.data.encoding import FeatureEncoder
    from ctrflow.models import build_model
    from ctrflow.training.artifact import save_model_artifact

    torch.set_num_threads(1)
    encoder = FeatureEncoder(tiny_dataset.spec).fit(tiny_frame)
    model = build_model("dcnv2", encoder, {"embedding_dim": 4, "cross_layers": 1, "mlp": [8]})
    path = tmp_path_factory.mktemp("artifact") / "model"
    return save_model_artifact(path, model, encoder, {"valid": {"auc": 0.5}}, {"model": "dcnv2"})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("CTRFLOW_USER", "tester")
    return tmp_path / "bentoml"


def _metrics(valid_auc: float | None, test_auc: float = 0.7) -> dict:
    return {
        "valid": {"auc": valid_auc, "logloss": 0.5, "gauc": None, "scenario_auc": {"home": None, "search": 0.6}},
        "test": {"auc": test_auc, "logloss": 0.51},
    }


def _register(artifact, tiny_dataset, valid_auc: float | None, name: str = "ranker") -> str:
    return registry.register_model(
        artifact,
        name,
        metrics=_metrics(valid_auc),
        params={"model": "dcnv2", "embedding_dim": 4, "path": None},
        feature_spec=tiny_dataset.spec,
        data_fingerprint="sha256:abc",
        code_version="deadbeef",
        labels={"split": "temporal"},
    )


def test_register_stores_artifact_labels_and_metadata(home, artifact, tiny_dataset):
    from ctrflow.training.artifact import load_model_artifact

    tag = _register(artifact, tiny_dataset, 0.71)
    assert tag.startswith("ranker:")
    path = registry.model_path(tag)
    assert path.is_relative_to(home / "models")
    loaded = load_model_artifact(path)  # the artifact files sit at the model's root
    assert loaded.name == "dcnv2"

    import bentoml
    from bentoml._internal.models import ModelStore

    model = bentoml.models.get(tag, _model_store=ModelStore(str(home / "models")))
    assert model.info.labels["model_family"] == "dcnv2"
    assert model.info.labels["split"] == "temporal"
    assert model.info.labels["registered_stage"] == "candidate"
    assert model.info.metadata["data_fingerprint"] == "sha256:abc"
    assert model.info.metadata["code_version"] == "deadbeef"
    assert model.info.metadata["metrics"]["valid"]["auc"] == pytest.approx(0.71)
    # None is not a BentoML metadata type: the full record keeps it
    assert registry.registration(tag)["metrics"]["valid"]["gauc"] is None
    assert registry.registration(tag)["params"]["path"] is None
    assert registry.stage(tag) == "candidate"
    assert registry.production_model("ranker") is None

    rows = registry.list_models("ranker")
    assert [r["tag"] for r in rows] == [tag]
    assert rows[0]["stage"] == "candidate"
    assert rows[0]["metrics"] == {"valid_auc": 0.71, "test_auc": 0.7, "valid_logloss": 0.5, "test_logloss": 0.51}


def test_register_rejects_a_missing_artifact(home, tmp_path, tiny_dataset):
    with pytest.raises(registry.RegistryError, match="not a directory"):
        _register(tmp_path / "nope", tiny_dataset, 0.7)


def test_gate_thresholds_and_production_tolerance(home, artifact, tiny_dataset):
    low = _register(artifact, tiny_dataset, 0.60)
    d = registry.gate(low, min_valid_auc=0.65, tolerance=0.005)
    assert not d.passed
    assert any("below the minimum 0.6500" in r for r in d.reasons)

    none = _register(artifact, tiny_dataset, None)
    d = registry.gate(none, min_valid_auc=0.65, tolerance=0.005)
    assert not d.passed and "no validation AUC" in d.reasons[0]

    first = _register(artifact, tiny_dataset, 0.70)
    d = registry.gate(first, min_valid_auc=0.65, tolerance=0.005)
    assert d.passed
    assert any(r.startswith("no production model") for r in d.reasons)
    registry.promote(first, reason="first model")

    worse = _register(artifact, tiny_dataset, 0.69)
    d = registry.gate(worse, min_valid_auc=0.65, tolerance=0.005)
    assert not d.passed
    assert d.production_tag == first and d.production_valid_auc == pytest.approx(0.70)
    assert any("worse than production" in r and first in r for r in d.reasons)
    d = registry.gate(worse, min_valid_auc=0.65, tolerance=0.02)  # within a looser tolerance
    assert d.passed

    slightly_worse = _register(artifact, tiny_dataset, 0.698)
    assert registry.gate(slightly_worse, min_valid_auc=0.65, tolerance=0.005).passed


def test_promote_needs_a_passed_gate_unless_forced(home, artifact, tiny_dataset):
    a = _register(artifact, tiny_dataset, 0.70)
    with pytest.raises(registry.PromotionError, match="no gate decision"):
        registry.promote(a, reason="no gate run")
    registry.gate(a, min_valid_auc=0.75, tolerance=0.005)
    with pytest.raises(registry.PromotionError, match="below the minimum"):
        registry.promote(a, reason="gate failed")
    assert registry.production_model("ranker") is None

    record = registry.promote(a, reason="on-call: the AUC floor is wrong for this dataset", force=True)
    assert record["forced"] is True and record["to"] == "production"
    assert registry.production_model("ranker") == a
    last = registry.history("ranker")[-1]
    assert last["tag"] == a and last["forced"] is True and last["by"].startswith("tester@")
    assert last["reason"] == "on-call: the AUC floor is wrong for this dataset"
    with pytest.raises(registry.RegistryError, match="already the production model"):
        registry.promote(a, reason="again", force=True)
    with pytest.raises(ValueError, match="reason is required"):
        registry.promote(a, reason=" ", force=True)


def test_promote_rechecks_the_gate_when_production_changed(home, artifact, tiny_dataset):
    a = _register(artifact, tiny_dataset, 0.70)
    b = _register(artifact, tiny_dataset, 0.80)
    assert registry.gate(a, min_valid_auc=0.65, tolerance=0.005).passed  # decided with no production model
    registry.gate(b, min_valid_auc=0.65, tolerance=0.005)
    registry.promote(b, reason="better")
    with pytest.raises(registry.PromotionError, match="worse than production"):
        registry.promote(a, reason="stale gate decision")  # re-gated against b with the same thresholds
    assert registry.production_model("ranker") == b


def test_promote_rollback_list_and_history(home, artifact, tiny_dataset):
    tags = [_register(artifact, tiny_dataset, auc) for auc in (0.70, 0.72, 0.74)]
    for t in tags:
        registry.gate(t, min_valid_auc=0.65, tolerance=0.005)
        registry.promote(t, reason=f"promote {t}")

    def stages() -> dict[str, str]:
        return {r["tag"]: r["stage"] for r in registry.list_models("ranker")}

    assert stages() == {tags[0]: "archived", tags[1]: "archived", tags[2]: "production"}
    assert list(stages().values()).count("production") == 1

    back = registry.rollback("ranker", reason="p99 latency regression")
    assert back == tags[1] and registry.production_model("ranker") == tags[1]
    assert stages() == {tags[0]: "archived", tags[1]: "production", tags[2]: "archived"}
    assert registry.rollback("ranker", reason="still bad") == tags[0]
    with pytest.raises(registry.RegistryError, match="no earlier production model"):
        registry.rollback("ranker", reason="nothing left")

    hist = registry.history("ranker")
    rollbacks = [h for h in hist if h["action"] == "rollback"]
    assert [(h["tag"], h["from"], h["to"]) for h in rollbacks] == [
        (tags[2], "production", "archived"),
        (tags[1], "archived", "production"),
        (tags[1], "production", "archived"),
        (tags[0], "archived", "production"),
    ]
    assert all(h["reason"] and h["at"] and h["by"] for h in hist)
    ledger = json.loads((home / registry.LEDGER_NAME).read_text())
    assert ledger["models"]["ranker"]["production"] == tags[0]

    rows = registry.list_models()
    assert [r["created"] for r in rows] == sorted((r["created"] for r in rows), reverse=True)


def test_each_bentoml_home_is_its_own_registry(home, artifact, tiny_dataset, tmp_path, monkeypatch):
    tag = _register(artifact, tiny_dataset, 0.7)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "other"))
    assert registry.list_models() == []
    with pytest.raises(registry.RegistryError, match="not in the model store"):
        registry.model_path(tag + "x")


def test_data_fingerprint_is_stable_and_sensitive(tmp_path, tiny_frame):
    frame = tiny_frame.head(200)
    assert registry.data_fingerprint(frame) == registry.data_fingerprint(frame.copy())  # list cells included
    changed = frame.copy()
    changed.loc[changed.index[0], "label"] = 1 - changed["label"].iloc[0]
    assert registry.data_fingerprint(changed) != registry.data_fingerprint(frame)

    frame.to_parquet(tmp_path / "a.parquet")
    (tmp_path / "d").mkdir()
    pd.DataFrame({"x": [1, 2]}).to_parquet(tmp_path / "d" / "b.parquet")
    fp = registry.data_fingerprint([tmp_path / "a.parquet", tmp_path / "d"])
    assert fp.startswith("sha256:") and fp == registry.data_fingerprint([tmp_path / "a.parquet", tmp_path / "d"])
    with pytest.raises(FileNotFoundError):
        registry.data_fingerprint(tmp_path / "missing.parquet")


def test_code_version_names_the_commit_or_package():
    version = registry.code_version()
    assert version and version != "unknown"


def _spec_of(tiny_dataset, dataset: str):
    from ctrflow.data.spec import FeatureSpec

    spec = FeatureSpec.from_dict(tiny_dataset.spec.to_dict())
    spec.extra["dataset"] = dataset
    return spec


def test_gate_against_a_reference_and_only_a_production_model_of_the_same_data_set(home, artifact, tiny_dataset):
    def register(auc: float, dataset: str) -> str:
        return registry.register_model(
            artifact, "shared", metrics=_metrics(auc), params={"model": "dcnv2"}, feature_spec=_spec_of(tiny_dataset, dataset),
            data_fingerprint="sha256:abc", code_version="deadbeef",
        )  # fmt: skip

    other = register(0.90, "other")
    registry.promote(other, reason="a model of another data set holds the shared name", force=True)
    cand = register(0.62, "mine")
    ref = {"valid": {"auc": 0.60, "logloss": 0.66}, "test": {"auc": 0.61}}

    d = registry.gate(cand, reference_model="lr", reference_metrics=ref, min_lift_over_reference=0.01)
    assert d.passed, d.reasons
    assert any("reaches the reference lr (0.6000)" in r for r in d.reasons)
    assert any(f"production {other} was trained on data set 'other', not 'mine'; not compared" in r for r in d.reasons)
    assert d.production_metrics == {} and d.dataset == "mine" and d.min_valid_auc is None
    assert d.reference_valid_auc == pytest.approx(0.60) and d.candidate_metrics["valid_auc"] == pytest.approx(0.62)
    summary = d.summary()
    assert "PASSED" in summary and "candidate" in summary and "reference" in summary and "0.6000" in summary

    d = registry.gate(cand, reference_model="lr", reference_metrics=ref, min_lift_over_reference=0.05)
    assert not d.passed and any("below the reference lr (0.6000) plus the required lift 0.0500" in r for r in d.reasons)
    d = registry.gate(cand, reference_model="lr", reference_metrics=None)
    assert not d.passed and any("was not trained" in r and "gate.reference_model" in r for r in d.reasons)
    d = registry.gate(cand, reference_model="lr", reference_metrics=ref, min_valid_auc=0.65)
    assert not d.passed and any("below the minimum 0.6500" in r for r in d.reasons)

    # the decision round-trips through the ledger; a promote after production changed re-gates with the same reference
    assert registry.gate(cand, reference_model="lr", reference_metrics=ref).passed
    assert registry.last_gate(cand).reference_metrics["valid_auc"] == pytest.approx(0.60)
    better_ref = register(0.63, "mine")
    registry.gate(better_ref, reference_model="lr", reference_metrics=ref)
    registry.promote(better_ref, reason="better")
    with pytest.raises(registry.PromotionError, match="worse than production"):
        registry.promote(cand, reason="stale decision")  # 0.62 vs production 0.63 of the same data set: beyond 0.005
    old = {"tag": "x:1", "passed": True, "reasons": [], "candidate_valid_auc": 0.7, "production_tag": None,
           "production_valid_auc": None, "min_valid_auc": 0.65, "tolerance": 0.005, "at": "2024-01-01T00:00:00+00:00"}  # fmt: skip
    assert registry.GateDecision.from_dict(old).reference_model is None  # ledgers written before the reference


def test_model_names_default_per_data_set():
    assert registry.default_model_name("ml-100k") == "ctrflow-ml-100k"
    assert registry.default_model_name("My Data/Set (v2)") == "ctrflow-my-data-set-v2"
    assert registry.default_model_name("") == registry.DEFAULT_NAME
    assert len(registry.default_model_name("x" * 200)) <= 63
    assert registry.model_name_for({"registry": {"model_name": None}}, "bughunt") == "ctrflow-bughunt"
    assert registry.model_name_for({"registry": {"model_name": "fixed"}}, "bughunt") == "fixed"


def test_item_fingerprint_does_not_depend_on_how_values_were_typed(tiny_dataset, tiny_frame):
    spec = tiny_dataset.spec
    items = tiny_frame["item_id"].unique()
    fp = registry.item_fingerprint(tiny_frame, spec, items)
    assert fp["items"] == sorted(int(i) for i in items)[: registry.FINGERPRINT_ITEMS]
    item_cols = {f.column for f in spec.fields if f.entity.value == "item" and f.column != spec.item_key}
    assert set(fp["features"]) == item_cols
    retyped = tiny_frame.copy()
    emb = next(f.column for f in spec.fields if f.kind.value == "embedding" and f.entity.value == "item")
    retyped[emb] = [list(map(float, v)) for v in retyped[emb]]  # lists of Python floats instead of float32 arrays
    assert registry.item_fingerprint(retyped.iloc[::-1], spec, items) == fp  # order and typing do not matter
    changed = tiny_frame.copy()
    changed[emb] = [v + 0.5 for v in changed[emb]]
    diff = registry.item_fingerprint(changed, spec, items)["features"]
    assert [c for c in fp["features"] if fp["features"][c] != diff[c]] == [emb]
