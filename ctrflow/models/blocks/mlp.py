"""The plain MLP every model's towers, heads and experts are made of."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RowSafeBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch with its running statistics (a single row has no batch
    variance; routed sub-batches of a scenario can be that small) instead of raising."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class MLP(nn.Module):
    """Linear → (BatchNorm1d) → ReLU → Dropout per hidden layer, then an optional linear head to `out_dim`.

    `batch_norm` puts a BatchNorm1d after each hidden Linear, as torch-rechub's MLP (which the Scenario-Wise Rec
    benchmark's models are built from) does by default."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        dropout: float = 0.0,
        out_dim: int | None = None,
        batch_norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers.append(nn.Linear(width, int(h)))
            if batch_norm:
                layers.append(RowSafeBatchNorm(int(h)))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

