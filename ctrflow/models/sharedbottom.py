"""Shared-Bottom multi-scenario model: one shared MLP, one tower per scenario.

The simplest multi-scenario baseline (Caruana 1997, used with scenarios as tasks in Scenario-Wise Rec): every
scenario shares the bottom, each has its own tower. Slot 0 is the shared tower that an unknown scenario falls back
to at serving; `scenario_dropout` trains it (see `MultiScenarioModel` in `ctrflow/models/base.py`).
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
class SharedBottom(MultiScenarioModel):
    name = "sharedbottom"

    def __init__(
        self,
        encoder: FeatureEncoder,
        bottom: Sequence[int] = (256, 128),
        tower: Sequence[int] = (64,),
        dropout: float = 0.1,
        batch_norm: bool = False,
        **common: Any,
    ):
        bottom, tower = [int(h) for h in bottom], [int(h) for h in tower]
        if not bottom:
            raise ValueError("sharedbottom: bottom needs at least one layer")
        super().__init__(
            encoder,
            bottom=bottom,
            tower=tower,
            dropout=float(dropout),
            batch_norm=bool(batch_norm),
            **common,
        )
        self.bottom = MLP(self.input_dim, bottom, dropout=float(dropout), batch_norm=bool(batch_norm))
        self.towers = ScenarioTowers(
            self.num_slots, self.bottom.output_dim, tower, dropout=float(dropout), batch_norm=bool(batch_norm)
        )

    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.towers(self.bottom(self.inputs(batch, extra)), self.slots(batch))

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        return self._embedding_slot_parameters(slot) + module_params(self.towers.towers[slot])
