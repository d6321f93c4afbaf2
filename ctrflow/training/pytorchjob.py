"""The training step as a Kubeflow PyTorchJob (kubeflow.org/v1): the manifests `ctrflow pytorchjob` writes.

    docs = pytorchjob_manifests(params, training_set="ts", out="model", image="registry/ctrflow:0.1.0")
    to_yaml(docs)                 # a ConfigMap with params.yaml, then the PyTorchJob; `kubectl apply -f -`

The job runs `python -m ctrflow.cli --params <ConfigMap> train --training-set ... --out ...` in `pytorchjob.replicas`
pods (a Master and replicas - 1 Workers, one process each). The training operator gives every pod MASTER_ADDR,
MASTER_PORT, WORLD_SIZE and RANK; the CLI joins the process group from them (train.backend) and the one Trainer
trains data-parallel (ctrflow.training.distributed), exactly as under `torchrun` on one machine. Every pod mounts
the PersistentVolumeClaim `pytorchjob.volume_claim` at `pytorchjob.mount_path`; `training_set` and `out` are paths
relative to it. Every rank reads the training set; only rank 0 writes the checkpoints and the artifact, so a
restarted job resumes from `<out>/checkpoints`.

In a Kubeflow pipeline (`pipeline.launcher: pytorchjob`) the component `train_pytorchjob` runs `run_pytorchjob`: it
copies its input training set into the volume, creates the ConfigMap and the PyTorchJob through the Kubernetes API,
reads the job's status conditions until Succeeded or Failed, and copies the model back out as its output artifact.

The manifest is checked against the CRD's published OpenAPI schema in tests/test_pytorchjob.py (schema vendored
from kubeflow/training-operator v1.9.0), and `run_pytorchjob` against a fake API server through the real
`kubernetes` client. Source: Kubeflow Training Operator, PyTorchJob API (v1); its JobCondition types (Created,
Running, Restarting, Succeeded, Failed) and reasons.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ctrflow.config import PyTorchJobParams, typed

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "pytorch"  # the operator finds the training container by this name
PARAMS_DIR = "/etc/ctrflow"
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes object names (RFC 1123 label)
RUNS_DIR = "ctrflow-runs"  # run_pytorchjob's folders in the volume: <mount_path>/ctrflow-runs/<job name>/
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # a pod's own namespace

log = logging.getLogger(__name__)


def pytorchjob_manifests(
    params: Mapping[str, Any],
    training_set: str,
    out: str,
    image: str,
    name: str = "ctrflow-train",
    model: str | None = None,
) -> list[dict[str, Any]]:
    """[ConfigMap holding `params` as params.yaml, PyTorchJob] for `ctrflow train` data-parallel in a cluster.

    training_set / out: paths inside the volume (relative; absolute paths are taken as they are). model: the model
    to train (default train.model). Raises ValueError for a name that is not a DNS-1123 label of at most 52
    characters (the operator appends -master-0 / -worker-N to it).
    """
    job = typed(PyTorchJobParams, params.get("pytorchjob"), "pytorchjob")
    if len(name) > 52 or not _DNS_1123.match(name):
        raise ValueError(f"pytorchjob name '{name}': lower-case letters, digits and '-' only, at most 52 characters")
    data = posixpath.join(job.mount_path, training_set)
    output = posixpath.join(job.mount_path, out)
    command = ["python", "-m", "ctrflow.cli", "--params", f"{PARAMS_DIR}/params.yaml", "train",
               "--training-set", data, "--out", output]  # fmt: skip
    if model:
        command += ["--model", model]
    labels = {"app.kubernetes.io/name": "ctrflow", "app.kubernetes.io/component": "train"}
    resources = {"cpu": job.cpu, "memory": job.memory}
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "containers": [
                {
                    "name": CONTAINER,
                    "image": image,
                    "command": command,
                    "env": [{"name": "OMP_NUM_THREADS", "value": str(params["train"]["threads"])}],
                    "resources": {"requests": resources, "limits": resources},
                    "volumeMounts": [
                        {"name": "data", "mountPath": job.mount_path},
                        {"name": "params", "mountPath": PARAMS_DIR, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": job.volume_claim}},
                {"name": "params", "configMap": {"name": f"{name}-params"}},
            ],
        },
    }
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if job.replicas > 1:
        replicas["Worker"] = {"replicas": job.replicas - 1, "restartPolicy": "OnFailure", "template": pod}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-params", "namespace": job.namespace, "labels": labels},
        "data": {"params.yaml": yaml.safe_dump(dict(params), sort_keys=False)},
    }
    pytorch_job = {
        "apiVersion": API_VERSION,
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": job.namespace, "labels": labels},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
            "pytorchReplicaSpecs": replicas,
        },
    }
    return [config_map, pytorch_job]


class _Dumper(yaml.SafeDumper):
    """Readable manifests: multi-line strings (the params file) as literal blocks, no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """The manifests as one multi-document YAML (what `kubectl apply -f` reads)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


# ---- the pipeline's launcher: create the job, wait for its conditions, collect the model ---------------------------
class PyTorchJobError(RuntimeError):
    """The PyTorchJob could not be created, failed, or did not finish in time; the message names the job."""


def api_client() -> Any:
    """A `kubernetes.client.ApiClient`: the pod's service account inside a cluster, else $KUBECONFIG (or
    ~/.kube/config) outside one. Raises kubernetes.config.ConfigException when neither is there."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        # $KUBECONFIG read now: the client reads it once, when it is imported
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


