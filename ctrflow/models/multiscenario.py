"""What the multi-scenario backbones (SharedBottom, MMoE, PLE, STAR) share.

Scenario slots. The scenario field is encoded like any categorical field: id k in 1..S is the k-th scenario of the
encoder's vocabulary (fitted on the train split) and id 0 is "unknown". Every backbone keeps one set of
scenario-specific parameters per slot 1..S and a **shared** slot 0: a scenario the model never saw is encoded 0
at serving and is scored with the shared (centre) parameters only. So that slot 0 is trained and not left at its
initial values, `scenario_dropout` replaces a random share of the training rows' scenario ids by 0 (the same trick
as a "null" class in classifier-free guidance): those rows train the shared path.

Checks. A scenario the data holds but the feature spec does not declare, or a declared scenario the user asked to
model (`scenarios`) that the train split lacks, is an `UnseenScenarioError` naming the scenario and its row count.

Also here: `downsample_scenario` (the sparse-scenario protocol) and `load_embedding_init` (copying pre-trained
`FieldEmbedding` tables, e.g. from diffusion pre-training, into a model by field name and shape).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FeatureSpec
from ctrflow.models.base import CTRModel
from ctrflow.models.layers import MLP, FieldEmbedding

log = logging.getLogger(__name__)


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

    def __init__(self, slots: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.towers = nn.ModuleList(MLP(in_dim, hidden, dropout=dropout, out_dim=1) for _ in range(slots))

    def forward(self, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return route(h, slots, self.towers, 1).squeeze(-1)


# ---- the base class -------------------------------------------------------------------------------------------
class MultiScenarioModel(CTRModel):
    """A CTR model with per-scenario parameters and a shared slot 0 (see the module docstring).

    Subclasses build their network on `self.input_dim` (flattened field embeddings + `extra_dim`) and implement
    `score(batch, extra)`, where `extra` ([B, extra_dim] or None) is what a plug-in such as GSVR adds next to the
    usual inputs; and `slot_parameters(slot)`, the parameters (or slices) only that slot uses.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        fields: Sequence[str] | None = None,
        sparse: bool = False,
        scenario_dropout: float = 0.05,
        scenarios: Sequence[str] | None = None,
        extra_dim: int = 0,
        **params: object,
    ):
        if not 0.0 <= float(scenario_dropout) < 1.0:
            raise ValueError(f"{self.name}: scenario_dropout must be in [0, 1), got {scenario_dropout}")
        if int(extra_dim) < 0:
            raise ValueError(f"{self.name}: extra_dim must be >= 0, got {extra_dim}")
        spec = encoder.spec
        if spec.scenario_field not in spec.names:
            raise KeyError(
                f"{self.name}: the feature spec has no scenario field '{spec.scenario_field}' (fields: {spec.names})"
            )
        fields = list(fields) if fields is not None else None
        scenarios = [str(s) for s in scenarios] if scenarios is not None else None
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            fields=fields,
            sparse=bool(sparse),
            scenario_dropout=float(scenario_dropout),
            scenarios=scenarios,
            extra_dim=int(extra_dim),
            **params,
        )
        # the encoder was fitted on the train split: its vocabulary is the set of scenarios training will see
        check_scenarios(spec, scenario_counts(encoder), scenarios, where="train split (the encoder's vocabulary)")
        self.scenario_field = spec.scenario_field
        self.num_slots = scenario_slots(encoder)
        self.scenario_dropout = float(scenario_dropout)
        self.extra_dim = int(extra_dim)
        self.embedding = FieldEmbedding(encoder, int(embedding_dim), fields=fields, sparse=bool(sparse))
        self.input_dim = self.embedding.output_dim + self.extra_dim

    # -- scenario handling
    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In training, send a random `scenario_dropout` share of rows through the shared slot 0 (see module doc)."""
        if not self.training or self.scenario_dropout <= 0:
            return batch
        s = batch[self.scenario_field]
        drop = torch.rand(s.shape, device=s.device) < self.scenario_dropout
        return {**batch, self.scenario_field: s.masked_fill(drop, 0)}

    def slots(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scenario slot per row; ids outside the vocabulary (a newer encoder) are treated as unknown (0)."""
        s = batch[self.scenario_field].long()
        return torch.where((s > 0) & (s < self.num_slots), s, torch.zeros_like(s))

    def inputs(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None) -> torch.Tensor:
        x = self.embedding(batch).flatten(1)
        if self.extra_dim:
            if extra is None or extra.shape[-1] != self.extra_dim:
                got = None if extra is None else tuple(extra.shape)
                raise ValueError(f"{self.name}: built with extra_dim={self.extra_dim} but got extra inputs {got}")
            x = torch.cat([x, extra], dim=1)
        return x

    # -- interface
    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score(self.prepare(batch))

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        """(parameter, index) pairs used only by `slot`; index None = the whole parameter, else its row `index`."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _embedding_slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        if self.scenario_field in self.embedding.field_names:
            return [(self.embedding.table(self.scenario_field).weight, slot)]
        return []


def _module_params(module: nn.Module) -> list[tuple[nn.Parameter, int | None]]:
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


# ---- pre-trained embedding tables -----------------------------------------------------------------------------
_TABLE_KEY = re.compile(r"(?:^|\.)tables\.(?P<field>[^.]+)\.weight$")
_PROJ_KEY = re.compile(r"(?:^|\.)projections\.(?P<field>[^.]+)\.(?P<what>weight|bias)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file or a model artifact folder (its model.pt); trainer checkpoints ({"model": ...}) too."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"pre-trained embeddings: {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pre-trained embeddings: {path} is not a state dict of tensors")
    return obj


def load_embedding_init(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy pre-trained `FieldEmbedding` tables (and embedding-field projections) into every `FieldEmbedding` of
    `model`, matched by field name and shape.

    The source is any state dict holding FieldEmbedding modules: keys ending in `tables.<field>.weight` and
    `projections.<field>.weight|bias` (the first occurrence of a field wins). Tables whose shapes differ (another
    encoder's vocabulary) are skipped and listed. Returns {"copied": [...], "skipped": [...]}; raises when nothing
    matches, which means the file is not what the caller thinks it is.
    """
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    tables: dict[str, torch.Tensor] = {}
    projections: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in state.items():
        if m := _TABLE_KEY.search(key):
            tables.setdefault(m["field"], value)
        elif m := _PROJ_KEY.search(key):
            projections.setdefault((m["field"], m["what"]), value)
    copied: list[str] = []
    skipped: list[str] = []
    with torch.no_grad():
        for prefix, module in model.named_modules():
            if not isinstance(module, FieldEmbedding):
                continue
            for name, table in module.tables.items():
                src = tables.get(name)
                if src is None:
                    continue
                if tuple(src.shape) != tuple(table.weight.shape):
                    skipped.append(f"{prefix}.tables.{name}: shape {tuple(src.shape)} != {tuple(table.weight.shape)}")
                    continue
                table.weight.copy_(src)
                table.weight[0].zero_()  # id 0 stays the zero vector
                copied.append(f"{prefix}.tables.{name}")
            for name, proj in module.projections.items():
                for what in ("weight", "bias"):
                    src = projections.get((name, what))
                    dst = getattr(proj, what)
                    if src is None or dst is None:
                        continue
                    if tuple(src.shape) != tuple(dst.shape):
                        skipped.append(f"{prefix}.projections.{name}.{what}: shape {tuple(src.shape)}")
                        continue
                    dst.copy_(src)
                    copied.append(f"{prefix}.projections.{name}.{what}")
    if not copied:
        raise ValueError(
            f"pre-trained embeddings: no FieldEmbedding table matched (source fields: {sorted(tables)}; "
            f"skipped: {skipped}); expected a state dict with keys like '<prefix>.tables.<field>.weight'"
        )
    log.info("initialised %d embedding tensors from pre-training (%d skipped)", len(copied), len(skipped))
    return {"copied": copied, "skipped": skipped}
