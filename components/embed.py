"""Per-item modality embeddings (text, knowledge graph, user-provided) added to the dataset as features."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def embed_items(params: dict, dataset: Input[Dataset], embedded: Output[Dataset]) -> str:
    """Returns the modalities added, as JSON."""
    import json

    from ctrflow.config import validate_params
    from ctrflow.steps import embed_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    result = embed_step(params, dataset.path, embedded.path)
    embedded.metadata["modalities"] = result["modalities"]
    return json.dumps(result["modalities"])
