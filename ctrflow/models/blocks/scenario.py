"""Scenario blocks (the multi-scenario backbones and GSVR): scenario checks, routing, per-scenario towers, and the
sparse-scenario protocol.

Scenario slots. The scenario field is encoded like any categorical field: id k in 1..S is the k-th scenario of the
encoder's vocabulary (fitted on the train split) and id 0 is "unknown". A multi-scenario model keeps one set of
scenario-specific parameters per slot 1..S and a **shared** slot 0, the fallback for a scenario never seen in
training (see `ctrflow.models.base.MultiScenarioModel`).

Checks. A scenario the data holds but the feature spec does not declare, or a declared scenario the user asked to
model (`scenarios`) that the train split lacks, is an `UnseenScenarioError` naming the scenario and its row count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FeatureSpec
from ctrflow.models.blocks.mlp import MLP


class UnseenScenarioError(ValueError):
    """Training data and the scenarios the spec declares (or the user asked for) disagree."""


# ---- scenario checks ------------------------------------------------------------------------------------------
def scenario_counts(encoder: FeatureEncoder, scenario_ids: object | None = None) -> dict[str, int | None]:
    """Rows per scenario name of the encoder's vocabulary; counts are None when no ids are given.

    `scenario_ids` are encoded ids (a tensor or array of the train split's `scenario` field).
    """
    field = encoder.spec.scenario_field
    vocab = [str(v) for v in encoder.vocabs.get(field, [])]
    if scenario_ids is None:
        return {name: None for name in vocab}
    ids = scenario_ids.detach().cpu().numpy() if isinstance(scenario_ids, torch.Tensor) else np.asarray(scenario_ids)
    counts = np.bincount(ids.reshape(-1).astype(np.int64), minlength=len(vocab) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(vocab)}


def check_scenarios(
    spec: FeatureSpec,
    counts: Mapping[str, int | None],
    required: Sequence[str] | None = None,
    where: str = "train split",
) -> list[str]:
    """Raise `UnseenScenarioError` if the data holds an undeclared scenario or lacks a required one.

    `counts`: rows per scenario name in the data (None = present, count unknown). `required`: the scenarios the user
    asked to model; None means every scenario the spec declares. Returns the scenarios present, in `counts` order.
    """
    declared = [str(s) for s in spec.scenarios]
    present = [name for name, n in counts.items() if n is None or n > 0]
    if declared:
        undeclared = [name for name in present if name not in declared]
        if undeclared:
            detail = ", ".join(f"'{n}' ({_rows(counts[n])})" for n in undeclared)
            raise UnseenScenarioError(
                f"scenario field '{spec.scenario_field}': the {where} holds scenario(s) {detail} that the feature "
                f"spec does not declare (declared: {declared}); declare them in the spec or drop those rows"
            )
    wanted = declared if required is None else [str(s) for s in required]
    if required is not None and declared:
        unknown = [s for s in wanted if s not in declared]
        if unknown:
            raise UnseenScenarioError(
                f"scenario field '{spec.scenario_field}': scenarios {unknown} were asked for but the feature spec "
                f"declares only {declared}"
            )
    missing = [s for s in wanted if s not in counts or counts[s] == 0]
    if missing:
        detail = ", ".join(f"'{s}' (0 rows)" for s in missing)
        raise UnseenScenarioError(
            f"scenario field '{spec.scenario_field}': the {where} has no rows for declared scenario(s) {detail}; a "
            f"scenario model cannot learn them (present: { {n: counts[n] for n in present} }). Set the model's "
            "`scenarios` to the ones to model, or fix the split"
        )
    return present


def check_training_scenarios(
    encoder: FeatureEncoder, scenario_ids: torch.Tensor | np.ndarray, required: Sequence[str] | None = None
) -> list[str]:
    """The train split's encoded scenario ids against the encoder and the spec, before a scenario model is built.

    Raises `UnseenScenarioError` when rows carry a scenario outside the encoder's vocabulary (id 0: the encoder was
    not fitted on this split), or as `check_scenarios` does (undeclared or missing scenarios, with row counts).
    """
    spec = encoder.spec
    ids = scenario_ids.detach().cpu().numpy() if isinstance(scenario_ids, torch.Tensor) else np.asarray(scenario_ids)
    n_unknown = int((ids == 0).sum())
    if n_unknown:
        raise UnseenScenarioError(
            f"scenario field '{spec.scenario_field}': {n_unknown} train rows have a scenario outside the encoder's "
            f"vocabulary {encoder.vocabs.get(spec.scenario_field)} (fit the encoder on the train split)"
        )
    return check_scenarios(spec, scenario_counts(encoder, ids), required)


def _rows(n: int | None) -> str:
    return "rows unknown" if n is None else f"{n} rows"


def scenario_slots(encoder: FeatureEncoder) -> int:
    """Number of scenario slots: the encoder's scenario vocabulary plus the shared/unknown slot 0."""
    return encoder.vocab_size(encoder.spec.scenario_field)


# ---- routing --------------------------------------------------------------------------------------------------
def route(x: torch.Tensor, slots: torch.Tensor, modules: Sequence[nn.Module], out_dim: int) -> torch.Tensor:
    """Apply `modules[k]` to the rows whose slot is k; `[B, ...] -> [B, out_dim]`.

    Only the slots present in the batch run, so the cost does not grow with the number of scenarios.
    """
    out = x.new_zeros(x.shape[0], out_dim)
    for k in torch.unique(slots).tolist():
        idx = torch.nonzero(slots == k, as_tuple=True)[0]
        out = out.index_copy(0, idx, modules[k](x[idx]))
    return out


class ScenarioTowers(nn.Module):
    """One MLP tower (→ 1 logit) per scenario slot, slot 0 being the shared tower for unknown scenarios."""

    def __init__(self, slots: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        self.towers = nn.ModuleList(
            MLP(in_dim, hidden, dropout=dropout, out_dim=1, batch_norm=batch_norm) for _ in range(slots)
        )

    def forward(self, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return route(h, slots, self.towers, 1).squeeze(-1)


def module_params(module: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
    """Every parameter of `module`, whole: the (parameter, None) pairs of `slot_parameters`."""
    return [(p, None) for p in module.parameters()]


# ---- the sparse-scenario protocol -----------------------------------------------------------------------------
def downsample_scenario(
    tensors: Mapping[str, torch.Tensor],
    encoder: FeatureEncoder,
    scenario: str,
    keep: float = 0.1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keep a seeded `keep` share of one scenario's rows (all other rows untouched), row order preserved.

    The sparse-scenario protocol: a scenario with few training rows, where scenario-specific parameters starve.
    """
    field = encoder.spec.scenario_field
    vocab = [str(v) for v in encoder.vocabs.get(field, [])]
    if str(scenario) not in vocab:
        raise UnseenScenarioError(
            f"sparse-scenario protocol: scenario '{scenario}' is not in the train split (scenarios: {vocab})"
        )
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"sparse-scenario protocol: keep must be in (0, 1], got {keep}")
    ids = tensors[field].cpu().numpy()
    rows = np.flatnonzero(ids == vocab.index(str(scenario)) + 1)
    rng = np.random.default_rng(seed)
    n_keep = max(1, int(round(keep * len(rows))))
    kept = rng.choice(rows, size=n_keep, replace=False)
    mask = ids != vocab.index(str(scenario)) + 1
    mask[kept] = True
    index = torch.from_numpy(np.flatnonzero(mask))
    return {k: v[index] for k, v in tensors.items()}

