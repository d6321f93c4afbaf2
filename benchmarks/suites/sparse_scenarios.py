"""Two sparse-scenario protocols (issue 12, point 3), SharedBottom, MMoE, PLE and STAR with the Scenario-Wise Rec
settings of `benchmarks.suites.scenario_wise_rec` (fields, sizes, BatchNorm1d as its `published` variant, batch
4096, Adam lr 1e-3, weight decay 1e-5, StepLR, patience 4), reported per scenario:

    python -m benchmarks.quality --suite sparse_scenarios --dataset ml-1m-swr --splits random --seeds 0 --epochs 30
    python -m benchmarks.quality --suite sparse_scenarios --dataset ml-cross --splits random --seeds 0 --epochs 30

(a) protocol `sparse-scenario` on `--dataset ml-1m-swr`: the ml-1m-swr data and its random 8:1:1 split (split seed
    0), then the <25 scenario (ages {1, 18}) down-sampled to 10% of its TRAINING rows. The rule
    (`ctrflow.models.blocks.scenario.downsample_scenario`, settings from params.yaml `sparse_scenario`: scenario
    "<25", keep 0.1, seed 0): keep max(1, round(keep x n)) of the scenario's n training rows, drawn uniformly without
    replacement by numpy's default_rng(seed); every other training row is kept, row order is preserved, and the
    validation and test splits are untouched (so the <25 test AUC is measured on as many rows as in the published
    protocol). The sample is the same for every model and seed: seeds vary the models only.
(b) protocol `two-platform` on `--dataset ml-cross` (`ctrflow.data.movielens_cross`): ML-1M users and ML-100K users
    as the scenarios "ml-1m" and "ml-100k" over one title vocabulary, a real ~10:1 sparse scenario (ml-100k), all
    rows, the same random 8:1:1 split rule (split seed 0).

Records name the sparse scenario in `sparse_scenario` and carry `scenario_train_rows` (training rows per scenario
after any down-sampling); quality.md prints the per-scenario test AUC columns and those row counts.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import numpy as np
import torch

from benchmarks.harness import BenchContext, Experiment, train_and_evaluate
from benchmarks.suites.gsvr import _train_tensors, sparse_settings
from benchmarks.suites.scenario_wise_rec import COMMON, SIZES, TRAIN
from ctrflow.config import load_params
from ctrflow.models import build_model
from ctrflow.training.recipe import model_params

# dataset -> the protocol run on it
PROTOCOL_OF = {"ml-1m-swr": "sparse-scenario", "ml-cross": "two-platform"}
CROSS_SPARSE = "ml-100k"  # the platform with ~1/10 of the rows
VARIANT = "published"  # the Scenario-Wise Rec settings, BatchNorm1d in the MLPs but STAR's (as scenario_wise_rec)


def scenario_rows(tensors: dict[str, torch.Tensor], ctx: BenchContext) -> dict[str, int]:
    """Rows per scenario name of a split's tensors (the encoder's scenario vocabulary; id 0 = unseen)."""
    field = ctx.encoder.spec.scenario_field
    vocab = [str(v) for v in ctx.encoder.vocabs[field]]
    counts = np.bincount(tensors[field].cpu().numpy(), minlength=len(vocab) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(vocab)}


def sparse_experiment(name: str, dataset: str, settings: dict[str, Any]) -> Experiment:
    protocol = PROTOCOL_OF[dataset]

    def run(ctx: BenchContext, seed: int) -> dict[str, Any]:
        if ctx.dataset.name != dataset:
            raise SystemExit(f"suite sparse_scenarios: protocol {protocol} runs on --dataset {dataset}, not {ctx.dataset.name}")
        overrides = {**COMMON, **SIZES[name], **({} if name == "star" else {"batch_norm": True})}
        params = model_params(load_params(), name, **overrides)
        train = _train_tensors(ctx, "sparse-scenario", settings) if protocol == "sparse-scenario" else None
        record = train_and_evaluate(ctx, lambda: build_model(name, ctx.encoder, params), seed, train=train, **TRAIN)
        record["scenario_train_rows"] = scenario_rows(train if train is not None else ctx.tensors["train"], ctx)
        return record

    extra: dict[str, Any] = {"sparse_scenario": settings["scenario"] if protocol == "sparse-scenario" else CROSS_SPARSE}
    if protocol == "sparse-scenario":
        extra.update({"sparse_keep": settings["keep"], "sparse_seed": settings["seed"]})
    return Experiment(model=name, variant=VARIANT, run=run, protocol=protocol, extra=extra)


def experiments(args: Namespace) -> list[Experiment]:
    """The four models under the protocol of `args.dataset` (ml-1m-swr: sparse-scenario; ml-cross: two-platform);
    none on other datasets (so `--suite all` still runs there)."""
    dataset = getattr(args, "dataset", None)
    if dataset not in PROTOCOL_OF:
        return []
    settings = sparse_settings(dataset)
    return [sparse_experiment(name, dataset, settings) for name in SIZES]
