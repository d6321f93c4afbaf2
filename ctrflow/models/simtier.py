"""SimTier-style (Sheng et al., 2024), a multimodal baseline DMAE is measured against: per modality, the fixed
histogram of target-vs-behaviour similarities over N_B buckets (the share of the user's behaviours in each similarity
tier) is fed, as a feature, to the head MLP beside DIN's id attention. No learned encoding of the similarities, no
fusion, no decoder.

The similarities come from DMAE's frozen item modality table (`MultimodalBase`, ctrflow/models/base.py), filled
by `prepare(train_tensors)` before training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models import register_model
from ctrflow.models.base import MultimodalBase
from ctrflow.models.blocks.mlp import MLP
from ctrflow.models.blocks.modality import bucket_histogram


@register_model
class SimTier(MultimodalBase):
    name = "simtier"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        modalities: Sequence[str] | None = None,
        buckets: int = 20,
        calibrate: bool = True,
        id_attention: bool = True,
        target_modalities: bool = True,
        attention_mlp: Sequence[int] = (80, 40),
        mlp: Sequence[int] = (200, 80),
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        if int(buckets) < 2:
            raise ValueError(f"simtier: buckets must be >= 2, got {buckets}")
        attention_mlp, mlp = [int(h) for h in attention_mlp], [int(h) for h in mlp]
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            modalities=list(modalities) if modalities is not None else None,
            buckets=int(buckets),
            calibrate=bool(calibrate),
            id_attention=bool(id_attention),
            target_modalities=bool(target_modalities),
            attention_mlp=attention_mlp,
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
        )
        self._setup(encoder, int(embedding_dim), modalities, calibrate, id_attention, target_modalities, attention_mlp, sparse)
        self.buckets = int(buckets)
        self.deep = MLP(self.head_width(len(self.modalities) * self.buckets), mlp, dropout=float(dropout), out_dim=1)

    def histogram(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, M·N_B]: per modality, the share of behaviours in each similarity tier (zeros without history)."""
        r, avail = self.items.similarities(batch, batch[HIST_FIELD], use_cache=self.training)
        hist, _ = bucket_histogram(r, avail, self.buckets)
        return hist.flatten(1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._maybe_fill(batch)
        return self.deep(torch.cat([*self.base_features(batch), self.histogram(batch)], dim=1)).squeeze(-1)
