"""Early fusion, a multimodal baseline DMAE is measured against: DIN whose item representation is
[id embedding ; W_m v_m for each modality m] for the target and for every behaviour (the modality vectors
concatenated into the item embedding), i.e. fusion at the item-feature level, before any interest modelling.

Built on `MultimodalBase` (ctrflow/models/base.py): DMAE's item-id space and frozen modality table, so the
behaviours' vectors are projected from that table and serving reads only the features it already reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models import register_model
from ctrflow.models.base import MultimodalBase
from ctrflow.models.blocks.attention import TargetAttention
from ctrflow.models.blocks.mlp import MLP
from ctrflow.models.blocks.modality import normalise


@register_model
class EarlyFusionDIN(MultimodalBase):
    name = "early_fusion"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        modalities: Sequence[str] | None = None,
        attention_mlp: Sequence[int] = (80, 40),
        mlp: Sequence[int] = (200, 80),
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        attention_mlp, mlp = [int(h) for h in attention_mlp], [int(h) for h in mlp]
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            modalities=list(modalities) if modalities is not None else None,
            attention_mlp=attention_mlp,
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
        )
        d = int(embedding_dim)
        self._setup(encoder, d, modalities, False, False, False, attention_mlp, sparse)
        self.proj = nn.ModuleList(nn.Linear(encoder.spec[m].dim, d) for m in self.modalities)
        width = d * (1 + len(self.modalities))
        self.attention = TargetAttention(width, attention_mlp, softmax=False)
        self.deep = MLP(self.embedding.output_dim + 2 * width, mlp, dropout=float(dropout), out_dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._maybe_fill(batch)
        table = self.ids.table(self.item_key)
        hist = batch[HIST_FIELD]
        target = torch.cat([table(batch[self.item_key]), *[p(normalise(batch[m].float())) for p, m in zip(self.proj, self.modalities)]], dim=1)
        # projecting the (small) table, then gathering, equals gathering then projecting, at a fraction of the cost
        keys = torch.cat([table(hist), *[nn.functional.embedding(hist, p(self.items.vectors(i))) for i, p in enumerate(self.proj)]], dim=-1)
        interest = self.attention(target, keys, hist > 0)
        return self.deep(torch.cat([self.embedding(batch).flatten(1), target, interest], dim=1)).squeeze(-1)
