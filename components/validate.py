"""Validate the raw data with Great Expectations; a failure stops the pipeline here."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate_data(params: dict, dataset: Output[Dataset], validation_report: Output[Artifact]) -> int:
    """Returns the number of validated interactions; raises (failing the run) on invalid data."""
    from ctrflow.config import validate_params
    from ctrflow.steps import validate_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = validate_step(params, dataset.path, validation_report.path)
    dataset.metadata.update({"rows": result["rows"], "source": result["dataset"]})
    validation_report.metadata["html"] = result["report_html"]
    return int(result["rows"])
