"""The baseline models in the shared framework (more are added as their files land in ctrflow/models/)."""

from __future__ import annotations

from argparse import Namespace

from benchmarks.harness import BenchContext, Experiment, train_and_evaluate
from ctrflow.config import load_params
from ctrflow.data.spec import FieldKind
from ctrflow.models import build_model, known_models
from ctrflow.training.recipe import model_params

BASELINES = ("lr", "deepfm", "dcnv2", "din")


def model_experiment(name: str, variant: str = "full", **overrides: object) -> Experiment:
    def run(ctx: BenchContext, seed: int) -> dict:
        params = model_params(load_params(), name, **overrides)
        return train_and_evaluate(ctx, lambda: build_model(name, ctx.encoder, params), seed)

    def not_applicable(ctx: BenchContext) -> str | None:
        if name != "din":
            return None
        field = model_params(load_params(), name, **overrides).get("sequence_field", "hist_item_ids")
        spec = ctx.encoder.spec
        if field in spec.names and spec[field].kind is FieldKind.SEQUENCE:
            return None
        return f"DIN attends over the behaviour sequence '{field}', which this dataset's spec does not have"

    return Experiment(model=name, variant=variant, run=run, not_applicable=not_applicable)


def experiments(args: Namespace) -> list[Experiment]:
    available = set(known_models())
    return [model_experiment(name) for name in BASELINES if name in available]
