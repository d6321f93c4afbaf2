"""DGenCTR CTR fine-tuning from the pre-trained checkpoint artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finetune_model(params: dict, training_set: Input[Dataset], pretrained: Input[Model], model: Output[Model], metrics: Output[Metrics]) -> float:
    """Returns the validation AUC."""
    from ctrflow.config import from_struct
    from ctrflow.steps import finetune_step

    params = from_struct(params)
    result = finetune_step(params, training_set.path, pretrained.path, model.path)
    model.metadata.update({"model": result["model"], "valid_auc": result["valid_auc"], "test_auc": result["test_auc"]})
    for split in ("valid", "test"):
        for key in ("auc", "logloss", "gauc"):
            value = result["metrics"][split].get(key)
            if value is not None:
                metrics.log_metric(f"{split}_{key}", float(value))
    return float(result["valid_auc"])
