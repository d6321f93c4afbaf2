"""The training pipeline on the KFP local runner (SubprocessRunner, this venv), end to end on small data.

Real Great Expectations, Feast, torch and BentoML store in every task; the BentoML home is a temp dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ctrflow.config import from_struct, load_params, merge

pytestmark = pytest.mark.slow


@pytest.fixture()
def bentoml_home(tmp_path, monkeypatch):
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def small_params(**overrides) -> dict:
    base = load_params()
    return merge(
        base,
        {
            "data.source": "synthetic",
            "data.synthetic": {"n_users": 300, "n_items": 200, "n_interactions": 8000},
            "data.max_len": 10,
            "train.epochs": 2,
            "train.threads": 1,
            "train.progress": False,
            "models.dcnv2": {"cross_layers": 2, "mlp": [32, 32], "dropout": 0.0},
            "gate.min_valid_auc": 0.5,
            "gate.min_lift_over_reference": -1.0,  # the reference (lr) is trained, but 2 epochs need not beat it
            **overrides,
        },
    )


def test_from_struct_restores_ints():
    assert from_struct({"a": 50.0, "b": [1.0, 0.5], "c": {"d": 2.0}, "e": "x"}) == {"a": 50, "b": [1, 0.5], "c": {"d": 2}, "e": "x"}


NAME = "ctrflow-synthetic"  # registry.model_name is null: one name per data set


def test_pipeline_trains_registers_and_deploys_only_through_the_gate(tmp_path, bentoml_home):
    from ctrflow import registry
    from pipelines.runner import run_training_local

    run = run_training_local(small_params(), tmp_path / "run1")
    assert run["gate_passed"] is True
    deployment = json.loads(Path(run["deployment"]).read_text())
    assert deployment["model_tag"] == run["model_tag"]
    assert registry.production_model(NAME) == run["model_tag"]
    frame = pd.read_parquet(Path(run["training_set"]) / "frame.parquet")
    assert set(frame["split"]) == {"train", "valid", "test"}
    metrics = json.loads((Path(run["model_dir"]) / "metrics.json").read_text())
    assert 0.5 < metrics["test"]["auc"] <= 1.0
    assert Path(run["validation_report_html"]).name == "index.html"
    assert (Path(run["feature_repo"]) / "data" / "online_store.db").stat().st_size > 0  # materialised online

    _monitoring_pipeline_on_the_test_split(run, frame, metrics, tmp_path)

    # a gate no model can pass, through `run-all`: registered as a candidate, not deployed, nothing served, the
    # reasons and both models' metrics said, production unchanged
    from ctrflow.demo import run_everything

    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "deployment.json").write_text(json.dumps(deployment))  # left by an earlier run here
    with pytest.raises(registry.GateFailedError) as failed:
        run_everything(small_params(**{"gate.min_valid_auc": 0.999}), tmp_path / "run2")
    message = str(failed.value)
    assert "GATE FAILED" in message and "below the minimum 0.9990" in message
    assert {"candidate", "reference", "production"} <= {line.split()[0] for line in message.splitlines() if line.strip()}
    assert not (tmp_path / "run2" / "deployment.json").exists() and not (tmp_path / "run2" / "request_log").exists()
    again = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert again["gate_passed"] is False and again["gate"]["passed"] is False
    assert "deployment" not in again
    assert not (Path(again["run_dir"]) / "deploy-model").exists()
    assert registry.production_model(NAME) == run["model_tag"]
    stages = {m["tag"]: m["stage"] for m in registry.list_models(NAME)}
    assert stages == {run["model_tag"]: "production", again["model_tag"]: "candidate"}


def _monitoring_pipeline_on_the_test_split(run: dict, frame: pd.DataFrame, metrics: dict, tmp_path: Path) -> None:
    """The monitoring pipeline on the same local runner: the test split served (scored by the trained model) and its
    labels as the click feed; the online AUC of the label join is the trainer's offline test AUC."""
    from ctrflow.training.artifact import Scorer, load_model_artifact
    from pipelines.runner import run_monitoring_local

    test = frame[frame["split"] == "test"].reset_index(drop=True)
    loaded = load_model_artifact(run["model_dir"])
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    served = test.drop(columns=["label", "split"]).assign(
        request_id=[f"r{i}" for i in range(len(test))], ts=t0, model="candidate", prediction=Scorer(loaded.model, loaded.encoder).score(test)
    )
    served.to_parquet(tmp_path / "served.parquet")
    clicked = test["label"] == 1
    labels = pd.DataFrame({"request_id": served.loc[clicked, "request_id"], "item_id": served.loc[clicked, "item_id"].astype("int64"), "clicked": 1,
                           "timestamp": t0 + pd.Timedelta(minutes=1)})  # fmt: skip
    horizon = pd.DataFrame({"request_id": ["end"], "item_id": [0], "clicked": [0], "timestamp": [t0 + pd.Timedelta(days=1)]})
    pd.concat([labels, horizon], ignore_index=True).astype({"item_id": "int64"}).to_parquet(tmp_path / "labels.parquet")

    params = small_params(**{"monitoring.workspace": None})
    run_monitoring_local(params, tmp_path / "mon", run["training_set"], run["model_dir"], str(tmp_path / "served.parquet"),
                         labels=str(tmp_path / "labels.parquet"), fail_on_breach=False)  # fmt: skip
    root = tmp_path / "mon" / "kfp"
    (quality_path,) = root.glob("*/check-quality/quality_summary")
    (drift_path,) = root.glob("*/check-drift/drift_summary")
    (request_path,) = root.glob("*/request-retraining/retraining_request")
    quality = json.loads(quality_path.read_text())
    assert quality["join"]["labelled"] == len(test) and quality["join"]["clicked"] == int(clicked.sum())
    assert abs(quality["overall"]["auc"] - metrics["test"]["auc"]) < 0.01
    drift = json.loads(drift_path.read_text())
    assert drift["verdict"] in ("ok", "breached", "not_enough_data") and drift["n_current"] == len(test)
    request = json.loads(request_path.read_text())
    expected = "breached" if drift["verdict"] == "breached" or quality["verdict"] == "breached" else None
    if expected:
        assert request["kind"] == "ctrflow.retraining_request" and request["drift_verdict"] == drift["verdict"]
    else:
        assert request["requested"] is False


