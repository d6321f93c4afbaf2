"""MMoE for scenarios (Ma et al., KDD 2018): shared experts, a softmax gate and a tower per scenario.

Each row is mixed by its own scenario's gate and scored by its scenario's tower. Slot 0 holds a shared gate and
tower, the fallback for a scenario unseen in training (trained by `scenario_dropout`, see `MultiScenarioModel` in ctrflow/models/base.py).
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
from ctrflow.models.blocks.scenario import ScenarioTowers, module_params


@register_model
class MMoE(MultiScenarioModel):
    name = "mmoe"

    def __init__(
        self,
        encoder: FeatureEncoder,
        experts: int = 4,
        expert: Sequence[int] = (128, 64),
        tower: Sequence[int] = (64,),
        dropout: float = 0.1,
        batch_norm: bool = False,
        **common: Any,
    ):
        expert, tower = [int(h) for h in expert], [int(h) for h in tower]
        if int(experts) < 1 or not expert:
            raise ValueError(f"mmoe: needs experts >= 1 and a non-empty expert MLP, got {experts}, {expert}")
        super().__init__(
            encoder,
            experts=int(experts),
            expert=expert,
            tower=tower,
            dropout=float(dropout),
            batch_norm=bool(batch_norm),
            **common,
        )
        self.n_experts = int(experts)
        self.experts = nn.ModuleList(
            MLP(self.input_dim, expert, dropout=float(dropout), batch_norm=bool(batch_norm)) for _ in range(self.n_experts)
        )
        # every slot's gate in one matrix: [B, slots * E] → the row's own slot
        self.gates = nn.Linear(self.input_dim, self.num_slots * self.n_experts)
        self.towers = ScenarioTowers(self.num_slots, expert[-1], tower, dropout=float(dropout), batch_norm=bool(batch_norm))

    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs(batch, extra)
        s = self.slots(batch)
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, d]
        logits = self.gates(x).view(-1, self.num_slots, self.n_experts)
        gate = torch.softmax(logits[torch.arange(len(s), device=s.device), s], dim=-1)  # [B, E]
        h = torch.einsum("be,bed->bd", gate, outs)
        return self.towers(h, s)

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        rows = range(slot * self.n_experts, (slot + 1) * self.n_experts)
        gate = [(self.gates.weight, r) for r in rows] + [(self.gates.bias, r) for r in rows]
        return self._embedding_slot_parameters(slot) + gate + module_params(self.towers.towers[slot])
