"""Train the configured model on the Feast training set; early stopping on validation AUC."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_model(params: dict, training_set: Input[Dataset], model: Output[Model], metrics: Output[Metrics], model_name: str = "") -> float:
    """Returns the validation AUC."""
    from ctrflow.config import from_struct
    from ctrflow.steps import train_step

    params = from_struct(params)
    result = train_step(params, training_set.path, model.path, model_name or None)
    model.metadata.update({"model": result["model"], "valid_auc": result["valid_auc"], "test_auc": result["test_auc"]})
    for split in ("valid", "test"):
        for key in ("auc", "logloss", "gauc"):
            value = result["metrics"][split].get(key)
            if value is not None:
                metrics.log_metric(f"{split}_{key}", float(value))
    return float(result["valid_auc"])
