"""Logistic regression: one learned weight per token of every field, plus a bias.

The floor every model must clear. It reads the same `FieldEmbedding` as the others (width 1), so a sequence
contributes the mean weight of its ids and a dense vector a linear projection to one number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import register_model
from ctrflow.models.base import CTRModel
from ctrflow.models.blocks.embedding import FieldEmbedding


@register_model
class LR(CTRModel):
    name = "lr"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,  # accepted for a uniform params interface; LR's "embedding" is one weight
        sparse: bool = False,
        fields: Sequence[str] | None = None,
    ):
        fields = list(fields) if fields is not None else None
        super().__init__(encoder, embedding_dim=int(embedding_dim), sparse=bool(sparse), fields=fields)
        self.weights = FieldEmbedding(encoder, 1, fields=fields, sparse=sparse)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weights(batch).sum(dim=(1, 2)) + self.bias
