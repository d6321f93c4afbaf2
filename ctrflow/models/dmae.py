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
vectors indexed by the encoded item vocabulary (`ItemModalityTable`, in ctrflow/models/blocks/modality.py), filled at training time from the training
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
from ctrflow.data.tables import HIST_FIELD
from ctrflow.models import register_model
from ctrflow.models.base import MultimodalBase
from ctrflow.models.blocks.attention import SelfAttention, TargetAttention
from ctrflow.models.blocks.mlp import MLP
from ctrflow.models.blocks.modality import bucket_histogram, normalise

POOLINGS = ("target", "mean")
TIME_ENCODINGS = ("recency", "none")


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

