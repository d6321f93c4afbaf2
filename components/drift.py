"""Evidently drift check: training data as reference, the request log (or a later slice) as current."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def check_drift(params: dict, training_set: Input[Dataset], model: Input[Model], current: str, drift_report: Output[dsl.HTML], fail_on_breach: bool = True) -> bool:
    """Returns whether drift crossed the thresholds; raises when it did and fail_on_breach is set."""
    import shutil
    import tempfile

    from ctrflow.config import validate_params
    from ctrflow.steps import drift_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    out_dir = tempfile.mkdtemp(prefix="ctrflow-drift-")
    result = drift_step(params, training_set.path, current, out_dir, model_dir=model.path)
    shutil.copyfile(result.html_path, drift_report.path)
    drift_report.metadata.update({"breached": result.breached, "reasons": list(result.reasons), "drifted_share": result.drifted_share})
    if result.breached and fail_on_breach:
        raise RuntimeError("drift crossed the thresholds in params.yaml: " + "; ".join(result.reasons))
    return bool(result.breached)
