"""DGenCTR: discrete-diffusion pre-training over whole samples, then CTR fine-tuning of the very same network.

A sample is a set of tokens, one per feature field plus the click label (METHODS.md, DGenCTR):

    categorical / bucketised numeric field  -> its token id (a row of the field's table)
    sequence field (behaviour, genres)      -> one pooled token: the masked mean of its ids' embeddings
    embedding field (text/image vector)     -> one token: a linear projection of the vector
    label                                   -> a 2-way token (0 / 1)

Pre-training (absorbing-mask diffusion): draw t ~ U{1..T}, mask each eligible token with probability λ(t)
(`linear`: t/T, `cosine`: 1 − cos(π/2 · t/T); at least one token per sample), and let a bidirectional Transformer
over the tokens (field/position embeddings, optionally the step t) restore the masked ones:
- small vocabularies and the label: full softmax against the field's own (tied) embedding table;
- large id fields (`FieldSpec.large`, or more ids than `large_vocab_threshold`): cosine similarity to the in-batch
  distinct ids, softmax at temperature τ (sampled softmax over in-batch negatives);
- pooled sequences and dense vectors: the same cosine in-batch softmax against the batch's distinct values.
The loss is averaged over the masked tokens that have a target (unknown ids and empty sequences have none).

Fine-tuning: every feature visible, only the label masked (t = the smallest step whose rate covers one token);
the label head's 2-way logits give logit(y=1) − logit(y=0), trained with BCE. Nothing new is added, so every
pre-trained tensor transfers. `forward(batch)` is this fine-tune mode: the model trains with the standard
Trainer, saves and loads with the artifact module, and serves like any CTRModel.

Parameter groups for the transfer ablations: names starting with `embedding.`, `label_embedding.`, `position`
or `mask_token` are the *embeddings*; everything else (Transformer, time embedding, output heads) is the
*scoring network*. See `ctrflow/training/pretrain.py` for pre-training, transfer and generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FieldKind, FieldSpec
from ctrflow.models import register_model
from ctrflow.models.base import CTRModel
from ctrflow.models.blocks.dropout import FastDropout, use_fast_dropout
from ctrflow.models.blocks.embedding import FieldEmbedding

SCHEDULES = ("linear", "cosine")
EMBEDDING_PREFIXES = ("embedding.", "label_embedding.", "position", "mask_token")
LABEL = "label"

# token kinds: how a position is reconstructed
SMALL, LARGE, DENSE, LABEL_KIND = "small", "large", "dense", "label"


def parameter_group(name: str) -> str:
    """'embeddings' or 'scorer': which half of the network a state-dict entry belongs to (transfer ablations)."""
    return "embeddings" if name.startswith(EMBEDDING_PREFIXES) else "scorer"


def mask_rate(t: torch.Tensor, steps: int, schedule: str) -> torch.Tensor:
    """λ(t) in [0, 1], rising with t; λ(0) = 0, λ(T) = 1."""
    if schedule not in SCHEDULES:
        raise ValueError(f"dgenctr: schedule must be one of {SCHEDULES}, got '{schedule}'")
    s = t.to(torch.float32) / float(steps)
    if schedule == "linear":
        return s.clamp(0.0, 1.0)
    return (1.0 - torch.cos(0.5 * math.pi * s)).clamp(0.0, 1.0)


def sample_mask(eligible: torch.Tensor, rate: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask each eligible position [B, P] with probability `rate` [B]; at least one per row that has any eligible."""
    u = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    mask = (u < rate.unsqueeze(1)) & eligible
    none = ~mask.any(dim=1) & eligible.any(dim=1)
    if bool(none.any()):
        pick = torch.rand(eligible.shape, generator=generator, device=eligible.device).masked_fill(~eligible, -1.0)
        rows = torch.nonzero(none, as_tuple=True)[0]
        mask[rows, pick[rows].argmax(dim=1)] = True
    return mask


