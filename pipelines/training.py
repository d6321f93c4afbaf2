"""The training pipeline: validate → features → train → register → (gate) deploy.

Side-effect steps (Feast materialisation, registry writes, deployment) are never cached; a failed validation
stops the run before anything is registered, and deploy runs only when the gate passes (`dsl.If`).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Model

from components import build_features, deploy_model, promotion_gate, register_model, train_model, validate_data

PIPELINE_NAME = "ctrflow-training"


class TrainingOutputs(NamedTuple):
    training_set: Dataset
    model: Model
    tag: str
    gate_passed: bool


@dsl.pipeline(name=PIPELINE_NAME, description="Validate, build features, train, register and deploy a CTR model.")
def training_pipeline(
    params: dict, feature_repo: str, model_name: str = ""
) -> TrainingOutputs:
    validated = validate_data(params=params).set_display_name("validate (Great Expectations)")

    features = build_features(params=params, dataset=validated.outputs["dataset"], feature_repo=feature_repo)
    features.set_display_name("features (Feast)").set_caching_options(False)

    trained = train_model(params=params, training_set=features.outputs["training_set"], model_name=model_name)
    trained.set_display_name("train")

    registered = register_model(params=params, model=trained.outputs["model"], dataset=validated.outputs["dataset"])
    registered.set_display_name("register").set_caching_options(False)

    gate = promotion_gate(params=params, tag=registered.output)
    gate.set_display_name("promotion gate").set_caching_options(False)

    with dsl.If(gate.output == True, name="gate-passed"):  # noqa: E712 (KFP condition)
        deployed = deploy_model(params=params, tag=registered.output, feature_repo=features.outputs["Output"])
        deployed.set_display_name("deploy").set_caching_options(False)

    return TrainingOutputs(
        features.outputs["training_set"],
        trained.outputs["model"],
        registered.output,
        gate.output,
    )
