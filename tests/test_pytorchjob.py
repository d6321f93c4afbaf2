"""The training step as a Kubeflow PyTorchJob: `ctrflow pytorchjob` against the CRD's published schema, and the
pods' command run here with the environment the training operator gives them.

The schema is the `openAPIV3Schema` of PyTorchJob v1 in kubeflow/training-operator v1.9.0
(tests/fixtures/kubeflow/, Apache-2.0), made strict as the API server's strict field validation is: a field the
schema does not name is an error (the server would otherwise drop it silently).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from ctrflow.cli import cli
from ctrflow.config import REPO_ROOT, load_params, merge
from ctrflow.training.pytorchjob import PARAMS_DIR, pytorchjob_manifests

CRD = Path(__file__).parent / "fixtures" / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"


def _strict(node: object) -> object:
    """Every object schema with `properties` and no `additionalProperties` / preserve-unknown-fields gets
    `additionalProperties: false`."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()}) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def validator(crd) -> jsonschema.Draft4Validator:
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _errors(validator: jsonschema.Draft4Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _params(**overrides: object) -> dict:
    return merge(load_params(REPO_ROOT / "params.yaml"), overrides)


def test_ctrflow_pytorchjob_writes_a_job_the_published_schema_accepts(crd, validator, tmp_path) -> None:
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(
        cli, ["--set", "pytorchjob.replicas=3", "pytorchjob", "--training-set", "runs/ts", "--out", "runs/model",
              "--image", "registry.example/ctrflow:1", "--file", str(out)],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    config_map, job = list(yaml.safe_load_all(out.read_text()))
    assert job["apiVersion"] == f"{crd['spec']['group']}/v1" and job["kind"] == crd["spec"]["names"]["kind"]
    assert _errors(validator, job) == []
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 2)  # 3 pods, one process each
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/ctrflow:1"
    assert container["command"][-4:] == ["--training-set", "/data/runs/ts", "--out", "/data/runs/model"]
    # the pods read the very params this command was given, typed
    assert config_map["metadata"]["name"] == "ctrflow-train-params"
    assert yaml.safe_load(config_map["data"]["params.yaml"])["pytorchjob"]["replicas"] == 3


def test_one_replica_is_a_master_alone_and_a_bad_name_is_refused(validator) -> None:
    _, job = pytorchjob_manifests(_params(**{"pytorchjob.replicas": 1}), "ts", "m", "img", model="lr")
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"][-2:] == [
        "--model", "lr"]  # fmt: skip
    assert _errors(validator, job) == []
    with pytest.raises(ValueError, match="Train_Job"):
        pytorchjob_manifests(_params(), "ts", "m", "img", name="Train_Job")


def test_the_schema_check_catches_what_the_api_server_would_refuse(validator) -> None:
    _, job = pytorchjob_manifests(_params(), "ts", "m", "img")
    typo = copy.deepcopy(job)
    typo["spec"]["pytorchReplicaSpec"] = typo["spec"].pop("pytorchReplicaSpecs")
    assert any("pytorchReplicaSpec" in e for e in _errors(validator, typo))
    as_text = copy.deepcopy(job)
    as_text["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    assert any(e.startswith("spec.pytorchReplicaSpecs.Worker.replicas") for e in _errors(validator, as_text))
    nameless = copy.deepcopy(job)
    del nameless["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    assert any("'name' is a required property" in e for e in _errors(validator, nameless))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes of training, or ML-100K through Feast: minutes on 2 cores
def test_the_pods_train_together_with_the_environment_the_operator_gives_them(tiny_training_set, tmp_path) -> None:
    """The Master and Worker commands of the manifest, run here as two processes with MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE and RANK set (env:// rendezvous, no torchrun): rank 0 alone writes the model and prints."""
    volume = tmp_path / "volume"
    shutil.copytree(tiny_training_set, volume / "ts")
    tiny = {"train.epochs": 1, "train.batch_size": 256, "train.threads": 1, "train.progress": False,
            "train.embedding_dim": 4, "models.dcnv2": {"cross_layers": 1, "mlp": [8]}, "pytorchjob.mount_path": str(volume)}  # fmt: skip
    config_map, job = pytorchjob_manifests(_params(**tiny), "ts", "model", "img")
    params_dir = tmp_path / "etc"
    params_dir.mkdir()
    (params_dir / "params.yaml").write_text(config_map["data"]["params.yaml"])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2"}  # fmt: skip
    procs = []
    for rank, role in enumerate(("Master", "Worker")):
        command = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]["command"]
        command = [sys.executable if c == "python" else c.replace(PARAMS_DIR, str(params_dir)) for c in command]
        procs.append(subprocess.Popen(command, env={**env, "RANK": str(rank)}, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "rank 0 of 2" in outputs[0][1] and outputs[1][0] == ""  # the worker joined and printed nothing
    printed = json.loads(outputs[0][0])
    assert printed["model_dir"] == str(volume / "model") and (volume / "model" / "model.pt").exists()
    assert printed["valid_auc"] is not None