def _row_hash(key: torch.Tensor) -> torch.Tensor:
    """One number per row, equal for equal rows: distinct values of id lists or vectors without the slow
    `torch.unique(dim=0)`. Ids use a wrapping int64 polynomial hash; vectors a fixed float64 projection."""
    if key.dim() == 1:
        return key
    gen = torch.Generator().manual_seed(key.shape[1])
    if key.dtype.is_floating_point:
        weights = torch.rand(key.shape[1], generator=gen, dtype=torch.float64) + 0.5
        return key.double() @ weights
    weights = torch.randint(1, 2**62, (key.shape[1],), generator=gen, dtype=torch.int64)
    return (key.long() * weights).sum(dim=1)


def _first_index(inverse: torch.Tensor, n_unique: int) -> torch.Tensor:
    """For torch.unique's inverse map: the first row holding each distinct value."""
    rows = torch.arange(len(inverse), device=inverse.device)
    out = torch.full((n_unique,), len(inverse), dtype=torch.long, device=inverse.device)
    return out.scatter_reduce(0, inverse, rows, reduce="amin")


class DenoiserLayer(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer` (pre-norm, GELU, batch first) whose self-attention, in training and without masks,
    is written out so its attention-weight dropout is a `FastDropout`: softmax(QK^T / sqrt(d_h)) V with the same
    `self_attn` parameters (in_proj, out_proj) and dropout p. torch's own path drew that mask with `bernoulli_`, 13%
    of a pre-training step after the other dropouts were moved (issue 12). In eval mode, or with a mask, it is
    torch's layer unchanged, so scoring and serving compute exactly what they did."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.attention_dropout = FastDropout(self.self_attn.dropout)

    def _sa_block(self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        if not self.training or attn_mask is not None or key_padding_mask is not None or is_causal:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        attn = self.self_attn
        b, n, d = x.shape
        h = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q * (d // h) ** -0.5) @ k.transpose(-2, -1), dim=-1)  # [B, H, P, P]
        out = (self.attention_dropout(weights) @ v).transpose(1, 2).reshape(b, n, d)
        return self.dropout1(attn.out_proj(out))


@register_model
class DGenCTR(CTRModel):
    name = "dgenctr"
    training_params = ("pretrain", "finetune")  # settings of the training runs, kept in params for provenance

    def __init__(
        self,
        encoder: FeatureEncoder,
        d_model: int | None = 64,
        layers: int = 2,
        heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.1,
        schedule: str = "cosine",
        steps: int = 100,
        tau: float = 0.1,
        time_conditioning: bool = True,
        label_in_diffusion: bool = True,
        large_vocab_threshold: int | None = None,
        respect_spec_large: bool = True,
        dense_loss: bool = True,
        label_weight: float = 1.0,
        init_std: float = 0.02,
        finetune_aux_weight: float = 0.0,
        unknown_as_mask: bool = True,
        embedding_dim: int | None = None,
        pretrain: Mapping[str, object] | None = None,
        finetune: Mapping[str, object] | None = None,
    ):
        d = int(d_model if d_model is not None else (embedding_dim or 64))
        if schedule not in SCHEDULES:
            raise ValueError(f"dgenctr: schedule must be one of {SCHEDULES}, got '{schedule}'")
        if d <= 0 or heads <= 0 or d % heads:
            raise ValueError(f"dgenctr: d_model ({d}) must be a positive multiple of heads ({heads})")
        if steps < 1 or layers < 1:
            raise ValueError(f"dgenctr: steps ({steps}) and layers ({layers}) must be >= 1")
        if tau <= 0:
            raise ValueError(f"dgenctr: tau must be > 0, got {tau}")
        super().__init__(
            encoder,
            d_model=d,
            layers=int(layers),
            heads=int(heads),
            ffn_mult=int(ffn_mult),
            dropout=float(dropout),
            schedule=schedule,
            steps=int(steps),
            tau=float(tau),
            time_conditioning=bool(time_conditioning),
            label_in_diffusion=bool(label_in_diffusion),
            large_vocab_threshold=None if large_vocab_threshold is None else int(large_vocab_threshold),
            respect_spec_large=bool(respect_spec_large),
            dense_loss=bool(dense_loss),
            label_weight=float(label_weight),
            init_std=float(init_std),
            finetune_aux_weight=float(finetune_aux_weight),
            unknown_as_mask=bool(unknown_as_mask),
            embedding_dim=embedding_dim,
            pretrain=dict(pretrain or {}),
            finetune=dict(finetune or {}),
        )
        self.d_model, self.steps, self.schedule, self.tau = d, int(steps), schedule, float(tau)
        self.time_conditioning, self.label_in_diffusion = bool(time_conditioning), bool(label_in_diffusion)
        self.dense_loss, self.label_weight = bool(dense_loss), float(label_weight)
        self.finetune_aux_weight = float(finetune_aux_weight)
        self.unknown_as_mask = bool(unknown_as_mask)

        # ---- tokenizer: one position per field, the label last ----------------------------------------
        self.embedding = FieldEmbedding(encoder, d, init_std=init_std)
        self.fields: list[FieldSpec] = list(self.embedding.field_specs)
        self.kinds: list[str] = [self._kind(f, encoder, large_vocab_threshold, respect_spec_large) for f in self.fields]
        self.kinds.append(LABEL_KIND)
        self.token_names: list[str] = [f.name for f in self.fields] + [LABEL]
        self.n_tokens = len(self.token_names)
        self.label_pos = self.n_tokens - 1
        self._id_positions = [p for p, k in enumerate(self.kinds) if k in (SMALL, LARGE)]
        self.label_embedding = nn.Embedding(2, d)
        nn.init.normal_(self.label_embedding.weight, std=init_std)
        self.position = nn.Parameter(torch.randn(self.n_tokens, d) * init_std)
        self.mask_token = nn.Parameter(torch.randn(d) * init_std)

        # ---- scoring network: bidirectional Transformer + one output head per position ----------------
        self.time_embedding = nn.Embedding(self.steps + 1, d)
        nn.init.normal_(self.time_embedding.weight, std=init_std)
        layer = DenoiserLayer(
            d, int(heads), int(ffn_mult) * d, float(dropout), activation="gelu", batch_first=True, norm_first=True
        )
        self.denoiser = nn.TransformerEncoder(layer, int(layers), norm=nn.LayerNorm(d), enable_nested_tensor=False)
        # its dropout masks were 36% of a training step in torch's bernoulli_; the same dropout, a faster mask
        use_fast_dropout(self.denoiser)
        # one output head per position, G_k(X_t) = W_k h_k + b_k, stored as one tensor (one batched matmul)
        self.head_weight = nn.Parameter(torch.stack([nn.Linear(d, d).weight.t() for _ in self.token_names]))
        self.head_bias = nn.Parameter(torch.zeros(self.n_tokens, d))
        self.out_bias = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(2 if kind == LABEL_KIND else encoder.vocab_size(name)))
                for name, kind in zip(self.token_names, self.kinds)
                if kind in (SMALL, LABEL_KIND)
            }
        )
        rates = mask_rate(torch.arange(1, self.steps + 1), self.steps, schedule)
        reach = torch.nonzero(rates >= 1.0 / self.n_tokens)
        self.finetune_t = int(reach[0]) + 1 if len(reach) else self.steps

    @staticmethod
    def _kind(f: FieldSpec, encoder: FeatureEncoder, threshold: int | None, respect_spec_large: bool) -> str:
        if f.kind in (FieldKind.SEQUENCE, FieldKind.EMBEDDING):
            return DENSE
        large = (respect_spec_large and f.large) or (threshold is not None and encoder.vocab_size(f.name) > threshold)
        return LARGE if large else SMALL

    # ---- tokens and the denoiser ----------------------------------------------------------------------
    def values(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Clean token values [B, P, d] (the label slot is zeros when the batch holds no label)."""
        x = self.embedding(batch)
        if LABEL in batch:
            lab = self.label_embedding(batch[LABEL].long().clamp(0, 1))
        else:
            lab = x.new_zeros(x.shape[0], self.d_model)
        return torch.cat([x, lab.unsqueeze(1)], dim=1)

    def encode(self, values: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, P, d] of the corrupted sample: masked positions see only [MASK] + their position."""
        x = torch.where(mask.unsqueeze(-1), self.mask_token.expand_as(values), values) + self.position
        if self.time_conditioning:
            x = x + self.time_embedding(t).unsqueeze(1)
        return self.denoiser(x)

    def head(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """G_k(X_t) for one position: h [N, d] (that position's hidden states) -> [N, d]."""
        return h @ self.head_weight[pos] + self.head_bias[pos]

    def all_heads(self, h: torch.Tensor) -> torch.Tensor:
        """G_k(X_t) for every position at once: [B, P, d] -> [B, P, d]."""
        return torch.einsum("bpd,pde->bpe", h, self.head_weight) + self.head_bias

    def small_logits(self, g: torch.Tensor, pos: int) -> torch.Tensor:
        """Full-softmax logits over the field's vocabulary (tied to its table) or over the two labels."""
        name = self.token_names[pos]
        weight = self.label_embedding.weight if pos == self.label_pos else self.embedding.table(name).weight
        return g @ weight.t() + self.out_bias[name]

    def label_logit(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.small_logits(self.head(h[:, self.label_pos], self.label_pos), self.label_pos)
        return logits[:, 1] - logits[:, 0]

    # ---- fine-tune mode: the CTRModel interface -----------------------------------------------------
    def finetune_mask(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        mask = torch.zeros(batch_size, self.n_tokens, dtype=torch.bool, device=device)
        mask[:, self.label_pos] = True
        return mask

    def unknown(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Positions whose id is 0 (a value the encoder never saw in training, or a missing one) [B, P]. With
        `unknown_as_mask` they enter the denoiser as [MASK], so a new user or item is inferred from the rest of the
        sample, as in pre-training, instead of being read as one shared "unknown" embedding; never targets."""
        first = batch[self.token_names[0]]
        out = torch.zeros(len(first), self.n_tokens, dtype=torch.bool, device=first.device)
        if self.unknown_as_mask and self._id_positions:
            # one comparison over the stacked id columns instead of one per field
            ids = torch.stack([batch[self.token_names[p]] for p in self._id_positions], dim=1)
            out[:, self._id_positions] = ids == 0
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        values = self.values(batch)
        b = values.shape[0]
        t = torch.full((b,), self.finetune_t, dtype=torch.long, device=values.device)
        mask = self.finetune_mask(b, values.device) | self.unknown(batch)
        return self.label_logit(self.encode(values, mask, t))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch[LABEL])
        out = {"loss": bce, "bce": bce}
        if self.finetune_aux_weight > 0 and self.training:
            aux = self.diffusion_loss(batch)["loss"]
            out["loss"] = bce + self.finetune_aux_weight * aux
            out["diffusion"] = aux
        return out

    # ---- pre-training: absorbing-mask diffusion ----------------------------------------------------
    def eligible(self, batch: Mapping[str, torch.Tensor], unknown: torch.Tensor | None = None) -> torch.Tensor:
        """Positions the forward process may mask [B, P]: every known feature; the label when it is diffused and
        known. `unknown`: `self.unknown(batch)` when the caller has it already."""
        b = len(batch[LABEL])
        eligible = torch.ones(b, self.n_tokens, dtype=torch.bool, device=batch[LABEL].device)
        eligible[:, self.label_pos] = self.label_in_diffusion
        if "label_known" in batch and self.label_in_diffusion:
            eligible[:, self.label_pos] = batch["label_known"].bool()
        return eligible & ~(self.unknown(batch) if unknown is None else unknown)

    def corrupt(
        self, batch: Mapping[str, torch.Tensor], t: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward process: t ~ U{1..T} (unless given) and the masks [2, B, P] (input mask, target mask); a label
        that is not diffused or not known, and an unknown id (`unknown_as_mask`), is always masked in the input and
        never a target."""
        unknown = self.unknown(batch)
        eligible = self.eligible(batch, unknown)
        b = eligible.shape[0]
        if t is None:
            t = torch.randint(1, self.steps + 1, (b,), generator=generator).to(eligible.device)
        mask = sample_mask(eligible, mask_rate(t, self.steps, self.schedule), generator)
        target = mask.clone()
        mask[:, self.label_pos] |= ~eligible[:, self.label_pos]
        mask |= unknown
        return t, torch.stack([mask, target])

    def diffusion_loss(
        self, batch: Mapping[str, torch.Tensor], t: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Denoising loss averaged over masked positions with a target, plus the mean per field (for logs)."""
        t, (mask, target) = self.corrupt(batch, t, generator)
        values = self.values(batch)
        g_all = self.all_heads(self.encode(values, mask, t)).unbind(1)
        value_cols = values.unbind(1)
        total = values.new_zeros(())
        count = 0
        parts: dict[str, torch.Tensor] = {}
        for pos, (name, kind) in enumerate(zip(self.token_names, self.kinds)):
            rows = target[:, pos]
            if kind == DENSE and not self.dense_loss:
                continue
            losses = self._position_loss(batch, value_cols[pos], g_all[pos], pos, kind, rows)
            if losses is None or losses.numel() == 0:
                continue
            weight = self.label_weight if kind == LABEL_KIND else 1.0
            total = total + weight * losses.sum()
            count += losses.numel()
            parts[name] = losses.mean().detach()
        loss = total / max(count, 1)
        return {"loss": loss, "masked": torch.tensor(float(count)), **{f"field_{k}": v for k, v in parts.items()}}

    def _position_loss(
        self,
        batch: Mapping[str, torch.Tensor],
        values: torch.Tensor,
        g: torch.Tensor,
        pos: int,
        kind: str,
        rows: torch.Tensor,
    ) -> torch.Tensor | None:
        """Per-row losses of one position: `values` [B, d] its clean token values, `g` [B, d] its predictions."""
        name = self.token_names[pos]
        if kind in (SMALL, LABEL_KIND):
            idx = torch.nonzero(rows, as_tuple=True)[0]
            if len(idx) == 0:
                return None
            target = batch[name][idx].long()
            return F.cross_entropy(self.small_logits(g[idx], pos), target, reduction="none")
        # LARGE and DENSE: cosine softmax over the batch's distinct values (in-batch negatives)
        if kind == LARGE:
            ids = batch[name]
            valid = ids != 0
            key = ids
        else:
            key = batch[name].reshape(len(batch[name]), -1)
            valid = (key != 0).any(dim=1)  # an empty sequence or a missing vector has no target
        idx = torch.nonzero(rows & valid, as_tuple=True)[0]
        if len(idx) == 0:
            return None
        cand_rows = torch.nonzero(valid, as_tuple=True)[0]
        uniq, inverse = torch.unique(_row_hash(key[cand_rows]), return_inverse=True)
        first = cand_rows[_first_index(inverse, len(uniq))]
        if kind == LARGE:
            cand = self.embedding.table(name)(ids[first])
        else:
            cand = values[first]
        # where each masked row's own value sits among the candidates
        slot = torch.empty(len(values), dtype=torch.long, device=values.device)
        slot[cand_rows] = inverse
        logits = self._cosine_logits(g[idx], cand)
        return F.cross_entropy(logits, slot[idx], reduction="none")

    def _cosine_logits(self, g: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """cos(g_i, cand_j) / τ, [N, M]. 1/τ scales the [N, d] queries, not the [N, M] result: the same logits to float
        rounding, one pass over the large matrix fewer (forward and backward)."""
        return (F.normalize(g, dim=-1) / self.tau) @ F.normalize(cand, dim=-1).t()

    # ---- generation helpers -------------------------------------------------------------------------
    def position_logits(self, h: torch.Tensor, pos: int, bank_values: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised log-probabilities of a position's value: over the vocabulary (small, label), over every
        known id by cosine/τ (large), or over the rows of `bank_values` [M, d] by cosine/τ (dense)."""
        kind = self.kinds[pos]
        g = self.head(h[:, pos], pos)
        if kind in (SMALL, LABEL_KIND):
            logits = self.small_logits(g, pos)
            if kind == SMALL and self.fields[pos].kind is FieldKind.CATEGORICAL:
                logits[:, 0] = float("-inf")  # nor the unknown category (bucket 0 of a numeric is "missing": real)
            return logits
        if kind == LARGE:
            table = self.embedding.table(self.token_names[pos]).weight
            logits = self._cosine_logits(g, table)
            logits[:, 0] = float("-inf")  # never generate the unknown id
            return logits
        if bank_values is None:
            raise ValueError(f"dgenctr: position '{self.token_names[pos]}' is dense; it needs bank values to sample")
        return self._cosine_logits(g, bank_values)
