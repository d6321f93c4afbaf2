"""DCN-V2 (Wang et al., WWW 2021), parallel form: the default baseline every new model is compared with.

x0 = the flattened field embeddings; the cross network stacks x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l with full-rank
W_l; a deep MLP reads x0 in parallel; the two outputs are concatenated and mapped to one logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import register_model
from ctrflow.models.base import CTRModel
from ctrflow.models.blocks.embedding import FieldEmbedding
from ctrflow.models.blocks.mlp import MLP


class CrossNetV2(nn.Module):
    """Explicit bounded-degree feature crosses: x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


@register_model
class DCNv2(CTRModel):
    name = "dcnv2"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        cross_layers: int = 3,
        mlp: Sequence[int] = (400, 400, 400),
        dropout: float = 0.1,
        sparse: bool = False,
        fields: Sequence[str] | None = None,
    ):
        if cross_layers < 0:
            raise ValueError(f"dcnv2: cross_layers must be >= 0, got {cross_layers}")
        mlp = [int(h) for h in mlp]
        fields = list(fields) if fields is not None else None
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            cross_layers=int(cross_layers),
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
            fields=fields,
        )
        self.embedding = FieldEmbedding(encoder, int(embedding_dim), fields=fields, sparse=sparse)
        width = self.embedding.output_dim
        self.cross = CrossNetV2(width, int(cross_layers))
        self.deep = MLP(width, mlp, dropout=float(dropout)) if mlp else None
        head_in = width + (self.deep.output_dim if self.deep is not None else 0)
        self.head = nn.Linear(head_in, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.embedding(batch).flatten(1)
        parts = [self.cross(x0)]
        if self.deep is not None:
            parts.append(self.deep(x0))
        return self.head(torch.cat(parts, dim=1)).squeeze(-1)
