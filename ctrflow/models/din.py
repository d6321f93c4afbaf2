"""DIN (Zhou et al., KDD 2018): target attention over the behaviour sequence.

Each behaviour item k_j (looked up in the target item's table, so both live in one space) is scored against the
target item q by a small MLP on [q, k_j, q − k_j, q ⊙ k_j]; padding positions get weight 0. The user interest is
Σ_j w_j k_j (DIN's un-normalised weights by default; `attention_softmax=True` normalises over the real items).
The interest vector joins the embeddings of every other field in the final MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind
from ctrflow.models import register_model
from ctrflow.models.base import CTRModel
from ctrflow.models.blocks.attention import TargetAttention
from ctrflow.models.blocks.embedding import FieldEmbedding
from ctrflow.models.blocks.mlp import MLP


@register_model
class DIN(CTRModel):
    name = "din"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        sequence_field: str = "hist_item_ids",
        target_field: str | None = None,
        attention_mlp: Sequence[int] = (80, 40),
        attention_softmax: bool = False,
        mlp: Sequence[int] = (200, 80),
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        spec = encoder.spec
        if sequence_field not in spec.names or spec[sequence_field].kind is not FieldKind.SEQUENCE:
            seqs = [f.name for f in spec.of_kind(FieldKind.SEQUENCE)]
            raise ValueError(f"din: sequence_field '{sequence_field}' is not a sequence field of the spec ({seqs})")
        target_field = target_field or spec[sequence_field].vocab_of
        if not target_field or target_field not in spec.names:
            raise ValueError(
                f"din: target_field '{target_field}' is not in the spec; set it, or give '{sequence_field}' a vocab_of"
            )
        if (spec[target_field].vocab_of or target_field) != (spec[sequence_field].vocab_of or sequence_field):
            raise ValueError(f"din: '{sequence_field}' and '{target_field}' must share one vocabulary (vocab_of)")
        attention_mlp, mlp = [int(h) for h in attention_mlp], [int(h) for h in mlp]
        super().__init__(
            encoder,
            embedding_dim=int(embedding_dim),
            sequence_field=sequence_field,
            target_field=target_field,
            attention_mlp=attention_mlp,
            attention_softmax=bool(attention_softmax),
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
        )
        self.sequence_field, self.target_field = sequence_field, target_field
        self.embedding = FieldEmbedding(encoder, int(embedding_dim), sparse=sparse)
        self.others = [f for f in self.embedding.field_specs if f.name != sequence_field]
        self._target_pos = [f.name for f in self.others].index(target_field)
        self.attention = TargetAttention(int(embedding_dim), attention_mlp, softmax=bool(attention_softmax))
        width = (len(self.others) + 1) * int(embedding_dim)
        self.deep = MLP(width, mlp, dropout=float(dropout), out_dim=1)

    def attention_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-behaviour weights [B, L] (0 on padding): what the model attended to."""
        keys, mask = self.embedding.sequence(batch, self.sequence_field)
        query = self.embedding.table(self.target_field)(batch[self.target_field])
        return self.attention.weights(query, keys, mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keys, mask = self.embedding.sequence(batch, self.sequence_field)
        fields = self.embedding(batch, exclude=(self.sequence_field,))  # [B, F-1, d]: every other field, spec order
        interest = self.attention(fields[:, self._target_pos], keys, mask)
        x = torch.cat([fields.flatten(1), interest], dim=1)
        return self.deep(x).squeeze(-1)