def test_invalid_data_stops_the_pipeline_before_anything_is_registered(tmp_path, bentoml_home, tiny_dataset):
    from ctrflow import registry
    from pipelines.runner import run_training_local

    data = tmp_path / "bad_data"
    data.mkdir()
    inter = tiny_dataset.interactions.copy()
    inter.loc[inter.index[:7], "label"] = 2
    inter.to_parquet(data / "interactions.parquet")
    tiny_dataset.users.to_parquet(data / "users.parquet")
    tiny_dataset.items.to_parquet(data / "items.parquet")
    schema = {"scenarios": tiny_dataset.spec.scenarios, "fields": [{"name": "gender", "kind": "categorical", "entity": "user"}]}
    (data / "schema.yaml").write_text(yaml.safe_dump(schema))

    with pytest.raises(RuntimeError, match="validate-data"):
        run_training_local(small_params(**{"data.source": "parquet", "data.path": str(data)}), tmp_path / "run")
    assert registry.list_models() == []
    assert not list((tmp_path / "run" / "kfp").glob("*/build-features/training_set/*"))


def test_dgenctr_pretrain_finetune_pipeline_registers_a_servable_model(tmp_path, bentoml_home):
    """pretrain → finetune on a small synthetic set; the registered model scores the Feast online features."""
    from feast import FeatureStore

    from ctrflow import registry
    from ctrflow.features import online_frame
    from ctrflow.training.artifact import Scorer, load_model_artifact
    from pipelines.runner import run_training_local

    params = small_params(**{"models.dgenctr.pretrain.epochs": 1, "models.dgenctr.d_model": 16, "models.dgenctr.layers": 1})
    run = run_training_local(params, tmp_path / "run", family="dgenctr")
    assert run["gate_passed"] is True and registry.production_model(NAME) == run["model_tag"]
    assert (Path(run["run_dir"]) / "pretrain-model" / "pretrained" / "pretrained.pt").exists()
    loaded = load_model_artifact(registry.model_path(run["model_tag"]))
    assert loaded.name == "dgenctr"
    frame = pd.read_parquet(Path(run["training_set"]) / "frame.parquet")
    user, scenario = int(frame["user_id"].iloc[-1]), str(frame["scenario"].iloc[-1])
    online = online_frame(FeatureStore(repo_path=run["feature_repo"]), user, frame["item_id"].unique()[:20].tolist(), scenario)
    scores = Scorer(loaded.model, loaded.encoder).score(online)
    assert scores.shape == (20,) and ((scores > 0) & (scores < 1)).all()


def test_a_local_run_removes_only_its_own_task_components(tmp_path):
    """The local runner leaves `mktemp -d`/ephemeral_component.py per task. Cleaning every such folder after a run
    deleted the components of a pipeline running beside it (make test's two workers: train-model failed with
    FileNotFoundError). A run's tasks now get a TMPDIR of their own, removed afterwards; others' folders stay."""
    import os
    import subprocess
    import tempfile

    from pipelines.runner import private_tmpdir

    neighbour = Path(tempfile.mkdtemp())  # another pipeline's task folder, in flight
    (neighbour / "ephemeral_component.py").write_text("# a task of another run\n")
    before = os.environ.get("TMPDIR")
    try:
        with private_tmpdir() as private:
            # what the runner's task command does: mktemp -d in the inherited TMPDIR
            task_dir = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
            (task_dir / "ephemeral_component.py").write_text("# this run's task\n")
            assert task_dir.parent == private and tempfile.gettempdir() != str(private)
        assert not private.exists() and not task_dir.exists()
        assert (neighbour / "ephemeral_component.py").exists() and os.environ.get("TMPDIR") == before
    finally:
        shutil.rmtree(neighbour, ignore_errors=True)
