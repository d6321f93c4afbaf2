"""The plain MLP every model's towers, heads and experts are made of."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear → ReLU → Dropout per hidden layer, then an optional linear head to `out_dim`."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
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

