"""The monitoring pipeline: an Evidently drift check of the request log against the training data."""


from kfp import dsl

from components import check_drift

PIPELINE_NAME = "ctrflow-monitoring"


@dsl.pipeline(name=PIPELINE_NAME, description="Drift of served requests against the training data.")
def monitoring_pipeline(params: dict, training_set_uri: str, model_uri: str, current: str, fail_on_breach: bool = True) -> None:
    training_set = dsl.importer(artifact_uri=training_set_uri, artifact_class=dsl.Dataset, reimport=False)
    model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False)
    drift = check_drift(
        params=params,
        training_set=training_set.output,
        model=model.output,
        current=current,
        fail_on_breach=fail_on_breach,
    )
    drift.set_display_name("drift (Evidently)").set_caching_options(False)
