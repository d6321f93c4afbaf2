"""DeepFM (Guo et al., IJCAI 2017): a factorisation machine and an MLP that share one field embedding.

logit = bias + Σ_f w_f  (first order)
      + ½ Σ_d [(Σ_f v_fd)² − Σ_f v_fd²]  (pairwise interactions of the shared embeddings, O(F·d))
      + MLP(flatten(v))                   (the deep part on the same embeddings)
Reference configuration (DeepCTR-Torch's on ML-100K): embedding 16, MLP 3×400.

Speed: the first-order weight w_f of an id is stored as one extra column of its embedding row, so one lookup per
field fetches both (half the gather/scatter work and half the optimizer's tables of a separate width-1 table);
the model is the same function with the same parameters per id.
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


def fm_interaction(v: torch.Tensor) -> torch.Tensor:
    """Sum of all pairwise dot products of the field vectors `v` [B, F, d] -> [B]."""
    square_of_sum = v.sum(dim=1).pow(2)
    sum_of_square = v.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)


@register_model
class DeepFM(CTRModel):
    name = "deepfm"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        mlp: Sequence[int] = (400, 400, 400),
        dropout: float = 0.0,
        sparse: bool = False,
        fields: Sequence[str] | None = None,
        init_std: float = 1e-4,
    ):
        mlp = [int(h) for h in mlp]
        fields = list(fields) if fields is not None else None
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
            fields=fields,
            init_std=float(init_std),
        )
        self.dim = int(embedding_dim)
        # columns [:dim] are the factor v, column dim the first-order weight w
        self.embedding = FieldEmbedding(encoder, self.dim + 1, fields=fields, sparse=sparse, init_std=init_std)
        self.deep = MLP(self.embedding.num_fields * self.dim, mlp, dropout=float(dropout), out_dim=1)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        e = self.embedding(batch)
        v, linear = e[..., : self.dim], e[..., self.dim].sum(dim=1)
        return self.bias + linear + fm_interaction(v) + self.deep(v.flatten(1)).squeeze(-1)
