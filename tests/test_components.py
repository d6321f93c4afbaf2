"""Each KFP component's `python_func` on small real inputs, as the KFP runner calls it.

The params arrive as KFP hands them over (the protobuf Struct round trip: every int a float, nulls recorded
aside), the artifacts are kfp.dsl objects constructed directly on temp folders, and the steps underneath are real:
Great Expectations, Feast, torch, the BentoML model store, Evidently. Sizes are tiny so each runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from google.protobuf import json_format, struct_pb2
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

import components
from ctrflow.config import REPO_ROOT, load_params, to_struct
from ctrflow.publish import publish_training
from ctrflow.steps import TRAINING_FRAME

TINY = {
    "data.source": "synthetic",
    "data.synthetic": {"n_users": 150, "n_items": 100, "n_interactions": 3000},
    "data.max_len": 8,
    "validation.min_rows": 100,
    "train": {"epochs": 1, "threads": 1, "progress": False, "batch_size": 512, "embedding_dim": 4},
    "models.dcnv2": {"cross_layers": 1, "mlp": [8], "dropout": 0.0},
    "models.dgenctr": {"d_model": 8, "layers": 1, "heads": 2, "ffn_mult": 1, "steps": 10, "pretrain": {"epochs": 1, "batch_size": 512}},
    "models.star": {"hidden": [8], "aux": [4], "aux_embedding_dim": 4},
    "models.gsvr": {"latent_dim": 4, "posterior_hidden": [8], "prototypes": 2},
    "gate.min_valid_auc": 0.0,
}


def as_kfp_struct(params: dict) -> dict:
    """What a component receives: params through KFP's protobuf Struct (ints come back as floats)."""
    s = struct_pb2.Struct()
    s.update(to_struct(params))
    return json_format.MessageToDict(s)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml")


@pytest.fixture()
def params(home, monkeypatch, tmp_path) -> dict:
    monkeypatch.setenv("BENTOML_HOME", str(home))
    p = load_params(REPO_ROOT / "params.yaml", {**TINY, "registry.bentoml_home": str(home), "embeddings.cache_dir": str(tmp_path / "emb")})
    struct = as_kfp_struct(p)
    assert isinstance(struct["train"]["epochs"], float)
    return struct


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "dataset"
    tiny_dataset.save(out)
    return out


@pytest.fixture(scope="module")
def training_set(tiny_training_set) -> Path:
    return tiny_training_set


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training_set, home) -> tuple[Model, Metrics, float]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(home))
        p = as_kfp_struct(load_params(REPO_ROOT / "params.yaml", {**TINY, "registry.bentoml_home": str(home)}))
        model = Model(uri=str(tmp_path_factory.mktemp("model") / "model"))
        metrics = Metrics(uri=str(tmp_path_factory.mktemp("metrics") / "metrics"))
        auc = components.train_model.python_func(params=p, training_set=Dataset(uri=str(training_set)), model=model, metrics=metrics)
    return model, metrics, auc


def test_validate_data(params, tmp_path):
    dataset, report = Dataset(uri=str(tmp_path / "ds")), Artifact(uri=str(tmp_path / "report"))
    rows = components.validate_data.python_func(params=params, dataset=dataset, validation_report=report)
    assert rows == dataset.metadata["rows"] > 100 and dataset.metadata["source"]
    assert (tmp_path / "ds" / "interactions.parquet").exists() and (tmp_path / "report" / "validation.json").exists()


def test_validate_data_stops_on_a_misspelt_param(params, tmp_path):
    from ctrflow.config import ConfigError

    params["validation"]["min_rowz"] = 5
    with pytest.raises(ConfigError, match="validation.min_rowz.*'min_rows'"):
        components.validate_data.python_func(params=params, dataset=Dataset(uri=str(tmp_path / "ds")), validation_report=Artifact(uri=str(tmp_path / "r")))
    assert not (tmp_path / "ds").exists()


def test_build_features(params, dataset_dir, tmp_path):
    training_set = Dataset(uri=str(tmp_path / "ts"))
    repo = components.build_features.python_func(params=params, dataset=Dataset(uri=str(dataset_dir)), feature_repo=str(tmp_path / "repo"), training_set=training_set)
    assert Path(repo, "feature_store.yaml").exists()
    frame = pd.read_parquet(tmp_path / "ts" / TRAINING_FRAME)
    assert set(frame["split"]) == {"train", "valid", "test"} and training_set.metadata["rows"] == len(frame)


