"""Attention blocks: DIN's target attention and multi-head self-attention over a behaviour sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctrflow.models.blocks.mlp import MLP


class TargetAttention(nn.Module):
    """Scores each key against the query with an MLP; masked positions get exactly zero weight."""

    def __init__(self, dim: int, hidden: Sequence[int] = (80, 40), softmax: bool = False):
        super().__init__()
        self.score = MLP(4 * dim, hidden, out_dim=1)
        self.softmax = softmax

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, d], keys [B, L, d], mask [B, L] (True = real item) -> weights [B, L]."""
        scores = self._scores(query, keys)
        if self.softmax:
            # a row with no real item gets all weights 0: its scores stay finite (no -inf, so no NaN to clean up
            # with nan_to_num, whose backward costs four passes) and its softmax is multiplied by 0
            nonempty = mask.any(dim=-1, keepdim=True)
            w = torch.softmax(scores.masked_fill(~mask & nonempty, float("-inf")), dim=-1)
            return w * nonempty.to(w.dtype)
        return scores * mask.to(scores.dtype)

    def _scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The activation unit MLP([q, k, q - k, q * k]) [B, L]. Its first Linear is applied by parts: with W split
        into the four inputs' blocks, W [q, k, q-k, q*k] = (W_q + W_d) q + [W_k - W_d, W_p] [k, q*k], so the query's
        part is computed once per row instead of once per behaviour and the [B, L, 4d] input is never built (the
        same function; float rounding differs, ~1e-6)."""
        first, rest = self.score.net[0], self.score.net[1:]
        w_q, w_k, w_d, w_p = first.weight.split(query.shape[-1], dim=1)
        per_row = F.linear(query, w_q + w_d, first.bias).unsqueeze(1)  # [B, 1, h]
        per_key = F.linear(torch.cat([keys, query.unsqueeze(1) * keys], dim=-1), torch.cat([w_k - w_d, w_p], dim=1))
        return rest(per_key + per_row).squeeze(-1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.weights(query, keys, mask).unsqueeze(-1) * keys).sum(dim=1)



class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over the behaviours, padding keys masked.

    Through `F.scaled_dot_product_attention` (its fused CPU kernel never materialises the [B, H, L, L] scores: at
    B=4096, L=50 training is ~2.5x faster than the written-out softmax(QK^T/sqrt(d)) V it replaces, which equals it
    to float rounding, ~1e-6). Padding queries return zeros; a row without any behaviour attends to all of its
    (padding) keys, so the kernel sees no fully masked row, and returns zeros like every padding query.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, d/H]
        keys = mask | ~mask.any(dim=1, keepdim=True)  # [B, L]: an empty row sees every key (its output is zeroed)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        return self.out(att.transpose(1, 2).reshape(b, n, d)) * mask.unsqueeze(-1).to(x.dtype)

