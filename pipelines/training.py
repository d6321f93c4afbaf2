"""The training pipeline: validate → [embed items] → features → train → register → gate → (if passed) deploy.

The gate trains a reference model (gate.reference_model, a logistic regression by default) on the same training set
and compares the candidate with it and with the production model of the same data set; deploy checks that the model
fits the run's feature repository before promoting it.

One DAG per model family, chosen when the pipeline is built (`build_training_pipeline(family)`):
- `standard`: one training step for any registered model (`train.model` or the `model_name` argument; DCNv2 default)
- `dgenctr`: diffusion pre-training, then CTR fine-tuning; the checkpoint passes between them as an artifact
- `gsvr`: the multi-scenario variational model; `gsvr-pretrained` initialises its embeddings from diffusion
  pre-training
- `dmae`: item modality embeddings are computed and written to the feature store before the features step

The train step of `standard` and `dmae` runs in its own pod (`launcher="local"`, components.train) or, with
`pipeline.launcher: pytorchjob`, as a Kubeflow PyTorchJob that `train_pytorchjob` creates and waits for: the
PersistentVolumeClaim `pytorchjob.volume_claim` is mounted on that task at `pytorchjob.mount_path` (kfp-kubernetes),
the same volume the job's pods mount.

Side-effect steps (Feast materialisation, registry writes, the gate, deployment) are never cached; a failed
validation stops the run before anything is registered, and deploy runs only when the gate passes (`dsl.If`).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Model

from components import (
    BASE_IMAGE,
    build_features,
    deploy_model,
    embed_items,
    finetune_model,
    pretrain_model,
    promotion_gate,
    register_model,
    train_model,
    train_multiscenario,
    train_pytorchjob,
    validate_data,
)
from ctrflow.config import FAMILIES, section

PIPELINE_NAME = "ctrflow-training"


class TrainingOutputs(NamedTuple):
    training_set: Dataset
    model: Model
    tag: str
    gate_passed: bool


def build_training_pipeline(family: str = "standard", params: Mapping[str, Any] | None = None):  # noqa: ANN201 - a KFP pipeline object
    """The DAG of `family`; `params` (default: the defaults) choose its train step's launcher (pipeline.launcher)
    and, for a PyTorchJob, the volume mounted on that step (pytorchjob.volume_claim, mount_path) at compile time."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family '{family}': choose one of {FAMILIES}")
    launcher = section(params, "pipeline").launcher  # typed: one of ctrflow.config.LAUNCHERS
    if launcher == "pytorchjob" and family not in ("standard", "dmae"):
        raise ValueError(f"pipeline.launcher pytorchjob runs `ctrflow train`: families standard and dmae, not '{family}'")
    job = section(params, "pytorchjob")
    name = PIPELINE_NAME if family == "standard" else f"{PIPELINE_NAME}-{family}"
    default_model = "dmae" if family == "dmae" else ""

    @dsl.pipeline(name=name, description=f"Validate, build features, train ({family}), register and deploy a CTR model.")
    def training_pipeline(params: dict, feature_repo: str, model_name: str = default_model) -> TrainingOutputs:
        validated = validate_data(params=params).set_display_name("validate (Great Expectations)")
        dataset = validated.outputs["dataset"]
        if family == "dmae":
            embedded = embed_items(params=params, dataset=dataset).set_display_name("item modality embeddings")
            dataset = embedded.outputs["embedded"]

        features = build_features(params=params, dataset=dataset, feature_repo=feature_repo)
        features.set_display_name("features (Feast)").set_caching_options(False)
        training_set = features.outputs["training_set"]

        if family in ("dgenctr", "gsvr-pretrained"):
            pretrained = pretrain_model(params=params, training_set=training_set).set_display_name("pretrain (diffusion)")
        if family == "dgenctr":
            trained = finetune_model(params=params, training_set=training_set, pretrained=pretrained.outputs["pretrained"])
            trained.set_display_name("fine-tune")
        elif family == "gsvr":
            trained = train_multiscenario(params=params, training_set=training_set).set_display_name("train GSVR")
        elif family == "gsvr-pretrained":
            trained = train_multiscenario(params=params, training_set=training_set, init_from=pretrained.outputs["Output"])
            trained.set_display_name("train GSVR (pretrained embeddings)")
        elif launcher == "pytorchjob":
            from kfp import kubernetes

            trained = train_pytorchjob(params=params, training_set=training_set, model_name=model_name, image=BASE_IMAGE)
            trained.set_display_name(f"train (PyTorchJob, {job.replicas} pods)").set_caching_options(False)
            kubernetes.mount_pvc(trained, pvc_name=job.volume_claim, mount_path=job.mount_path)
        else:
            trained = train_model(params=params, training_set=training_set, model_name=model_name).set_display_name("train")

        registered = register_model(
            params=params, model=trained.outputs["model"], dataset=validated.outputs["dataset"], training_set=training_set
        )
        registered.set_display_name("register").set_caching_options(False)

        gate = promotion_gate(params=params, tag=registered.output, training_set=training_set)
        gate.set_display_name("promotion gate").set_caching_options(False)

        with dsl.If(gate.output == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            deployed = deploy_model(params=params, tag=registered.output, feature_repo=features.outputs["Output"])
            deployed.set_display_name("deploy").set_caching_options(False)

        return TrainingOutputs(training_set, trained.outputs["model"], registered.output, gate.output)

    return training_pipeline


training_pipeline = build_training_pipeline("standard")
