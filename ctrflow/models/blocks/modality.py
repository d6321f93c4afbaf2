"""Item-modality blocks (DMAE and its baselines): the frozen per-item modality table and similarity histograms.

Where the behaviour items' vectors come from: the batch carries `hist_item_ids` (encoded ids) and only the target's
vectors (its EMBEDDING fields). `ItemModalityTable` keeps a frozen buffer table of per-item, L2-normalised modality
vectors indexed by the encoded item vocabulary, filled from the training rows (each row has the target's id and
vectors). It is part of the state dict, so an artifact carries it; serving reads only the online features it
already reads and computes target-vs-history similarities inside forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import Entity, FieldKind

CALIBRATION_QUANTILES = (0.01, 0.99)
CALIBRATION_MAX_ITEMS = 4000
SIM_CACHE_MAX_ITEMS = 5000  # item-item similarity cache (training speed) only for vocabularies up to this size


def resolve_modalities(encoder: FeatureEncoder, modalities: Sequence[str] | None, model: str) -> list[str]:
    """The item EMBEDDING fields a model uses: all of them by default, else the named ones (checked)."""
    spec = encoder.spec
    available = [f.name for f in spec.of_kind(FieldKind.EMBEDDING) if f.entity is Entity.ITEM]
    if modalities is None:
        chosen = available
    else:
        chosen = [str(m) for m in modalities]
        bad = [m for m in chosen if m not in available]
        if bad:
            raise ValueError(f"{model}: modalities {bad} are not item embedding fields of the spec (it has {available})")
    if not chosen:
        raise ValueError(
            f"{model}: the spec has no item embedding field (a modality); add one with ctrflow.embeddings.add_item_embeddings"
        )
    return chosen


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 rows; a zero row (missing vector) stays zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class ItemModalityTable(nn.Module):
    """Frozen per-item modality vectors, indexed by encoded item id, with the similarity calibration.

    Buffers (saved in the state dict): `vec_<i>` [V, dim_i] unit vectors (zero = unknown), `known` [V, M] bool,
    `calibration` [M, 2] (lo, hi of r used to stretch r to [0, 1]) and `calibrated` (bool scalar).
    """

    def __init__(self, vocab_size: int, fields: Sequence[str], dims: Sequence[int], item_key: str, calibrate: bool = True):
        super().__init__()
        self.fields = list(fields)
        self.item_key = item_key
        self.calibrate = bool(calibrate)
        for i, d in enumerate(dims):
            self.register_buffer(f"vec_{i}", torch.zeros(vocab_size, int(d)))
        self.register_buffer("known", torch.zeros(vocab_size, len(self.fields), dtype=torch.bool))
        cal = torch.tensor([[0.0, 1.0]] * len(self.fields))
        self.register_buffer("calibration", cal)
        self.register_buffer("calibrated", torch.tensor(not self.calibrate))
        for i in range(len(self.fields)):  # item-item similarity cache for training (not saved)
            self.register_buffer(f"sim_{i}", None, persistent=False)

    def vectors(self, i: int) -> torch.Tensor:
        return getattr(self, f"vec_{i}")

    @torch.no_grad()
    def fill(self, item_ids: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Store the target rows' vectors under their encoded ids (id 0 = unknown is never stored)."""
        ids = item_ids.long()
        keep = ids > 0
        if not bool(keep.any()):
            return
        ids = ids[keep]
        for i, f in enumerate(self.fields):
            new = ~self.known[ids, i]  # an item's vectors are a profile feature: the first seen are kept
            if not bool(new.any()):
                continue
            v = normalise(batch[f][keep][new].float())
            present = v.abs().sum(-1) > 0
            if not bool(present.any()):
                continue
            self.vectors(i)[ids[new][present]] = v[present]
            self.known[ids[new][present], i] = True
            setattr(self, f"sim_{i}", None)  # the table changed: the similarity cache is stale

    @torch.no_grad()
    def build_similarity_cache(self, max_items: int = SIM_CACHE_MAX_ITEMS) -> bool:
        """Precompute item-item r for a small vocabulary (training speed: a lookup instead of a gather + dot)."""
        if self.known.shape[0] > max_items:
            return False
        for i in range(len(self.fields)):
            v = self.vectors(i)
            setattr(self, f"sim_{i}", (v @ v.T + 1) / 2)
        return True

    @torch.no_grad()
    def set_calibration(self, batch: Mapping[str, torch.Tensor], item_ids: torch.Tensor | None = None) -> None:
        """lo/hi of r per modality: the 1st/99th percentile of r over pairs of distinct items in `batch`."""
        if not self.calibrate:
            self.calibrated.fill_(True)
            return
        if item_ids is not None:
            ids = item_ids.long()
            _, first = _unique_first(ids)
            rows = first[:CALIBRATION_MAX_ITEMS]
        else:
            rows = torch.arange(min(len(next(iter(batch.values()))), CALIBRATION_MAX_ITEMS))
        for i, f in enumerate(self.fields):
            v = normalise(batch[f][rows].float())
            v = v[v.abs().sum(-1) > 0]
            if len(v) < 3:
                self.calibration[i] = torch.tensor([0.0, 1.0])
                continue
            r = (v @ v.T + 1) / 2
            iu = torch.triu_indices(len(v), len(v), offset=1)
            vals = r[iu[0], iu[1]]
            if len(vals) > 200_000:
                vals = vals[torch.linspace(0, len(vals) - 1, 200_000).long()]
            lo, hi = torch.quantile(vals, torch.tensor(CALIBRATION_QUANTILES)).tolist()
            if hi - lo < 1e-6:
                lo, hi = 0.0, 1.0
            self.calibration[i] = torch.tensor([lo, hi])
        self.calibrated.fill_(True)

    def similarities(
        self, batch: Mapping[str, torch.Tensor], hist_ids: torch.Tensor, use_cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated r in [0, 1] and availability, both [B, L, M], for target-vs-behaviour pairs.

        Scoring (use_cache=False) always computes r from the batch's target vectors, so a candidate new since
        training is scored through its own vectors; training may look r up in the item-item cache instead.
        """
        rs, avail = [], []
        mask = hist_ids > 0
        tid = batch[self.item_key].long() if use_cache else None
        for i, f in enumerate(self.fields):
            cache = getattr(self, f"sim_{i}")
            if tid is not None and cache is not None and bool(self.known[tid, i].all()):
                # training rows: the target's vectors are the table's own row, so r is a lookup
                r = cache[tid.unsqueeze(1), hist_ids]
                has_target = torch.ones_like(tid, dtype=torch.bool).unsqueeze(1)
            else:
                t = normalise(batch[f].float())  # [B, d]
                h = nn.functional.embedding(hist_ids, self.vectors(i))  # [B, L, d]
                r = (torch.einsum("bd,bld->bl", t, h) + 1) / 2
                has_target = (t.abs().sum(-1) > 0).unsqueeze(1)
            lo, hi = self.calibration[i, 0], self.calibration[i, 1]
            rs.append(((r - lo) / (hi - lo)).clamp(0.0, 1.0))
            avail.append(mask & self.known[hist_ids, i] & has_target)
        return torch.stack(rs, dim=-1), torch.stack(avail, dim=-1)


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values and the index of each one's first occurrence (deterministic)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids)), reduce="amin")
    return uniq, first.sort().values


def bucket_histogram(r: torch.Tensor, avail: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and modality, the share of available behaviours in each of `buckets` similarity buckets.

    r, avail: [B, L, M] -> histogram [B, M, N_B] (rows sum to 1 where `valid`, all zero otherwise) and valid [B, M].
    Bucket k holds ⌊r·(N_B−1)⌋ = k (clamped), as in the paper's bucket index.
    """
    idx = (r * (buckets - 1)).floor().long().clamp(0, buckets - 1)  # [B, L, M]
    onehot = nn.functional.one_hot(idx, buckets).to(r.dtype) * avail.unsqueeze(-1).to(r.dtype)  # [B, L, M, N_B]
    counts = onehot.sum(dim=1)  # [B, M, N_B]
    total = counts.sum(-1, keepdim=True)
    valid = total.squeeze(-1) > 0
    return counts / total.clamp(min=1.0), valid

