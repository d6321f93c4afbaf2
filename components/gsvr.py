"""Train the multi-scenario variational model (GSVR around a backbone)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train_multiscenario(params: dict, training_set: Input[Dataset], model: Output[Model], metrics: Output[Metrics], init_from: str = "") -> float:
    """Returns the validation AUC; `init_from` optionally names diffusion-pretrained embeddings (a folder or file)."""
    from ctrflow.config import from_struct
    from ctrflow.steps import gsvr_step

    params = from_struct(params)
    result = gsvr_step(params, training_set.path, model.path, init_embeddings=init_from or None)
    model.metadata.update({"model": result["model"], "valid_auc": result["valid_auc"], "test_auc": result["test_auc"]})
    for split in ("valid", "test"):
        for key in ("auc", "logloss", "gauc"):
            value = (result["metrics"].get(split) or {}).get(key)
            if value is not None:
                metrics.log_metric(f"{split}_{key}", float(value))
    return float(result["valid_auc"])
