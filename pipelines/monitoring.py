"""The monitoring pipeline: drift of served requests against the training data, online quality from the label
feed, and a retraining request (plus a submitted training run, when configured) on a breach.

Scheduled as a KFP recurring run (`pipelines.runner.schedule_monitoring`, `ctrflow monitor schedule`) on
`monitoring.schedule_cron`; `ctrflow monitor run` does the same locally.
"""

from kfp import dsl

from components import check_drift, check_quality, request_retraining

PIPELINE_NAME = "ctrflow-monitoring"


@dsl.pipeline(name=PIPELINE_NAME, description="Drift and online quality of served requests; a retraining request on a breach.")
def monitoring_pipeline(params: dict, training_set_uri: str, model_uri: str, current: str, labels: str = "", fail_on_breach: bool = True) -> None:
    training_set = dsl.importer(artifact_uri=training_set_uri, artifact_class=dsl.Dataset, reimport=False)
    model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False)
    drift = check_drift(params=params, training_set=training_set.output, model=model.output, current=current, fail_on_breach=False)
    drift.set_display_name("drift (Evidently)").set_caching_options(False)
    quality = check_quality(params=params, current=current, labels=labels)
    quality.set_display_name("online quality").set_caching_options(False)
    decision = request_retraining(
        params=params,
        drift_summary=drift.outputs["drift_summary"],
        quality_summary=quality.outputs["quality_summary"],
        fail_on_breach=fail_on_breach,
    )
    decision.set_display_name("retraining request").set_caching_options(False)
