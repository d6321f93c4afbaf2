"""Submitting and scheduling the training pipeline with the real kfp.Client, and the compiled IR itself.

No Kubeflow cluster runs here, so only the API server is faked (tests/fake_kfp_server.py): the real
`kfp.Client` (2.17), its generated kfp_server_api REST client and the real compiled pipeline go over HTTP to
127.0.0.1, and the tests check what a cluster would have received.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kfp
import pytest
import yaml
from fake_kfp_server import FakeKFPServer
from kfp import components as kfp_components

import components
from pipelines.runner import compile_pipeline, schedule_monitoring, submit

PARAMS: dict[str, Any] = {
    "data": {"source": "synthetic", "seed": 7},
    "train": {"model": "dgenctr", "epochs": 2, "lr": 0.001},
    "gate": {"min_auc": 0.6},
}
FEATURE_REPO = "s3://ctrflow/feature_repo"
pytestmark = pytest.mark.filterwarnings("ignore:This client only works with Kubeflow Pipeline:FutureWarning")
TRAINING_STEPS = (
    components.validate_data,
    components.build_features,
    components.train_model,
    components.register_model,
    components.promotion_gate,
    components.deploy_model,
)
# Side-effect steps (Feast materialisation, registry writes, deployment, drift alerts) must never be cached.
UNCACHED = {"build-features", "register-model", "promotion-gate", "deploy-model", "check-drift", "check-quality", "request-retraining"}
# What kfp.Client 2.17 calls for submit(): health probe in __init__, experiment get-or-create, run / recurring run.
CLIENT_ENDPOINTS = {
    "GET /apis/v2beta1/healthz",
    "GET /apis/v2beta1/experiments",
    "POST /apis/v2beta1/experiments",
    "POST /apis/v2beta1/runs",
    "POST /apis/v2beta1/recurringruns",
}


@pytest.fixture
def kfp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKFPServer]:
    """A fresh fake API server; the client's context file (~/.config/kfp/context.json) is pointed at an
    empty temp path so a developer's own KFP context (namespace, auth cookie) cannot leak into the test."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp_context.json"))
    with FakeKFPServer() as server:
        yield server


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ir")
    return {name: compile_pipeline(name, out / f"{name}.yaml") for name in ("training", "monitoring")}


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task in the IR, from the root DAG and every sub-DAG (e.g. a dsl.If), keyed by task name."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def _assert_training_spec(spec: dict[str, Any]) -> None:
    """The IR of the training pipeline: name, root inputs, the six steps and the gate condition."""
    assert spec["pipelineInfo"]["name"] == "ctrflow-training"
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"params", "feature_repo", "model_name"} <= set(root_params)
    assert root_params["params"]["parameterType"] == "STRUCT"
    assert root_params["feature_repo"]["parameterType"] == "STRING"

    executors = {name for name, comp in spec["components"].items() if "executorLabel" in comp}
    assert executors == {f"comp-{step.name}" for step in TRAINING_STEPS}

    tasks = _all_tasks(spec)
    conditions = {n: t for n, t in tasks.items() if "condition" in t.get("triggerPolicy", {})}
    assert len(conditions) == 1, f"expected one conditional branch, got {sorted(conditions)}"
    (branch,) = conditions.values()
    assert "promotion-gate-Output" in branch["triggerPolicy"]["condition"]
    assert branch["triggerPolicy"]["condition"].replace("\n", " ").split()[-2:] == ["==", "true"]
    gate_inputs = [
        v["taskOutputParameter"]
        for v in branch["inputs"]["parameters"].values()
        if v.get("taskOutputParameter", {}).get("producerTask") == "promotion-gate"
    ]
    assert gate_inputs == [{"outputParameterKey": "Output", "producerTask": "promotion-gate"}]
    branch_tasks = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch_tasks) == {"deploy-model"}, "only deploy runs behind the gate"
    assert "deploy-model" not in spec["root"]["dag"]["tasks"]


def test_submit_creates_one_run_with_the_compiled_spec(kfp_server: FakeKFPServer, compiled: dict[str, Path]) -> None:
    result = submit(kfp_server.url, PARAMS, FEATURE_REPO, pipeline_root="s3://ctrflow/pipeline-root")

    assert set(kfp_server.endpoints()) <= CLIENT_ENDPOINTS, kfp_server.endpoints()
    assert all(r.status == 200 for r in kfp_server.requests), [
        (r.method, r.path, r.status) for r in kfp_server.requests
    ]
    assert kfp_server.recurring_runs == {}
    assert len(kfp_server.runs) == 1
    (run,) = kfp_server.runs.values()
    assert result == {"run_id": run["run_id"]}

    (experiment,) = kfp_server.experiments.values()  # created once, then found by name: no duplicate
    assert experiment["display_name"] == "ctrflow"
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == "ctrflow-training"

    assert run["runtime_config"]["parameters"] == {"params": PARAMS, "feature_repo": FEATURE_REPO}
    assert run["runtime_config"]["pipeline_root"] == "s3://ctrflow/pipeline-root"
    _assert_training_spec(run["pipeline_spec"])
    # The body carries exactly the IR the compiler writes, not a re-derived copy.
    assert run["pipeline_spec"] == yaml.safe_load(compiled["training"].read_text())


