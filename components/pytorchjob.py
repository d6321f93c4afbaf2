"""Train the configured model data-parallel as a Kubeflow PyTorchJob, from inside the pipeline (pipeline.launcher)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_pytorchjob(
    params: dict, training_set: Input[Dataset], model: Output[Model], metrics: Output[Metrics], model_name: str = "", image: str = BASE_IMAGE
) -> float:
    """Returns the validation AUC. Creates the PyTorchJob (`pytorchjob` section) through the Kubernetes API, waits
    for Succeeded / Failed and stops with the operator's reason when it failed; `image` runs the job's pods."""
    from ctrflow.config import validate_params
    from ctrflow.publish import publish_training
    from ctrflow.training.pytorchjob import run_pytorchjob

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = run_pytorchjob(params, training_set.path, model.path, image, model_name or None)
    model.metadata["pytorchjob"] = result["job"]
    return publish_training(result, model, metrics)
