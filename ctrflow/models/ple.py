"""PLE for scenarios (Tang et al., RecSys 2020): shared and scenario-specific experts, progressive extraction.

Each extraction level has shared experts and, per scenario, its own experts. A row follows its own scenario: the
scenario's gate mixes [its specific experts; the shared experts] into the row's scenario path, and a shared gate
mixes the same experts into the shared path that feeds the next level's shared experts. After the last level the
scenario's tower scores the row. Only the row's own scenario experts run (routing), so the cost does not grow with
the number of scenarios.

Slot 0 (an unknown scenario) has no specific experts: its gate sees the shared experts only and its tower is the
shared tower (trained by `scenario_dropout`, see `MultiScenarioModel` in ctrflow/models/base.py).
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
from ctrflow.models.blocks.scenario import ScenarioTowers, module_params, route


class _ExpertGroup(nn.Module):
    """n experts on the same input, outputs concatenated: [B, in] → [B, n * d]."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int], dropout: float, batch_norm: bool = False):
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, hidden, dropout=dropout, batch_norm=batch_norm) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(x) for e in self.experts], dim=-1)


class _Nothing(nn.Module):
    """Slot 0's "specific experts": none (zeros, masked out by its gate)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.width)


class _Level(nn.Module):
    def __init__(
        self,
        slots: int,
        in_dim: int,
        n_shared: int,
        n_specific: int,
        hidden: Sequence[int],
        dropout: float,
        last: bool,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.slots, self.n_shared, self.n_specific = slots, n_shared, n_specific
        self.dim = int(hidden[-1])
        self.shared = _ExpertGroup(n_shared, in_dim, hidden, dropout, batch_norm)
        self.specific = nn.ModuleList(
            [_Nothing(n_specific * self.dim)]
            + [_ExpertGroup(n_specific, in_dim, hidden, dropout, batch_norm) for _ in range(slots - 1)]
        )
        n = n_specific + n_shared
        self.task_gates = nn.Linear(in_dim, slots * n)
        self.shared_gate = None if last else nn.Linear(in_dim, n)

    def forward(self, t: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(s)
        spec = route(t, s, self.specific, self.n_specific * self.dim).view(b, self.n_specific, self.dim)
        shared = self.shared(g).view(b, self.n_shared, self.dim)
        experts = torch.cat([spec, shared], dim=1)  # [B, n_specific + n_shared, d]
        unknown = (s == 0).unsqueeze(-1)  # slot 0: shared experts only
        mask = torch.cat([unknown.expand(b, self.n_specific), torch.zeros_like(unknown).expand(b, self.n_shared)], 1)
        logits = self.task_gates(t).view(b, self.slots, -1)[torch.arange(b, device=s.device), s]
        t_next = torch.einsum("bn,bnd->bd", torch.softmax(logits.masked_fill(mask, float("-inf")), -1), experts)
        if self.shared_gate is None:
            return t_next, g
        g_logits = self.shared_gate(g).masked_fill(mask, float("-inf"))
        return t_next, torch.einsum("bn,bnd->bd", torch.softmax(g_logits, -1), experts)


@register_model
class PLE(MultiScenarioModel):
    name = "ple"

    def __init__(
        self,
        encoder: FeatureEncoder,
        levels: int = 2,
        shared_experts: int = 2,
        specific_experts: int = 1,
        expert: Sequence[int] = (64,),
        tower: Sequence[int] = (64,),
        dropout: float = 0.1,
        batch_norm: bool = False,
        **common: Any,
    ):
        expert, tower = [int(h) for h in expert], [int(h) for h in tower]
        if int(levels) < 1 or int(shared_experts) < 1 or int(specific_experts) < 1 or not expert:
            raise ValueError(
                f"ple: needs levels, shared_experts, specific_experts >= 1 and a non-empty expert MLP, got "
                f"{levels}, {shared_experts}, {specific_experts}, {expert}"
            )
        super().__init__(
            encoder,
            levels=int(levels),
            shared_experts=int(shared_experts),
            specific_experts=int(specific_experts),
            expert=expert,
            tower=tower,
            dropout=float(dropout),
            batch_norm=bool(batch_norm),
            **common,
        )
        self.levels = nn.ModuleList(
            _Level(
                self.num_slots,
                self.input_dim if i == 0 else expert[-1],
                int(shared_experts),
                int(specific_experts),
                expert,
                float(dropout),
                last=i == int(levels) - 1,
                batch_norm=bool(batch_norm),
            )
            for i in range(int(levels))
        )
        self.towers = ScenarioTowers(self.num_slots, expert[-1], tower, dropout=float(dropout), batch_norm=bool(batch_norm))

    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs(batch, extra)
        s = self.slots(batch)
        t, g = x, x
        for level in self.levels:
            t, g = level(t, g, s)
        return self.towers(t, s)

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        out = self._embedding_slot_parameters(slot) + module_params(self.towers.towers[slot])
        for level in self.levels:
            n = level.n_specific + level.n_shared
            rows = range(slot * n, (slot + 1) * n)
            out += [(level.task_gates.weight, r) for r in rows] + [(level.task_gates.bias, r) for r in rows]
            out += module_params(level.specific[slot])
        return out
