"""Feast: feature tables, apply, the point-in-time training set, and online materialisation."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def build_features(params: dict, dataset: Input[Dataset], feature_repo: str, training_set: Output[Dataset]) -> str:
    """Returns the applied Feast repo path (the online store is a side effect: never cache this step)."""
    from ctrflow.config import validate_params
    from ctrflow.steps import features_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = features_step(params, dataset.path, feature_repo, training_set.path)
    training_set.metadata.update({"rows": result["rows"], "splits": result["splits"]})
    return result["feature_repo"]
