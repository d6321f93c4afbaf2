"""The monitoring pipeline's steps: Evidently drift, online quality from the label feed, and the retraining request.

Thin wrappers over `ctrflow.steps.drift_step`, `ctrflow.steps.quality_step` and `ctrflow.monitoring.loop.decide`;
the summaries travel between them as JSON artifacts.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def check_drift(params: dict, training_set: Input[Dataset], model: Input[Model], current: str, drift_report: Output[dsl.HTML], drift_summary: Output[Artifact], fail_on_breach: bool = False) -> str:
    """Returns the drift verdict (ok / breached / not_enough_data); raises on a breach when fail_on_breach is set."""
    import json
    import shutil
    import tempfile

    from ctrflow.config import validate_params
    from ctrflow.steps import drift_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    out_dir = tempfile.mkdtemp(prefix="ctrflow-drift-")
    result = drift_step(params, training_set.path, current, out_dir, model_dir=model.path)
    shutil.copyfile(result.html_path, drift_report.path)
    with open(drift_summary.path, "w") as fh:
        json.dump(result.to_dict(), fh, default=str)
    meta = {"verdict": result.verdict, "breached": result.breached, "reasons": list(result.reasons), "drifted_share": result.drifted_share}
    drift_report.metadata.update(meta)
    drift_summary.metadata.update(meta)
    if result.breached and fail_on_breach:
        raise RuntimeError("drift crossed the thresholds in params.yaml: " + "; ".join(result.reasons))
    return result.verdict


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def check_quality(params: dict, current: str, labels: str, quality_summary: Output[Artifact]) -> str:
    """Online quality of the request log against the label feed; returns its verdict ("skipped" without a feed)."""
    import json
    import tempfile

    from ctrflow.config import validate_params
    from ctrflow.steps import quality_step

    if not labels:
        with open(quality_summary.path, "w") as fh:
            json.dump({"verdict": "skipped"}, fh)
        quality_summary.metadata["verdict"] = "skipped"
        return "skipped"
    params = validate_params(params, "pipeline params")
    result = quality_step(params, current, labels, tempfile.mkdtemp(prefix="ctrflow-quality-"))
    with open(quality_summary.path, "w") as fh:
        json.dump(result.to_dict(), fh, default=str)
    quality_summary.metadata.update({"verdict": result.verdict, "reasons": list(result.reasons), "online_auc": result.overall.get("auc")})
    return result.verdict


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def request_retraining(params: dict, drift_summary: Input[Artifact], quality_summary: Input[Artifact], retraining_request: Output[Artifact], fail_on_breach: bool = True) -> str:
    """One verdict; on a breach the retraining request (and the training run, when params.yaml's monitoring section
    says so). Returns the verdict; raises after recording everything when breached and fail_on_breach is set."""
    import json
    import shutil
    import tempfile

    from ctrflow.config import validate_params
    from ctrflow.monitoring.loop import decide

    params = validate_params(params, "pipeline params")
    with open(drift_summary.path) as fh:
        drift = json.load(fh)
    with open(quality_summary.path) as fh:
        quality = json.load(fh)
    quality = None if quality.get("verdict") == "skipped" else quality
    inputs = {"drift_summary": drift_summary.uri, "quality_summary": quality_summary.uri}
    decision = decide(params, drift, quality, tempfile.mkdtemp(prefix="ctrflow-decide-"), inputs=inputs)
    if decision.request_path is not None:
        shutil.copyfile(decision.request_path, retraining_request.path)
    else:
        with open(retraining_request.path, "w") as fh:
            json.dump({"requested": False, "verdict": decision.verdict}, fh)
    retraining_request.metadata.update({"verdict": decision.verdict, "requested": decision.request_path is not None,
                                        "breached_scenarios": decision.breached_scenarios, "submitted": decision.submitted or {}})  # fmt: skip
    if decision.verdict == "breached" and fail_on_breach:
        raise RuntimeError("monitoring breached: " + "; ".join(decision.reasons))
    return decision.verdict
