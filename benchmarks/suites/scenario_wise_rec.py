"""The Scenario-Wise Rec reproduction rows (Li et al., KDD 2024, arXiv 2412.17374): SharedBottom, MMoE, PLE and STAR
on ML-1M with the benchmark's published protocol (`--dataset ml-1m-swr`).

Settings of its scripts/run_movielens_rank_multi_domain.py (read from the public repository): the fields of
`ctrflow.data.movielens_1m.scenario_wise_rec_spec` (the scenario routes the model but is not embedded as a feature:
the script's second, effective `get_movielens_data_rank_multidomain` leaves domain_indicator out of the sparse
features), embedding 16, batch 4096, Adam lr 1e-3, weight decay 1e-5, StepLR(step 2, gamma 0.85), early stopping
with patience 4 on validation AUC, random 8:1:1 split, no dropout (torch-rechub's MLP default), and these sizes:
STAR fcn [128, 64, 32] aux [32]; SharedBottom bottom [128] tower [8]; MMoE 3 experts [16] tower [8]; PLE one level,
2 specific + 1 shared experts [16], tower [8], every hidden Linear followed by BatchNorm1d (torch-rechub's MLP; the
`no-batchnorm` variant drops it). Our STAR is the paper's (partitioned normalisation, centre ⊙ scenario weights);
the script's STAR also batch-normalises and ReLUs its output logit, which we do not copy. Our models keep their shared fallback slot 0, untrained here
(scenario_dropout 0), which the scored rows never use.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from benchmarks.harness import REFERENCES, BenchContext, Experiment, train_and_evaluate
from ctrflow.config import load_params
from ctrflow.models import build_model
from ctrflow.training.recipe import model_params

PROTOCOL = "published"
FIELDS = ["user_id", "item_id", "gender", "occupation", "zip", "first_genre", "age"]  # the spec's fields but scenario
COMMON: dict[str, Any] = {"fields": FIELDS, "dropout": 0.0, "scenario_dropout": 0.0, "embedding_dim": 16}
SIZES: dict[str, dict[str, Any]] = {
    "sharedbottom": {"bottom": [128], "tower": [8]},
    "mmoe": {"experts": 3, "expert": [16], "tower": [8]},
    "ple": {"levels": 1, "specific_experts": 2, "shared_experts": 1, "expert": [16], "tower": [8]},
    "star": {"hidden": [128, 64, 32], "aux": [32]},
}
TRAIN: dict[str, Any] = {"batch_size": 4096, "lr": 1e-3, "weight_decay": 1e-5, "lr_step_size": 2, "lr_gamma": 0.85, "patience": 4}
PUBLISHED = REFERENCES[("ml-1m-swr", PROTOCOL)]["rows"]  # printed beside ours in quality.md


def published_experiment(name: str, variant: str = "published", **overrides: Any) -> Experiment:
    def run(ctx: BenchContext, seed: int) -> dict:
        if ctx.dataset.name != "ml-1m-swr":
            raise SystemExit(f"suite scenario_wise_rec: run it with --dataset ml-1m-swr, not {ctx.dataset.name}")
        params = model_params(load_params(), name, **{**COMMON, **SIZES[name], **overrides})
        return train_and_evaluate(ctx, lambda: build_model(name, ctx.encoder, params), seed, **TRAIN)

    return Experiment(model=name, variant=variant, run=run, protocol=PROTOCOL)


def experiments(args: Namespace) -> list[Experiment]:
    """`published`: the script's models, torch-rechub's BatchNorm1d after every hidden Linear included (STAR keeps
    its own partitioned normalisation); `no-batchnorm`: the same with our plain MLPs, the protocol detail both ways."""
    out = [published_experiment(name, batch_norm=True) if name != "star" else published_experiment(name) for name in SIZES]
    return out + [published_experiment(name, "no-batchnorm", batch_norm=False) for name in SIZES if name != "star"]
