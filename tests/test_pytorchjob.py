"""The training step as a Kubeflow PyTorchJob: `ctrflow pytorchjob` against the CRD's published schema; the
pipeline's `train_pytorchjob` component through the real `kubernetes` client against a fake API server
(tests/fake_kube_server.py: no cluster runs here), its success, failure and timeout; the pods' command run here with
the environment the training operator gives them; and the compiled pipeline with `pipeline.launcher: pytorchjob`.

The schema is the `openAPIV3Schema` of PyTorchJob v1 in kubeflow/training-operator v1.9.0
(tests/fixtures/kubeflow/, Apache-2.0), made strict as the API server's strict field validation is: a field the
schema does not name is an error (the server would otherwise drop it silently).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from fake_kube_server import FakeKubeServer
from google.protobuf import json_format, struct_pb2
from kfp.dsl import Dataset, Metrics, Model

import components
from ctrflow.cli import cli
from ctrflow.config import REPO_ROOT, load_params, merge, to_struct
from ctrflow.training.pytorchjob import PARAMS_DIR, RUNS_DIR, PyTorchJobError, pytorchjob_manifests

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


# ---- the pipeline's launcher: components.train_pytorchjob against a fake API server --------------------------
TINY = {"train.epochs": 1, "train.batch_size": 256, "train.threads": 1, "train.progress": False, "train.embedding_dim": 4,
        "models.dcnv2": {"cross_layers": 1, "mlp": [8]}, "pytorchjob.poll_s": 0.05}  # fmt: skip


def _as_kfp_struct(params: dict) -> dict:
    """What a component receives: params through KFP's protobuf Struct (ints come back as floats)."""
    s = struct_pb2.Struct()
    s.update(to_struct(params))
    return json_format.MessageToDict(s)


