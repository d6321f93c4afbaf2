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
