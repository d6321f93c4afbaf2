"""Building blocks the models are made of, apart from the models themselves (one model per file in ctrflow/models/).

- `embedding`: `FieldEmbedding` (every field of the spec), `load_embedding_init` (pre-trained tables in);
- `mlp`: `MLP`;
- `attention`: `TargetAttention` (DIN), `SelfAttention`;
- `scenario`: scenario checks, `route`, `ScenarioTowers`, `downsample_scenario` (the sparse-scenario protocol);
- `modality`: `ItemModalityTable`, `bucket_histogram` (DMAE and its baselines);
- `variational`: Gaussian / mixture KL terms (GSVR).

The base classes of the model families (`MultiScenarioModel`, `MultimodalBase`) live in `ctrflow.models.base`.
"""

from __future__ import annotations

from ctrflow.models.blocks.attention import SelfAttention, TargetAttention
from ctrflow.models.blocks.embedding import FieldEmbedding, load_embedding_init, read_state_dict
from ctrflow.models.blocks.mlp import MLP
from ctrflow.models.blocks.modality import ItemModalityTable, bucket_histogram, normalise, resolve_modalities
from ctrflow.models.blocks.scenario import (
    ScenarioTowers,
    UnseenScenarioError,
    check_scenarios,
    check_training_scenarios,
    downsample_scenario,
    module_params,
    route,
    scenario_counts,
    scenario_slots,
)
from ctrflow.models.blocks.variational import (
    gaussian_kl,
    gaussian_log_prob,
    mc_mixture_kl,
    mixture_log_prob,
    mixture_moments,
)

__all__ = [
    "MLP",
    "FieldEmbedding",
    "ItemModalityTable",
    "ScenarioTowers",
    "SelfAttention",
    "TargetAttention",
    "UnseenScenarioError",
    "bucket_histogram",
    "check_scenarios",
    "check_training_scenarios",
    "downsample_scenario",
    "gaussian_kl",
    "gaussian_log_prob",
    "load_embedding_init",
    "mc_mixture_kl",
    "mixture_log_prob",
    "mixture_moments",
    "module_params",
    "normalise",
    "read_state_dict",
    "resolve_modalities",
    "route",
    "scenario_counts",
    "scenario_slots",
]
