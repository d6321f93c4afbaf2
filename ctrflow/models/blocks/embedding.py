"""Embedding blocks: one embedding of the feature spec for every model, and copying pre-trained tables into it.

Models never build their own embedding tables: `FieldEmbedding` reads the spec and the fitted encoder, so a new
field (or a new dataset) reaches every model without touching model code. `load_embedding_init` copies
pre-trained `FieldEmbedding` tables (e.g. from DGenCTR's diffusion pre-training) into any model by field name and
shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind, FieldSpec

log = logging.getLogger(__name__)


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
        self._plans: dict[tuple[str, ...], tuple | None] = {}  # forward's fused-lookup plan per excluded set
        self._offsets: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def forward(self, batch: dict[str, torch.Tensor], exclude: Collection[str] = ()) -> torch.Tensor:
        """The fields (less `exclude`) to `[B, F, dim]`, in spec order.

        The single-id fields whose tables are dense (categorical and bucketised numeric; sparse tables excluded)
        are looked up in one `F.embedding` call over their tables concatenated (ids shifted by each table's offset;
        id 0 of every field maps to row 0, the first table's zero padding row, which gets no gradient): one lookup
        and one backward instead of one per field. Values are the same rows, gradients the same sums. An id outside
        its table raises IndexError naming the field, as a per-field lookup does."""
        plan = self._plan(tuple(exclude))
        if plan is None:
            specs = [f for f in self.field_specs if f.name not in exclude]
            return torch.stack([self.embed_field(batch, f) for f in specs], dim=1)
        names, owners, rest, order = plan
        ids = torch.stack([_field(batch, n).long() for n in names], dim=1)  # [B, S]
        offsets, sizes = self._fused_offsets(owners, names, ids.device)
        bad = (ids < 0) | (ids >= sizes)
        if bool(bad.any()):
            col = int(bad.any(dim=0).nonzero()[0])
            raise IndexError(
                f"field '{names[col]}': {int(bad[:, col].sum())} ids outside its table of {int(sizes[col])} rows "
                f"(e.g. {int(ids[:, col][bad[:, col]][0])})"
            )
        weight = torch.cat([self.tables[o].weight for o in owners]) if len(owners) > 1 else self.tables[owners[0]].weight
        out = F.embedding((ids + offsets) * (ids != 0), weight, padding_idx=0)  # [B, S, dim]
        if rest:
            out = torch.cat([out, torch.stack([self.embed_field(batch, f) for f in rest], dim=1)], dim=1)
        return out if order is None else out.index_select(1, order.to(out.device))

    def _plan(
        self, exclude: tuple[str, ...]
    ) -> tuple[list[str], list[str], list[FieldSpec], torch.Tensor | None] | None:
        """(fused field names, their table owners in concatenation order, the other fields, the column order that
        puts [fused..., others...] back in spec order or None when it already is); None when fewer than two fields
        can be fused."""
        if exclude not in self._plans:
            specs = [f for f in self.field_specs if f.name not in exclude]
            fused = [
                f for f in specs
                if f.kind in (FieldKind.CATEGORICAL, FieldKind.NUMERIC) and not self.table(f.name).sparse
            ]  # fmt: skip
            if len(fused) < 2:
                self._plans[exclude] = None
            else:
                rest = [f for f in specs if f not in fused]
                owners = list(dict.fromkeys(self._table_of[f.name] for f in fused))
                position = {f.name: i for i, f in enumerate(fused + rest)}
                order = [position[f.name] for f in specs]
                perm = None if order == list(range(len(order))) else torch.tensor(order)
                self._plans[exclude] = ([f.name for f in fused], owners, rest, perm)
        return self._plans[exclude]

    def _fused_offsets(self, owners: list[str], names: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per fused field: the row where its table starts in the concatenation, and its table's size."""
        key = (tuple(names), str(device))
        if key not in self._offsets:
            start, starts = 0, {}
            for o in owners:
                starts[o] = start
                start += self.tables[o].num_embeddings
            own = [self._table_of[n] for n in names]
            self._offsets[key] = (
                torch.tensor([starts[o] for o in own], device=device),
                torch.tensor([self.tables[o].num_embeddings for o in own], device=device),
            )
        return self._offsets[key]



def _field(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return batch[name]
    except KeyError:
        raise KeyError(f"field '{name}' is missing from the batch (keys: {sorted(batch)})") from None


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


def embedding_widths(state: Mapping[str, torch.Tensor]) -> set[int]:
    """The widths (columns) of the FieldEmbedding tables in a state dict (`load_embedding_init`'s keys)."""
    return {int(v.shape[1]) for k, v in state.items() if _TABLE_KEY.search(k) and getattr(v, "ndim", 0) == 2}


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
