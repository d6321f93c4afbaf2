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

The manifest is checked against the CRD's published OpenAPI schema in tests/test_pytorchjob.py (schema vendored
from kubeflow/training-operator v1.9.0). Source: Kubeflow Training Operator, PyTorchJob API (v1).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

import yaml

from ctrflow.config import PyTorchJobParams, typed

API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the operator finds the training container by this name
PARAMS_DIR = "/etc/ctrflow"
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes object names (RFC 1123 label)


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
