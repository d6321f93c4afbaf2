"""DMAE: distribution-guided auto-encoder for user multimodal interest cross fusion (arXiv 2508.14485).

[paper] parts, and our reading ([ours], each a constructor option = a key of params.yaml `models.dmae`):

MIEU (encoding unit). For each behaviour item j and modality m, r_mj = (cos(v_m,target, v_m,j) + 1) / 2; a learnable
scaling r̂ = w_m·r + b_m; the interest vector u_mj = r̂ · E_m[⌊r̂·(N_B−1)⌋] (bucket index clamped to [0, N_B−1]).
[ours] `calibrate`: before bucketing, r is stretched to [0, 1] by the 1st/99th percentile of item-item r over the
training items (text encoders put most pairs in a narrow band; without it most behaviours share 2–3 buckets).
A behaviour whose vector is missing (a zero vector, e.g. a film without a knowledge-graph link) uses its own
"missing" bucket embedding, never a similarity. [ours] `time_encoding: recency`: the click time is the behaviour's
recency rank (0 = latest), embedded and added to the fused behaviour vector (the behaviour table keeps order, not
timestamps).

MIFU (fusion unit), [ours]: per-behaviour softmax gate over modalities, conditioned on (behaviour item id embedding,
target item id embedding, time encoding) (`gate`); h_j = Σ_m g_jm u_mj + p_j; one self-attention layer over the
behaviours (`self_attention`); target attention (DIN's unit, query = target id embedding + projected target modality vectors)
pools the user-interest vector z (`pooling: target`). `gate=false, self_attention=false, pooling=mean` is the
"no-mifu" ablation (mean fusion).

Decoder ("distribution guidance"), [ours]: z → per-modality logits over the N_B buckets; the target is the observed
histogram of the (calibrated, fixed) r_mj over the user's behaviours, a distribution per modality; loss KL(target ‖
decoded), averaged over (row, modality) pairs with at least one behaviour. Total = BCE + λ·L_dist (`dist_weight`),
logged as `bce` and `dist`. `decoder=false` is the "no-decoder" ablation.

The head is DIN's: an MLP over the target item's id embedding (one table shared with the behaviours), the
embeddings of the other fields, DIN target attention over the behaviour ids (`id_attention`), z, and the target's
own modality vectors projected to the embedding size (`target_modalities`).

Where the behaviour items' vectors come from. The batch carries `hist_item_ids` (encoded ids) and only the
target's vectors (its EMBEDDING fields). The model keeps a frozen buffer table of per-item, L2-normalised modality
vectors indexed by the encoded item vocabulary (`ItemModalityTable`), filled at training time from the training
rows (each row has the target's id and vectors): `model.prepare(train_tensors)` fills all of it at once and sets the
calibration before training; without it, every training forward fills the rows of its batch (so the standard train
path works unchanged, the first epoch starting with an empty table). The table is part of the state dict, so the
artifact carries it; serving reads only the online features it already reads (the candidate's vectors and the
user's id sequence) and computes target-vs-history similarities inside forward. Items new since training are not in
the id vocabulary, so they are padding in a history (as for every id model) but still scored through their own
vectors when they are the candidate, which is where the multimodal signal helps cold items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import Entity, FieldKind
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models import register_model
from ctrflow.models.base import CTRModel
from ctrflow.models.din import TargetAttention
from ctrflow.models.layers import MLP, FieldEmbedding

POOLINGS = ("target", "mean")
TIME_ENCODINGS = ("recency", "none")
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


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over the behaviours, padding keys masked.

    Written out with matmuls: at these sizes (d=16, L=50) it trains ~1.5x faster on CPU than nn.MultiheadAttention.
    A row without any behaviour attends to nothing and returns zeros.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, d/H]
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, d)) * mask.unsqueeze(-1).to(x.dtype)


@register_model
class DMAE(MultimodalBase):
    name = "dmae"

    def __init__(
        self,
        encoder: FeatureEncoder,
        embedding_dim: int = 16,
        modalities: Sequence[str] | None = None,
        buckets: int = 20,
        calibrate: bool = True,
        time_encoding: str = "recency",
        gate: bool = True,
        gate_hidden: int = 32,
        self_attention: bool = True,
        heads: int = 2,
        pooling: str = "target",
        decoder: bool = True,
        dist_weight: float = 0.1,
        decoder_hidden: Sequence[int] = (64,),
        id_attention: bool = True,
        target_modalities: bool = True,
        attention_mlp: Sequence[int] = (80, 40),
        pool_mlp: Sequence[int] = (32,),
        mlp: Sequence[int] = (200, 80),
        dropout: float = 0.0,
        sparse: bool = False,
    ):
        if int(buckets) < 2:
            raise ValueError(f"dmae: buckets (N_B) must be >= 2, got {buckets}")
        if pooling not in POOLINGS:
            raise ValueError(f"dmae: pooling must be one of {POOLINGS}, got '{pooling}'")
        if time_encoding not in TIME_ENCODINGS:
            raise ValueError(f"dmae: time_encoding must be one of {TIME_ENCODINGS}, got '{time_encoding}'")
        if float(dist_weight) < 0:
            raise ValueError(f"dmae: dist_weight (λ) must be >= 0, got {dist_weight}")
        d = int(embedding_dim)
        if self_attention and d % int(heads):
            raise ValueError(f"dmae: embedding_dim {d} must be divisible by heads {heads}")
        attention_mlp, mlp, decoder_hidden = [int(h) for h in attention_mlp], [int(h) for h in mlp], [int(h) for h in decoder_hidden]
        pool_mlp = [int(h) for h in pool_mlp]
        super().__init__(
            encoder,
            embedding_dim=d,
            modalities=list(modalities) if modalities is not None else None,
            buckets=int(buckets),
            calibrate=bool(calibrate),
            time_encoding=time_encoding,
            gate=bool(gate),
            gate_hidden=int(gate_hidden),
            self_attention=bool(self_attention),
            heads=int(heads),
            pooling=pooling,
            decoder=bool(decoder),
            dist_weight=float(dist_weight),
            decoder_hidden=decoder_hidden,
            id_attention=bool(id_attention),
            target_modalities=bool(target_modalities),
            attention_mlp=attention_mlp,
            pool_mlp=pool_mlp,
            mlp=mlp,
            dropout=float(dropout),
            sparse=bool(sparse),
        )
        self._setup(encoder, d, modalities, calibrate, id_attention, target_modalities, attention_mlp, sparse)
        m = len(self.modalities)
        self.buckets = int(buckets)
        self.dist_weight = float(dist_weight)
        # MIEU: learnable scaling per modality, N_B bucket embeddings + one "missing" row per modality
        self.scale_w = nn.Parameter(torch.ones(m))
        self.scale_b = nn.Parameter(torch.zeros(m))
        self.bucket_emb = nn.Parameter(torch.randn(m, self.buckets + 1, d) * 0.1)
        self.time_emb = nn.Embedding(self.max_len + 1, d) if time_encoding == "recency" else None
        # MIFU
        self.gate = MLP(3 * d, [int(gate_hidden)], out_dim=m) if gate else None
        self.self_attention = SelfAttention(d, int(heads)) if self_attention else None
        self.norm = nn.LayerNorm(d) if self_attention else None
        self.query_proj = nn.ModuleList(nn.Linear(encoder.spec[f].dim, d) for f in self.modalities) if pooling == "target" else None
        self.pool = TargetAttention(d, pool_mlp, softmax=True) if pooling == "target" else None
        # decoder
        self.decoder = MLP(d, decoder_hidden, out_dim=m * self.buckets) if decoder else None
        self.deep = MLP(self.head_width(d), mlp, dropout=float(dropout), out_dim=1)

    # ---- MIEU ----------------------------------------------------------------------------------------------
    def encode_interests(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-behaviour, per-modality interest vectors u [B, L, M, d], plus r, availability and the mask."""
        hist = batch[HIST_FIELD]
        r, avail = self.items.similarities(batch, hist, use_cache=self.training)  # [B, L, M]
        r_hat = r * self.scale_w + self.scale_b
        idx = (r_hat.detach() * (self.buckets - 1)).floor().long().clamp(0, self.buckets - 1)
        idx = torch.where(avail, idx, torch.full_like(idx, self.buckets))  # the "missing" row
        offset = torch.arange(len(self.modalities)) * (self.buckets + 1)  # row of (modality, bucket) in one table
        emb = nn.functional.embedding(idx + offset, self.bucket_emb.view(-1, self.dim))  # [B, L, M, d]
        scale = torch.where(avail, r_hat, torch.ones_like(r_hat)).unsqueeze(-1)
        return {"u": scale * emb, "r": r, "avail": avail, "mask": hist > 0}

    def time_encoding(self, mask: torch.Tensor) -> torch.Tensor:
        """Recency-rank embedding [B, L, d] (0 = latest behaviour); zeros without a time encoding."""
        if self.time_emb is None:
            return torch.zeros(*mask.shape, self.dim)
        n = mask.sum(1, keepdim=True)
        pos = torch.arange(mask.shape[1]).unsqueeze(0)
        recency = torch.where(mask, n - 1 - pos, torch.full_like(pos, self.max_len)).clamp(0, self.max_len)
        return self.time_emb(recency)

    # ---- MIFU ----------------------------------------------------------------------------------------------
    def fuse(self, batch: Mapping[str, torch.Tensor], enc: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The user-interest vector z [B, d]."""
        u, mask = enc["u"], enc["mask"]
        p = self.time_encoding(mask)
        if self.gate is not None:
            beh = self.ids.table(self.item_key)(batch[HIST_FIELD])
            tgt = self.ids.table(self.item_key)(batch[self.item_key]).unsqueeze(1).expand_as(beh)
            g = torch.softmax(self.gate(torch.cat([beh, tgt, p], dim=-1)), dim=-1)  # [B, L, M]
        else:
            g = torch.full(u.shape[:-1], 1.0 / u.shape[2])
        h = (g.unsqueeze(-1) * u).sum(2) + p  # [B, L, d]
        empty = ~mask.any(1)
        if self.self_attention is not None:
            h = self.norm(h + self.self_attention(h, mask))
        if self.pool is not None:
            q = self.ids.table(self.item_key)(batch[self.item_key])
            for proj, f in zip(self.query_proj, self.modalities):
                q = q + proj(normalise(batch[f].float()))
            z = self.pool(q, h, mask)
        else:
            w = mask.unsqueeze(-1).to(h.dtype)
            z = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        return z * (~empty).unsqueeze(-1).to(z.dtype)

    # ---- the model interface -------------------------------------------------------------------------------
    def _forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        self._maybe_fill(batch)
        enc = self.encode_interests(batch)
        z = self.fuse(batch, enc)
        logits = self.deep(torch.cat([*self.base_features(batch), z], dim=1)).squeeze(-1)
        return logits, z, enc

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._forward(batch)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, M, N_B] of the decoded per-modality similarity histogram."""
        assert self.decoder is not None
        return torch.log_softmax(self.decoder(z).view(-1, len(self.modalities), self.buckets), dim=-1)

    def distribution_target(self, enc: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The observed histogram of r_mj over the behaviours [B, M, N_B] and which (row, modality) have one."""
        return bucket_histogram(enc["r"], enc["avail"], self.buckets)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, z, enc = self._forward(batch)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        out = {"bce": bce}
        total = bce
        if self.decoder is not None:
            target, valid = self.distribution_target(enc)
            kl = nn.functional.kl_div(self.decode(z), target, reduction="none").sum(-1)  # [B, M]
            dist = (kl * valid).sum() / valid.sum().clamp(min=1)
            out["dist"] = dist
            total = total + self.dist_weight * dist
        out["loss"] = total
        return out

