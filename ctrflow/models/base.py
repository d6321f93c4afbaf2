"""The model interfaces: `CTRModel`, which every CTR model implements so one trainer and one scorer serve them all,
and the two family bases, `MultiScenarioModel` (SharedBottom, MMoE, PLE, STAR; GSVR's backbones) and
`MultimodalBase` (DMAE and its baselines).

    model = SomeModel(encoder, **params)
    model.prepare(train_tensors)     # once, before training (a no-op unless the model builds tables from the rows)
    logits = model(batch)            # batch: dict[str, Tensor] from FeatureEncoder.transform -> to_tensors
    losses = model.loss(batch)       # {"loss": total, ...named parts}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import Entity, FieldKind
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models.blocks.attention import TargetAttention
from ctrflow.models.blocks.embedding import FieldEmbedding
from ctrflow.models.blocks.modality import ItemModalityTable, normalise, resolve_modalities
from ctrflow.models.blocks.scenario import check_scenarios, scenario_counts, scenario_slots


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Encoder arrays to tensors without copying (int64 ids, float32 vectors and label)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class CTRModel(nn.Module):
    """Base class: subclasses set `name` and implement `forward`; override `loss` to add terms."""

    name: str = "base"

    def __init__(self, encoder: FeatureEncoder, **params: object):
        super().__init__()
        self.encoder = encoder
        self.params = dict(params)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, train: Mapping[str, torch.Tensor]) -> None:
        """Called once with the training tensors before training (and before a resume loads its checkpoint).

        A no-op here; a model whose buffers derive from the training rows (DMAE's modality table) fills them."""

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return {"loss": bce, "bce": bce}

    @torch.no_grad()
    def predict_proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(batch))
        finally:
            self.train(was_training)


# ---- multi-scenario models -------------------------------------------------------------------------------------
class MultiScenarioModel(CTRModel):
    """A CTR model with per-scenario parameters and a shared slot 0.

    Every backbone keeps one set of scenario-specific parameters per slot 1..S and a **shared** slot 0: a scenario
    the model never saw is encoded 0 at serving and is scored with the shared (centre) parameters only. So that
    slot 0 is trained and not left at its initial values, `scenario_dropout` replaces a random share of the
    training rows' scenario ids by 0 (the same trick as a "null" class in classifier-free guidance): those rows
    train the shared path (`drop_scenarios`). See `ctrflow.models.blocks.scenario` for slots and checks.

    The arguments every backbone shares are taken here (a backbone's `**common`): `embedding_dim`, `fields` (the
    fields embedded; None = all), `sparse`, `scenario_dropout`, `scenarios` (those the train split must hold; None =
    every declared one) and `extra_dim` (width of the plug-in inputs).
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
    def drop_scenarios(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In training, send a random `scenario_dropout` share of rows through the shared slot 0 (see above)."""
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
        return self.score(self.drop_scenarios(batch))

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        """(parameter, index) pairs used only by `slot`; index None = the whole parameter, else its row `index`."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _embedding_slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        if self.scenario_field in self.embedding.field_names:
            return [(self.embedding.table(self.scenario_field).weight, slot)]
        return []


# ---- multimodal models -----------------------------------------------------------------------------------------
class MultimodalBase(CTRModel):
    """What the multimodal models share: the other fields' embeddings, the item-id space, the frozen modality
    table, DIN attention over the behaviour ids and the head MLP. Subclasses add `interest(...)` features."""

    name = "multimodal-base"

    def _setup(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int,
        modalities: Sequence[str] | None,
        calibrate: bool,
        id_attention: bool,
        target_modalities: bool,
        attention_mlp: Sequence[int],
        sparse: bool,
    ) -> None:
        spec = encoder.spec
        if HIST_FIELD not in spec.names:
            raise ValueError(f"{self.name}: the spec has no behaviour sequence '{HIST_FIELD}'")
        self.item_key = spec[HIST_FIELD].vocab_of or spec.item_key
        self.modalities = resolve_modalities(encoder, modalities, self.name)
        d = int(embedding_dim)
        self.dim = d
        skip = {HIST_FIELD, self.item_key, *self.modalities}
        others = [f.name for f in spec.fields if f.name not in skip and not (f.kind is FieldKind.EMBEDDING and f.entity is Entity.ITEM)]
        self.embedding = FieldEmbedding(encoder, d, fields=others, sparse=sparse)
        # the target and the behaviours share one item-id table (as in DIN)
        self.ids = FieldEmbedding(encoder, d, fields=[self.item_key, HIST_FIELD], sparse=sparse)
        self.items = ItemModalityTable(
            encoder.vocab_size(self.item_key), self.modalities, [spec[m].dim for m in self.modalities], self.item_key, calibrate
        )
        self.target_proj = nn.ModuleList(nn.Linear(spec[m].dim, d) for m in self.modalities) if target_modalities else None
        self.id_attention = TargetAttention(d, attention_mlp, softmax=False) if id_attention else None
        self.max_len = spec[HIST_FIELD].max_len

    def head_width(self, interest_width: int) -> int:
        width = self.embedding.output_dim + self.dim + interest_width
        if self.id_attention is not None:
            width += self.dim
        if self.target_proj is not None:
            width += self.dim * len(self.modalities)
        return width

    # ---- the modality table --------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, train: Mapping[str, torch.Tensor]) -> None:
        """Fill the modality table from all training rows and calibrate the similarities (call before training)."""
        ids = train[self.item_key]
        self.items.fill(ids, train)
        self.items.set_calibration(train, ids)
        self.items.build_similarity_cache()

    def _maybe_fill(self, batch: Mapping[str, torch.Tensor]) -> None:
        if self.training:
            if not bool(self.items.calibrated):
                self.items.set_calibration(batch, batch[self.item_key])
            self.items.fill(batch[self.item_key], batch)

    # ---- shared pieces -------------------------------------------------------------------------------------
    def target_vectors(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        assert self.target_proj is not None
        return [p(normalise(batch[m].float())) for p, m in zip(self.target_proj, self.modalities)]

    def base_features(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        query = self.ids.table(self.item_key)(batch[self.item_key])
        parts = [self.embedding(batch).flatten(1), query]
        if self.id_attention is not None:
            keys, mask = self.ids.sequence(batch, HIST_FIELD)
            parts.append(self.id_attention(query, keys, mask))
        if self.target_proj is not None:
            parts.extend(self.target_vectors(batch))
        return parts
