"""Register the model in the BentoML store as a candidate and run the promotion gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register_model(params: dict, model: Input[Model], dataset: Input[Dataset]) -> NamedTuple("RegisterOutputs", [("tag", str), ("gate_passed", bool), ("reasons", str)]):
    from collections import namedtuple

    from ctrflow.steps import register_step

    result = register_step(params, model.path, dataset.path)
    outputs = namedtuple("RegisterOutputs", ["tag", "gate_passed", "reasons"])
    return outputs(result["tag"], result["gate_passed"], "; ".join(result["reasons"]))