@pytest.fixture()
def kube(validator, tmp_path, monkeypatch):
    """start(operator=..., crd_installed=...): a fake API server that validates PyTorchJobs against the strict CRD
    schema, named by $KUBECONFIG (what the component's client reads outside a cluster)."""
    servers = []

    def start(operator=None, crd_installed=True, unavailable_reads=0) -> FakeKubeServer:
        server = FakeKubeServer(validate=lambda body: _errors(validator, body), operator=operator, crd_installed=crd_installed,
                                unavailable_reads=unavailable_reads).start()  # fmt: skip
        servers.append(server)
        (tmp_path / "kubeconfig").write_text(server.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        return server

    yield start
    for server in servers:
        server.stop()


def _train(tmp_path: Path, training_set: Path, **overrides: object) -> tuple[float, Model, Metrics]:
    volume = tmp_path / "volume"
    volume.mkdir(exist_ok=True)
    params = _as_kfp_struct(_params(**{**TINY, "pytorchjob.mount_path": str(volume), **overrides}))
    model, metrics = Model(uri=str(tmp_path / "out" / "model")), Metrics(uri=str(tmp_path / "out" / "metrics"))
    auc = components.train_pytorchjob.python_func(params=params, training_set=Dataset(uri=str(training_set)), model=model,
                                                  metrics=metrics, image="registry.example/ctrflow:1")  # fmt: skip
    return auc, model, metrics


def _fails_like_the_operator(server: FakeKubeServer, job: dict) -> None:
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    server.set_condition(ns, name, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
    server.set_condition(ns, name, "Running", "PyTorchJobRunning", f"PyTorchJob {ns}/{name} is running.")
    server.set_condition(ns, name, "Failed", "PyTorchJobFailed", f"PyTorchJob {ns}/{name} is failed because 1 Master replica(s) failed.")


def test_the_component_creates_a_valid_job_and_stops_with_the_operators_reason(kube, validator, tiny_training_set, tmp_path) -> None:
    server = kube(operator=_fails_like_the_operator, unavailable_reads=2)  # two reads answered 503: read again
    with pytest.raises(PyTorchJobError, match=r"failed: PyTorchJobFailed: PyTorchJob kubeflow/ctrflow-train-[0-9a-f]{8} is failed because 1 Master replica"):
        _train(tmp_path, tiny_training_set)
    calls = [(r.method, r.path, r.status) for r in server.requests]
    ((ns, name),) = server.jobs
    assert calls[:2] == [("POST", "/api/v1/namespaces/kubeflow/configmaps", 201), ("POST", "/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs", 201)]
    assert {c[:2] for c in calls[2:]} == {("GET", f"/apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs/{name}")}
    assert [c[2] for c in calls[2:5]] == [503, 503, 200]
    job = server.requests[1].body
    assert _errors(validator, job) == []  # what the API server received, against the published schema
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/ctrflow:1"
    run_dir = tmp_path / "volume" / RUNS_DIR / name
    assert container["command"][-4:] == ["--training-set", str(run_dir / "training_set"), "--out", str(run_dir / "model")]
    # the input artifact is staged in the volume for the pods; on failure it stays there for a look
    assert sorted(p.name for p in (run_dir / "training_set").iterdir()) == sorted(p.name for p in tiny_training_set.iterdir())
    config_map = server.configmaps[(ns, f"{name}-params")]
    assert yaml.safe_load(config_map["data"]["params.yaml"])["train"]["epochs"] == 1  # typed again, not 1.0
    assert not (tmp_path / "out" / "model").exists()


def test_a_job_that_never_finishes_is_deleted_and_an_api_without_the_crd_is_named(kube, tiny_training_set, tmp_path) -> None:
    def created_only(server: FakeKubeServer, job: dict) -> None:
        server.set_condition(job["metadata"]["namespace"], job["metadata"]["name"], "Created", "PyTorchJobCreated")

    server = kube(operator=created_only)
    with pytest.raises(PyTorchJobError, match=r"did not finish within pytorchjob.timeout_s = 0.3 s \(last: Created"):
        _train(tmp_path, tiny_training_set, **{"pytorchjob.timeout_s": 0.3})
    assert server.requests[-1].method == "DELETE" and server.requests[-1].status == 200 and not server.jobs

    kube(crd_installed=False)
    with pytest.raises(PyTorchJobError, match=r"creating PyTorchJob kubeflow/ctrflow-train-\w+: HTTP 404 .*training operator"):
        _train(tmp_path, tiny_training_set)

    with pytest.raises(FileNotFoundError, match="pytorchjob.mount_path .*nowhere.* PersistentVolumeClaim 'ctrflow-data'"):
        _train(tmp_path, tiny_training_set, **{"pytorchjob.mount_path": str(tmp_path / "nowhere")})


def _operator_running_the_pods(logs: dict, params_dir: Path, cwd: Path):
    """The training operator, here: each replica's command as a process with the environment the operator gives
    (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK; env:// rendezvous, no torchrun) and the job's ConfigMap at
    PARAMS_DIR; Succeeded when every pod exits 0, else Failed, with the operator's reasons and messages."""

    def operate(server: FakeKubeServer, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        server.set_condition(ns, name, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
        params_dir.mkdir(parents=True, exist_ok=True)
        (params_dir / "params.yaml").write_text(server.configmaps[(ns, f"{name}-params")]["data"]["params.yaml"])
        specs = job["spec"]["pytorchReplicaSpecs"]
        pods = [(f"{role.lower()}-{i}", specs[role]) for role in ("Master", "Worker") if role in specs for i in range(specs[role]["replicas"])]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(len(pods))}  # fmt: skip
        procs = []
        for rank, (pod, spec) in enumerate(pods):
            command = spec["template"]["spec"]["containers"][0]["command"]
            command = [sys.executable if c == "python" else c.replace(PARAMS_DIR, str(params_dir)) for c in command]
            procs.append((pod, subprocess.Popen(command, env={**env, "RANK": str(rank)}, cwd=cwd, text=True,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)))  # fmt: skip
        server.set_condition(ns, name, "Running", "PyTorchJobRunning", f"PyTorchJob {ns}/{name} is running.")
        for pod, p in procs:
            logs[pod] = (*p.communicate(timeout=600), p.returncode)
        failed = [pod for pod, (_, _, rc) in logs.items() if rc != 0]
        if failed:
            server.set_condition(ns, name, "Failed", "PyTorchJobFailed", f"PyTorchJob {ns}/{name} is failed because {len(failed)} replica(s) failed.")
        else:
            server.set_condition(ns, name, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {ns}/{name} is successfully completed.")

    return operate


@pytest.mark.slow  # two processes of training: a minute on 2 cores
def test_the_component_trains_through_the_job_and_publishes_the_model(kube, tiny_training_set, tmp_path) -> None:
    """Success end to end: the component stages the training set, the job's two pods (run here) train together from
    the ConfigMap's params, rank 0 alone writes the model and prints, and the component copies the model out,
    publishes its metrics and clears the run's folder in the volume."""
    logs: dict[str, tuple[str, str, int]] = {}
    server = kube(operator=_operator_running_the_pods(logs, tmp_path / "etc", tmp_path))
    auc, model, metrics = _train(tmp_path, tiny_training_set)
    assert sorted(logs) == ["master-0", "worker-0"] and all(rc == 0 for *_, rc in logs.values())
    assert "rank 0 of 2" in logs["master-0"][1] and logs["worker-0"][0] == ""  # the worker joined and printed nothing
    printed = json.loads(logs["master-0"][0])
    ((_, name),) = server.jobs
    assert printed["model_dir"] == str(tmp_path / "volume" / RUNS_DIR / name / "model")
    assert (Path(model.path) / "model.pt").exists() and json.loads((Path(model.path) / "model.json").read_text())["name"] == "dcnv2"
    assert auc == pytest.approx(printed["valid_auc"]) and 0.0 <= auc <= 1.0
    assert metrics.metadata["valid_auc"] == pytest.approx(auc) and model.metadata["pytorchjob"] == f"kubeflow/{name}"
    assert not (tmp_path / "volume" / RUNS_DIR / name).exists()


def test_the_compiled_pipeline_runs_the_train_step_as_a_pytorchjob_when_the_launcher_says_so(tmp_path) -> None:
    from pipelines.runner import compile_pipeline

    job = _params(**{"pipeline.launcher": "pytorchjob", "pytorchjob.volume_claim": "ctr-vol", "pytorchjob.mount_path": "/mnt/ctr"})
    spec, platform = yaml.safe_load_all(compile_pipeline("training", tmp_path / "job.yaml", "standard", job).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-pytorchjob" in tasks and "train-model" not in tasks
    assert tasks["register-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train-pytorchjob"
    assert "run_pytorchjob" in spec["deploymentSpec"]["executors"]["exec-train-pytorchjob"]["container"]["command"][-1]
    (mount,) = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-pytorchjob"]["pvcMount"]
    assert (mount["mountPath"], mount["pvcNameParameter"]["runtimeValue"]["constant"]) == ("/mnt/ctr", "ctr-vol")

    local = yaml.safe_load(compile_pipeline("training", tmp_path / "local.yaml", "standard", _params()).read_text())
    assert "train-model" in local["root"]["dag"]["tasks"] and "train-pytorchjob" not in local["root"]["dag"]["tasks"]
    dmae = next(yaml.safe_load_all(compile_pipeline("training", tmp_path / "dmae.yaml", "dmae", job).read_text()))["root"]["dag"]["tasks"]
    assert {"embed-items", "train-pytorchjob"} <= set(dmae) and "train-model" not in dmae
    with pytest.raises(ValueError, match="families standard and dmae, not 'gsvr'"):
        compile_pipeline("training", tmp_path / "g.yaml", "gsvr", job)

    # the CLI compiles what the params say
    out = tmp_path / "cli.yaml"
    result = CliRunner().invoke(cli, ["--set", "pipeline.launcher=pytorchjob", "pipeline", "compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train-pytorchjob" in next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
