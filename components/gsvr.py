"""Train the multi-scenario variational model (GSVR around a backbone)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_multiscenario(params: dict, training_set: Input[Dataset], model: Output[Model], metrics: Output[Metrics], init_from: str = "") -> float:
    """Returns the validation AUC; `init_from` optionally names diffusion-pretrained embeddings (a folder or file)."""
    from ctrflow.config import validate_params
    from ctrflow.publish import publish_training
    from ctrflow.steps import gsvr_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = gsvr_step(params, training_set.path, model.path, init_embeddings=init_from or None)
    return publish_training(result, model, metrics)
