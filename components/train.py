"""Train the configured model on the Feast training set; early stopping on validation AUC."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_model(params: dict, training_set: Input[Dataset], model: Output[Model], metrics: Output[Metrics], model_name: str = "") -> float:
    """Returns the validation AUC."""
    from ctrflow.config import validate_params
    from ctrflow.publish import publish_training
    from ctrflow.steps import train_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = train_step(params, training_set.path, model.path, model_name or None)
    return publish_training(result, model, metrics)