def test_embed_items(params, dataset_dir, tiny_dataset, tmp_path):
    import numpy as np

    items = tiny_dataset.items["item_id"].to_numpy()
    pd.DataFrame({"item_id": items, "audio_emb": list(np.random.default_rng(0).normal(size=(len(items), 3)).astype("float32"))}).to_parquet(tmp_path / "audio.parquet")
    params["embeddings"]["modalities"] = {"audio": {"path": str(tmp_path / "audio.parquet")}}
    embedded = Dataset(uri=str(tmp_path / "embedded"))
    out = components.embed_items.python_func(params=params, dataset=Dataset(uri=str(dataset_dir)), embedded=embedded)
    assert json.loads(out)["audio"]["dim"] == 3 and embedded.metadata["modalities"]["audio"]["field"] == "audio_emb"


def test_train_model(trained):
    model, metrics, auc = trained
    assert 0.0 < auc < 1.0 and model.metadata["model"] == "dcnv2" and model.metadata["valid_auc"] == auc
    assert {"valid_auc", "test_auc", "valid_logloss", "test_logloss"} <= set(metrics.metadata)
    saved = json.loads(Path(model.path, "params.json").read_text())
    assert saved["train"]["epochs"] == 1 and isinstance(saved["train"]["epochs"], int)  # typed after the round trip


def test_pretrain_then_finetune(params, training_set, tmp_path):
    pretrained = Model(uri=str(tmp_path / "pretrained"))
    ckpt = components.pretrain_model.python_func(params=params, training_set=Dataset(uri=str(training_set)), pretrained=pretrained)
    assert Path(ckpt).exists() and pretrained.metadata["framework"] == "ctrflow-dgenctr-pretrain"
    model, metrics = Model(uri=str(tmp_path / "model")), Metrics(uri=str(tmp_path / "metrics"))
    auc = components.finetune_model.python_func(params=params, training_set=Dataset(uri=str(training_set)), pretrained=pretrained, model=model, metrics=metrics)
    assert 0.0 < auc < 1.0 and model.metadata["model"] == "dgenctr" and metrics.metadata["valid_auc"] == auc


def test_train_multiscenario(params, training_set, tmp_path):
    model, metrics = Model(uri=str(tmp_path / "model")), Metrics(uri=str(tmp_path / "metrics"))
    auc = components.train_multiscenario.python_func(params=params, training_set=Dataset(uri=str(training_set)), model=model, metrics=metrics)
    assert 0.0 < auc < 1.0 and model.metadata["model"] == "gsvr-star" and metrics.metadata["valid_auc"] == auc


def test_register_gate_deploy(params, trained, dataset_dir, training_set, tmp_path):
    from ctrflow import registry

    model, _, _ = trained
    ts = Dataset(uri=str(training_set))
    tag = components.register_model.python_func(params=params, model=model, dataset=Dataset(uri=str(dataset_dir)), training_set=ts)
    assert registry.stage(tag) == registry.CANDIDATE
    strict = {**params, "gate": {**params["gate"], "reference_model": None, "min_valid_auc": 0.99}}
    assert components.promotion_gate.python_func(params=strict, tag=tag, training_set=ts) is False
    lenient = {**params, "gate": {**params["gate"], "reference_model": None, "min_valid_auc": 0.0}}
    assert components.promotion_gate.python_func(params=lenient, tag=tag, training_set=ts) is True
    # deploy checks that the model fits the feature repository it will serve from: a real one, of the same data
    repo = components.build_features.python_func(params=params, dataset=Dataset(uri=str(dataset_dir)), feature_repo=str(tmp_path / "repo"), training_set=Dataset(uri=str(tmp_path / "ts")))
    deployment = Artifact(uri=str(tmp_path / "deployment.json"))
    assert components.deploy_model.python_func(params=params, tag=tag, feature_repo=repo, deployment=deployment) == tag
    assert json.loads(Path(deployment.path).read_text())["model_tag"] == tag and registry.production_model(tag.split(":")[0]) == tag


