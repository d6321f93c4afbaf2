"""Promote the gated model to production and record the deployment the service loads."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def deploy_model(params: dict, tag: str, feature_repo: str, deployment: Output[Artifact]) -> str:
    """Returns the production model tag."""
    from ctrflow.config import validate_params
    from ctrflow.steps import deploy_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = deploy_step(params, tag, feature_repo, deployment.path)
    deployment.metadata.update(result)
    return result["model_tag"]