def job_state(job: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(finished condition type or None, reason, message) of a PyTorchJob object. The training operator marks the
    end with a condition of type Succeeded or Failed and status "True" (kubeflow.org/v1 JobCondition); while running,
    the latest condition (Created, Running, Restarting) is returned with None."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for kind in ("Failed", "Succeeded"):  # a failed job may carry an older Succeeded=False: Failed decides
        for c in conditions:
            if c.get("type") == kind and str(c.get("status")) == "True":
                return kind, c.get("reason") or "", c.get("message") or ""
    last = conditions[-1] if conditions else {}
    return None, last.get("type") or "Pending", last.get("message") or ""


def _api_error(exc: Any, doing: str) -> PyTorchJobError:
    try:
        detail = json.loads(exc.body).get("message") or exc.body
    except (TypeError, ValueError, AttributeError):
        detail = getattr(exc, "body", "") or ""
    hint = {
        403: " (the pipeline's service account needs create/get/delete on pytorchjobs.kubeflow.org and create on configmaps)",
        404: " (is the Kubeflow training operator, with its PyTorchJob CRD, installed?)",
    }.get(exc.status, "")
    return PyTorchJobError(f"{doing}: HTTP {exc.status} {exc.reason}: {detail}{hint}")


def run_pytorchjob(
    params: Mapping[str, Any],
    training_set: str | Path,
    out: str | Path,
    image: str,
    model: str | None = None,
    name: str | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Train `training_set` into `out` as a PyTorchJob on the cluster; returns what `ctrflow.steps.train_step`
    returns ({"model", "model_dir", "valid_auc", "test_auc", "metrics"}) plus {"job": "<namespace>/<name>"}.

    The volume `pytorchjob.volume_claim` must be mounted here at `pytorchjob.mount_path` (the pipeline mounts it on
    the component): the training set is copied to `<mount_path>/ctrflow-runs/<name>/training_set`, the pods write
    `.../model`, which is copied to `out` once the job has Succeeded; the run's folder is then removed. `name`:
    default ctrflow-train-<8 hex> (one job per call). Polls every `pytorchjob.poll_s` seconds. Raises
    PyTorchJobError with the operator's reason and message when the job Failed, when the API refuses an object
    (HTTP status, the server's message; a 5xx while waiting is read again), or after `pytorchjob.timeout_s` (the job
    is then deleted); FileNotFoundError
    when the volume is not mounted.
    """
    from kubernetes import client as k8s

    job = typed(PyTorchJobParams, params.get("pytorchjob"), "pytorchjob")
    name = name or f"ctrflow-train-{uuid.uuid4().hex[:8]}"
    volume = Path(job.mount_path)
    if not volume.is_dir():
        raise FileNotFoundError(
            f"pytorchjob.mount_path {volume} is not a folder here: mount the PersistentVolumeClaim "
            f"'{job.volume_claim}' there (the training pipeline does, with kfp-kubernetes)"
        )
    if SA_NAMESPACE.exists() and SA_NAMESPACE.read_text().strip() != job.namespace:
        raise PyTorchJobError(
            f"pytorchjob.namespace '{job.namespace}' is not this pod's namespace '{SA_NAMESPACE.read_text().strip()}': "
            f"the job's pods must mount the same PersistentVolumeClaim '{job.volume_claim}' (claims are namespaced)"
        )
    run_dir = posixpath.join(RUNS_DIR, name)
    shutil.copytree(training_set, volume / run_dir / "training_set")
    config_map, pytorch_job = pytorchjob_manifests(params, f"{run_dir}/training_set", f"{run_dir}/model", image, name, model)
    api = client or api_client()
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    ns, what = job.namespace, f"PyTorchJob {job.namespace}/{name}"
    try:
        core.create_namespaced_config_map(ns, config_map)
    except k8s.ApiException as exc:
        raise _api_error(exc, f"creating ConfigMap {ns}/{config_map['metadata']['name']}") from None
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorch_job)
    except k8s.ApiException as exc:
        raise _api_error(exc, f"creating {what}") from None
    log.info("created %s (%d pods, image %s)", what, job.replicas, image)

    deadline = time.monotonic() + job.timeout_s
    seen = None
    while True:
        try:
            current = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except k8s.ApiException as exc:
            if exc.status is None or exc.status < 500:
                raise _api_error(exc, f"reading {what}") from None
            # an API server restarting must not end a day-long job's wait: read again until the deadline
            log.warning("reading %s: HTTP %s %s; reading again", what, exc.status, exc.reason)
            current = {"status": {"conditions": [{"type": seen[1] if seen else "Pending", "message": "status unread"}]}}
        finished, reason, message = job_state(current)
        if (finished, reason) != seen:
            seen = (finished, reason)
            log.info("%s: %s %s", what, finished or reason, message)
        if finished == "Failed":
            raise PyTorchJobError(f"{what} failed: {reason}: {message} (pods' logs: kubectl logs -n {ns} {name}-master-0)")
        if finished == "Succeeded":
            break
        if time.monotonic() > deadline:
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            except k8s.ApiException as exc:
                log.warning("could not delete %s: HTTP %s %s", what, exc.status, exc.reason)
            raise PyTorchJobError(f"{what} did not finish within pytorchjob.timeout_s = {job.timeout_s:g} s (last: {reason} {message}); deleted it")
        time.sleep(job.poll_s)

    produced = volume / run_dir / "model"
    if not (produced / "metrics.json").exists():
        raise PyTorchJobError(f"{what} succeeded but wrote no model to {produced} (metrics.json missing)")
    shutil.copytree(produced, out, dirs_exist_ok=True)
    shutil.rmtree(volume / run_dir, ignore_errors=True)
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    trained = json.loads((Path(out) / "model.json").read_text())["name"]
    return {
        "model": trained,
        "model_dir": str(out),
        "valid_auc": (metrics.get("valid") or {}).get("auc"),
        "test_auc": (metrics.get("test") or {}).get("auc"),
        "metrics": metrics,
        "job": f"{ns}/{name}",
    }