def test_check_drift(params, trained, training_set, tmp_path):
    model, _, _ = trained
    frame = pd.read_parquet(training_set / TRAINING_FRAME)
    current = tmp_path / "current.parquet"
    frame[frame["split"] == "test"].drop(columns=["label", "split"]).to_parquet(current)
    report, summary = HTML(uri=str(tmp_path / "drift.html")), Artifact(uri=str(tmp_path / "drift.json"))
    verdict = components.check_drift.python_func(params=params, training_set=Dataset(uri=str(training_set)), model=model, current=str(current), drift_report=report, drift_summary=summary, fail_on_breach=False)
    assert verdict in ("ok", "breached", "not_enough_data") and report.metadata["verdict"] == verdict
    assert Path(report.path).stat().st_size > 0 and json.loads(Path(summary.path).read_text())["verdict"] == verdict


def test_check_quality_and_request_retraining(params, tmp_path):
    import numpy as np

    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    n = 400
    log = pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "item_id": np.arange(n, dtype="int64"), "ts": [t0] * n,
                        "scenario": ["home"] * n, "model": ["m"] * n, "prediction": np.full(n, 0.5)})  # fmt: skip
    log.to_parquet(tmp_path / "log.parquet")
    # 40 clicks where 200 were predicted: observed / predicted = 0.2
    labels = pd.DataFrame({"request_id": [f"r{i}" for i in range(40)] + ["end"], "item_id": np.arange(41, dtype="int64"),
                           "clicked": [1] * 40 + [0], "timestamp": [t0 + pd.Timedelta(minutes=1)] * 40 + [t0 + pd.Timedelta(days=1)]})  # fmt: skip
    labels.to_parquet(tmp_path / "labels.parquet")
    quality = Artifact(uri=str(tmp_path / "quality.json"))
    assert components.check_quality.python_func(params=params, current=str(tmp_path / "log.parquet"), labels=str(tmp_path / "labels.parquet"), quality_summary=quality) == "breached"
    skipped = Artifact(uri=str(tmp_path / "skipped.json"))
    assert components.check_quality.python_func(params=params, current="unused", labels="", quality_summary=skipped) == "skipped"

    drift = Artifact(uri=str(tmp_path / "drift.json"))
    Path(drift.path).write_text(json.dumps({"verdict": "ok", "reasons": [], "scenarios": {}}))
    request = Artifact(uri=str(tmp_path / "request.json"))
    verdict = components.request_retraining.python_func(params=params, drift_summary=drift, quality_summary=quality, retraining_request=request, fail_on_breach=False)
    written = json.loads(Path(request.path).read_text())
    assert verdict == "breached" and written["kind"] == "ctrflow.retraining_request" and written["breached_scenarios"] == ["home"]
    assert request.metadata["requested"] is True
    with pytest.raises(RuntimeError, match="monitoring breached: online quality: all traffic: observed CTR 0.1000"):
        components.request_retraining.python_func(params=params, drift_summary=drift, quality_summary=quality, retraining_request=request)
    quiet = Artifact(uri=str(tmp_path / "quiet.json"))
    assert components.request_retraining.python_func(params=params, drift_summary=drift, quality_summary=skipped, retraining_request=quiet) == "ok"
    assert json.loads(Path(quiet.path).read_text()) == {"requested": False, "verdict": "ok"}


def test_publish_training_logs_each_defined_metric():
    model, metrics = Model(uri="m"), Metrics(uri="x")
    result = {"model": "dcnv2", "valid_auc": 0.7, "test_auc": 0.6, "metrics": {"valid": {"auc": 0.7, "logloss": 0.5, "gauc": None}, "test": {"auc": 0.6}}}
    assert publish_training(result, model, metrics) == 0.7
    assert metrics.metadata == {"valid_auc": 0.7, "valid_logloss": 0.5, "test_auc": 0.6}  # gAUC undefined: left out
    assert model.metadata == {"model": "dcnv2", "valid_auc": 0.7, "test_auc": 0.6}


def test_every_component_has_a_test_here():  # here, or where the comment says
    tested = {
        "validate_data", "build_features", "embed_items", "train_model", "pretrain_model", "finetune_model",
        "train_multiscenario", "register_model", "promotion_gate", "deploy_model", "check_drift", "check_quality",
        "request_retraining",
        "train_pytorchjob",  # in tests/test_pytorchjob.py, against a fake Kubernetes API server
    }
    assert set(components.__all__) - {"BASE_IMAGE"} == tested
