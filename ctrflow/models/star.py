"""STAR (Sheng et al., CIKM 2021): one model for all scenarios with a star topology.

- Partitioned normalisation (PN): each scenario is normalised with its own statistics (batch statistics of its
  rows in training, its moving averages at serving) and its own scale and shift on top of the shared ones:
  γ·γ_s·(x − μ_s)/σ_s + β + β_s.
- Star topology FCN: every layer's weight is the element-wise product of the shared centre weight and the
  scenario's weight, W_s = W ⊙ W_s' (W_s' starts at ones), bias b + b_s'.
- Auxiliary network: a small MLP on the scenario embedding and the inputs whose logit is added to the main one.

Slot 0, an unknown scenario, uses the centre only: W, b, γ, β and the global moving statistics, with a zero
scenario embedding in the auxiliary network. `scenario_dropout` sends some training rows through that path so the
centre alone is a trained model (see `MultiScenarioModel` in ctrflow/models/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import register_model
from ctrflow.models.base import MultiScenarioModel
from ctrflow.models.blocks.mlp import MLP


class PartitionedNorm(nn.Module):
    """Per-scenario normalisation; slot 0 uses the global statistics and the shared affine only.

    A scenario with fewer than `min_rows` rows in a training batch is normalised with the batch's global
    statistics (a handful of rows give no usable variance); at serving, a scenario whose moving statistics were
    never updated uses the global ones.
    """

    def __init__(self, slots: int, dim: int, momentum: float = 0.1, eps: float = 1e-5, min_rows: int = 8):
        super().__init__()
        self.slots, self.momentum, self.eps, self.min_rows = slots, momentum, eps, min_rows
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.gamma_slot = nn.Parameter(torch.ones(slots, dim))  # row 0 unused (fixed at the centre)
        self.beta_slot = nn.Parameter(torch.zeros(slots, dim))
        self.register_buffer("running_mean", torch.zeros(slots, dim))  # row 0: global
        self.register_buffer("running_var", torch.ones(slots, dim))
        self.register_buffer("updates", torch.zeros(slots, dtype=torch.long))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        known = (s > 0).unsqueeze(-1)
        if self.training:
            g_mean, g_var = x.mean(0), x.var(0, unbiased=False)
            counts = torch.bincount(s, minlength=self.slots).to(x.dtype)
            sums = x.new_zeros(self.slots, x.shape[1]).index_add(0, s, x)
            mean = sums / counts.clamp(min=1).unsqueeze(-1)
            sq = x.new_zeros(self.slots, x.shape[1]).index_add(0, s, (x - mean[s]) ** 2)
            var = sq / counts.clamp(min=1).unsqueeze(-1)
            enough = counts >= self.min_rows
            enough[0] = False  # slot 0 always uses the global statistics
            mean = torch.where(enough.unsqueeze(-1), mean, g_mean)
            var = torch.where(enough.unsqueeze(-1), var, g_var)
            with torch.no_grad():
                m = self.momentum
                upd = enough.clone()
                self.running_mean[upd] = (1 - m) * self.running_mean[upd] + m * mean[upd].detach()
                self.running_var[upd] = (1 - m) * self.running_var[upd] + m * var[upd].detach()
                self.running_mean[0] = (1 - m) * self.running_mean[0] + m * g_mean.detach()
                self.running_var[0] = (1 - m) * self.running_var[0] + m * g_var.detach()
                self.updates += upd.long()
                self.updates[0] += 1
            return self._affine((x - mean[s]) / torch.sqrt(var[s] + self.eps), s, known)
        usable = self.updates > 0
        usable[0] = True
        slot = torch.where(usable[s], s, torch.zeros_like(s))
        x_hat = (x - self.running_mean[slot]) / torch.sqrt(self.running_var[slot] + self.eps)
        return self._affine(x_hat, s, known)

    def _affine(self, x_hat: torch.Tensor, s: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma * torch.where(known, self.gamma_slot[s], torch.ones_like(self.gamma_slot[s]))
        beta = self.beta + torch.where(known, self.beta_slot[s], torch.zeros_like(self.beta_slot[s]))
        return gamma * x_hat + beta


class StarLinear(nn.Module):
    """y = x (W ⊙ W_s) + b + b_s for the row's scenario s; slot 0: y = x W + b (the centre)."""

    def __init__(self, slots: int, in_dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.slot_weight = nn.Parameter(torch.ones(slots, in_dim, out_dim))  # row 0 unused
        self.slot_bias = nn.Parameter(torch.zeros(slots, out_dim))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.out_dim)
        for k in torch.unique(s).tolist():
            idx = torch.nonzero(s == k, as_tuple=True)[0]
            if k == 0:
                y = x[idx] @ self.weight + self.bias
            else:
                y = x[idx] @ (self.weight * self.slot_weight[k]) + self.bias + self.slot_bias[k]
            out = out.index_copy(0, idx, y)
        return out


@register_model
class STAR(MultiScenarioModel):
    name = "star"

    def __init__(
        self,
        encoder: FeatureEncoder,
        hidden: Sequence[int] = (256, 128, 64),
        aux: Sequence[int] = (64,),
        aux_embedding_dim: int = 8,
        dropout: float = 0.1,
        partitioned_norm: bool = True,
        pn_min_rows: int = 8,
        **common: Any,
    ):
        hidden, aux = [int(h) for h in hidden], [int(h) for h in aux]
        super().__init__(
            encoder,
            hidden=hidden,
            aux=aux,
            aux_embedding_dim=int(aux_embedding_dim),
            dropout=float(dropout),
            partitioned_norm=bool(partitioned_norm),
            pn_min_rows=int(pn_min_rows),
            **common,
        )
        self.norm = (
            PartitionedNorm(self.num_slots, self.input_dim, min_rows=int(pn_min_rows)) if partitioned_norm else None
        )
        widths = [self.input_dim, *hidden, 1]
        self.layers = nn.ModuleList(StarLinear(self.num_slots, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.drop = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.scenario_embedding = nn.Embedding(self.num_slots, int(aux_embedding_dim), padding_idx=0)
        self.aux = MLP(self.input_dim + int(aux_embedding_dim), aux, out_dim=1) if aux else None

    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs(batch, extra)
        s = self.slots(batch)
        h = self.norm(x, s) if self.norm is not None else x
        for i, layer in enumerate(self.layers):
            h = layer(h, s)
            if i < len(self.layers) - 1:
                h = self.drop(torch.relu(h))
        logit = h.squeeze(-1)
        if self.aux is not None:
            logit = logit + self.aux(torch.cat([x, self.scenario_embedding(s)], dim=1)).squeeze(-1)
        return logit

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        if slot == 0:
            return []  # an unknown scenario has no parameters of its own: it is the centre
        out = self._embedding_slot_parameters(slot) + [(self.scenario_embedding.weight, slot)]
        for layer in self.layers:
            out += [(layer.slot_weight, slot), (layer.slot_bias, slot)]
        if self.norm is not None:
            out += [(self.norm.gamma_slot, slot), (self.norm.beta_slot, slot)]
        return out