def test_submit_with_cron_creates_a_recurring_run(kfp_server: FakeKFPServer) -> None:
    result = submit(kfp_server.url, PARAMS, FEATURE_REPO, cron="0 0 2 * * *", job_name="ctrflow-nightly")

    assert set(kfp_server.endpoints()) <= CLIENT_ENDPOINTS, kfp_server.endpoints()
    assert kfp_server.runs == {}
    assert len(kfp_server.recurring_runs) == 1
    (rec,) = kfp_server.recurring_runs.values()
    assert result == {"recurring_run_id": rec["recurring_run_id"]}

    assert rec["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert rec["mode"] == "ENABLE"
    assert rec["display_name"] == "ctrflow-nightly"
    (experiment,) = kfp_server.experiments.values()
    assert rec["experiment_id"] == experiment["experiment_id"]
    assert rec["runtime_config"]["parameters"] == {"params": PARAMS, "feature_repo": FEATURE_REPO}
    _assert_training_spec(rec["pipeline_spec"])


@pytest.mark.parametrize("cron", ["0 2 * * *", "0 0 2 * * * 2030"])
def test_submit_rejects_a_cron_without_six_fields_before_any_request(kfp_server: FakeKFPServer, cron: str) -> None:
    n = len(cron.split())
    with pytest.raises(ValueError, match=re.escape(f"cron '{cron}' must have 6 fields (seconds first), got {n}")):
        submit(kfp_server.url, PARAMS, FEATURE_REPO, cron=cron)
    assert kfp_server.endpoints() == [], "nothing may reach the API server when the cron is invalid"


def test_compiled_training_yaml_loads_back_as_a_component(compiled: dict[str, Path]) -> None:
    comp = kfp_components.load_component_from_file(str(compiled["training"]))

    assert comp.name == "ctrflow-training"
    inputs = comp.component_spec.inputs
    assert {k: v.type for k, v in inputs.items()} == {
        "params": "Dict",
        "feature_repo": "String",
        "model_name": "String",
    }
    assert not inputs["params"].optional and not inputs["feature_repo"].optional
    assert inputs["model_name"].optional and inputs["model_name"].default == ""
    outputs = {k: v.type for k, v in comp.component_spec.outputs.items()}
    assert outputs == {
        "training_set": "system.Dataset@0.0.1",
        "model": "system.Model@0.0.1",
        "tag": "String",
        "gate_passed": "Boolean",
    }
    _assert_training_spec(yaml.safe_load(compiled["training"].read_text()))


def test_compiled_monitoring_yaml_loads_back_as_a_component(compiled: dict[str, Path]) -> None:
    comp = kfp_components.load_component_from_file(str(compiled["monitoring"]))

    assert comp.name == "ctrflow-monitoring"
    inputs = comp.component_spec.inputs
    assert {k: v.type for k, v in inputs.items()} == {
        "params": "Dict",
        "training_set_uri": "String",
        "model_uri": "String",
        "current": "String",
        "labels": "String",
        "fail_on_breach": "Boolean",
    }
    assert inputs["fail_on_breach"].optional and inputs["fail_on_breach"].default is True
    assert inputs["labels"].optional and inputs["labels"].default == ""
    assert not comp.component_spec.outputs
    _assert_monitoring_spec(yaml.safe_load(compiled["monitoring"].read_text()))


def _assert_monitoring_spec(spec: dict[str, Any]) -> None:
    """Drift and quality, then the retraining decision fed by both summaries."""
    assert spec["pipelineInfo"]["name"] == "ctrflow-monitoring"
    executors = {name for name, c in spec["components"].items() if "executorLabel" in c}
    steps = (components.check_drift, components.check_quality, components.request_retraining)
    assert {f"comp-{step.name}" for step in steps} <= executors
    decide = _all_tasks(spec)["request-retraining"]
    producers = {k: v["taskOutputArtifact"]["producerTask"] for k, v in decide["inputs"]["artifacts"].items()}
    assert producers == {"drift_summary": "check-drift", "quality_summary": "check-quality"}


def test_schedule_monitoring_creates_a_recurring_run(kfp_server: FakeKFPServer, compiled: dict[str, Path]) -> None:
    params = {**PARAMS, "monitoring": {"schedule_cron": "0 30 4 * * *"}}
    result = schedule_monitoring(kfp_server.url, params, "s3://b/ts", "s3://b/model", "s3://b/log", "s3://b/labels")
    assert set(kfp_server.endpoints()) <= CLIENT_ENDPOINTS, kfp_server.endpoints()
    (rec,) = kfp_server.recurring_runs.values()
    assert result == {"recurring_run_id": rec["recurring_run_id"], "cron": "0 30 4 * * *"}
    assert rec["trigger"] == {"cron_schedule": {"cron": "0 30 4 * * *"}}
    assert rec["display_name"] == "ctrflow-monitoring"
    assert rec["runtime_config"]["parameters"] == {
        "params": params, "training_set_uri": "s3://b/ts", "model_uri": "s3://b/model", "current": "s3://b/log", "labels": "s3://b/labels"
    }
    assert rec["pipeline_spec"] == yaml.safe_load(compiled["monitoring"].read_text())
    _assert_monitoring_spec(rec["pipeline_spec"])
    with pytest.raises(ValueError, match="must have 6 fields"):
        schedule_monitoring(kfp_server.url, params, "a", "b", "c", cron="0 4 * * *")


@pytest.mark.parametrize("pipeline", ["training", "monitoring"])
def test_side_effect_steps_are_never_cached(compiled: dict[str, Path], pipeline: str) -> None:
    tasks = _all_tasks(yaml.safe_load(compiled[pipeline].read_text()))
    step_tasks = {n: t for n, t in tasks.items() if not n.startswith(("condition-", "importer"))}
    uncached = {n for n, t in step_tasks.items() if not t.get("cachingOptions", {}).get("enableCache", False)}
    assert uncached == UNCACHED & set(step_tasks), f"{pipeline}: tasks with caching off: {sorted(uncached)}"
    # Disabled caching is written as an empty cachingOptions (proto3 drops false), never left to the default.
    assert all("cachingOptions" in step_tasks[n] for n in uncached)
