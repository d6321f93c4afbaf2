"""Building blocks every model shares: one embedding of the feature spec, and a plain MLP.

Models never build their own embedding tables: `FieldEmbedding` reads the spec and the fitted encoder, so a new
field (or a new dataset) reaches every model without touching model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind, FieldSpec


class FieldEmbedding(nn.Module):
    """Embeds the chosen fields of a batch to `[B, F, dim]`, in spec order.

    - categorical and bucketised numeric fields: one table row per token id;
    - sequence fields: masked mean over the non-zero ids; a sequence with `vocab_of` shares that field's table
      (`hist_item_ids` is looked up in `item_id`'s table, so behaviour and target live in one space);
    - embedding fields: a linear projection of the dense vector to `dim`.

    Id 0 (unknown or padding) always maps to the zero vector and gets no gradient. With `sparse=True`, the tables
    of fields marked `large` in the spec produce sparse gradients (the trainer hands them to SparseAdam).
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        dim: int,
        fields: Sequence[str] | None = None,
        sparse: bool = False,
        init_std: float = 1e-4,
    ):
        super().__init__()
        spec = encoder.spec
        if dim <= 0:
            raise ValueError(f"FieldEmbedding: dim must be > 0, got {dim}")
        names = list(fields) if fields is not None else spec.names
        unknown = [n for n in names if n not in spec.names]
        if unknown:
            raise KeyError(f"FieldEmbedding: fields {unknown} are not in the feature spec (fields: {spec.names})")
        if not names:
            raise ValueError("FieldEmbedding: no fields to embed")
        self.dim = dim
        self.field_specs: list[FieldSpec] = [spec[n] for n in names]
        self.field_names: list[str] = names
        self.tables = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        self._table_of: dict[str, str] = {}
        for f in self.field_specs:
            if f.kind is FieldKind.EMBEDDING:
                self.projections[f.name] = nn.Linear(f.dim, dim)
                continue
            owner = f.vocab_of or f.name  # the field whose vocabulary (and table) this one uses
            self._table_of[f.name] = owner
            if owner not in self.tables:
                table = nn.Embedding(
                    encoder.vocab_size(owner), dim, padding_idx=0, sparse=bool(sparse and spec[owner].large)
                )
                nn.init.normal_(table.weight, std=init_std)
                with torch.no_grad():
                    table.weight[0].zero_()
                self.tables[owner] = table

    @property
    def num_fields(self) -> int:
        return len(self.field_specs)

    @property
    def output_dim(self) -> int:
        """Width of the flattened output, `num_fields * dim`."""
        return self.num_fields * self.dim

    def table(self, name: str) -> nn.Embedding:
        """The table a field is looked up in (a sequence's shared table included; a table owner's name works too)."""
        owner = self._table_of.get(name, name)
        if owner not in self.tables:
            raise KeyError(f"field '{name}' has no embedding table here (fields with tables: {sorted(self._table_of)})")
        return self.tables[owner]

    def sequence(self, batch: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence field unpooled: embeddings `[B, L, dim]` and its mask `[B, L]` (True where an id is present)."""
        ids = _field(batch, name)
        return self.table(name)(ids), ids != 0

    def embed_field(self, batch: dict[str, torch.Tensor], f: FieldSpec) -> torch.Tensor:
        """One field to `[B, dim]`."""
        if f.kind is FieldKind.EMBEDDING:
            return self.projections[f.name](_field(batch, f.name).float())
        if f.kind is FieldKind.SEQUENCE:
            emb, mask = self.sequence(batch, f.name)
            m = mask.unsqueeze(-1).to(emb.dtype)
            return (emb * m).sum(1) / m.sum(1).clamp(min=1.0)  # an empty sequence pools to zeros
        return self.table(f.name)(_field(batch, f.name))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.embed_field(batch, f) for f in self.field_specs], dim=1)


class MLP(nn.Module):
    """Linear → ReLU → Dropout per hidden layer, then an optional linear head to `out_dim`."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _field(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return batch[name]
    except KeyError:
        raise KeyError(f"field '{name}' is missing from the batch (keys: {sorted(batch)})") from None
