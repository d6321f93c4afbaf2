"""DGenCTR CTR fine-tuning from the pre-trained checkpoint artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finetune_model(params: dict, training_set: Input[Dataset], pretrained: Input[Model], model: Output[Model], metrics: Output[Metrics]) -> float:
    """Returns the validation AUC."""
    from ctrflow.config import validate_params
    from ctrflow.publish import publish_training
    from ctrflow.steps import finetune_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = finetune_step(params, training_set.path, pretrained.path, model.path)
    return publish_training(result, model, metrics)
