"""Shared-Bottom multi-scenario model: one shared MLP, one tower per scenario.

The simplest multi-scenario baseline (Caruana 1997, used with scenarios as tasks in Scenario-Wise Rec): every
scenario shares the bottom, each has its own tower. Slot 0 is the shared tower that an unknown scenario falls back
to at serving; `scenario_dropout` trains it (see `MultiScenarioModel` in `ctrflow/models/base.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

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
        embedding_dim: int = 16,
        bottom: Sequence[int] = (256, 128),
        tower: Sequence[int] = (64,),
        dropout: float = 0.1,
        scenario_dropout: float = 0.05,
        scenarios: Sequence[str] | None = None,
        sparse: bool = False,
        fields: Sequence[str] | None = None,
        extra_dim: int = 0,
    ):
        bottom, tower = [int(h) for h in bottom], [int(h) for h in tower]
        if not bottom:
            raise ValueError("sharedbottom: bottom needs at least one layer")
        super().__init__(
            encoder,
            embedding_dim=embedding_dim,
            fields=fields,
            sparse=sparse,
            scenario_dropout=scenario_dropout,
            scenarios=scenarios,
            extra_dim=extra_dim,
            bottom=bottom,
            tower=tower,
            dropout=float(dropout),
        )
        self.bottom = MLP(self.input_dim, bottom, dropout=float(dropout))
        self.towers = ScenarioTowers(self.num_slots, self.bottom.output_dim, tower, dropout=float(dropout))

    def score(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.towers(self.bottom(self.inputs(batch, extra)), self.slots(batch))

    def slot_parameters(self, slot: int) -> list[tuple[nn.Parameter, int | None]]:
        return self._embedding_slot_parameters(slot) + module_params(self.towers.towers[slot])
