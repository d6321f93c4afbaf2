"""DGenCTR diffusion pre-training; the checkpoint is passed on as a Model artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain_model(params: dict, training_set: Input[Dataset], pretrained: Output[Model]) -> str:
    """Returns the checkpoint path (pretrained.pt beside the encoder it was fitted with)."""
    from ctrflow.config import validate_params
    from ctrflow.steps import pretrain_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = pretrain_step(params, training_set.path, pretrained.path)
    pretrained.metadata["framework"] = "ctrflow-dgenctr-pretrain"
    return result["checkpoint"]
