"""Register the model in the BentoML store as a candidate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register_model(params: dict, model: Input[Model], dataset: Input[Dataset], training_set: Input[Dataset]) -> str:
    """Returns the registered model's tag (recorded with its data set, features and item-side fingerprint)."""
    from ctrflow.config import validate_params
    from ctrflow.steps import register_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    return register_step(params, model.path, dataset.path, training_set.path)["tag"]
