"""The promotion gate: decides whether the registered candidate may replace production."""

from kfp import dsl
from kfp.dsl import Dataset, Input

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promotion_gate(params: dict, tag: str, training_set: Input[Dataset]) -> bool:
    """Returns whether the gate passed (its reasons and every compared model's metrics are in the log and the
    registry's stage ledger). The reference model (gate.reference_model) is trained here, on the same training set.

    A single bool output on purpose: the KFP local runner resolves `dsl.If` conditions only on a task's
    single `Output`, not on named NamedTuple outputs (kfp 2.17).
    """
    from ctrflow.config import validate_params
    from ctrflow.steps import gate_step

    params = validate_params(params, "pipeline params")  # typed: undoes the struct round trip (50.0 -> 50)
    return bool(gate_step(params, tag, training_set.path)["gate_passed"])
