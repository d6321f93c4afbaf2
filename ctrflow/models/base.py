"""The one model interface every CTR model implements, so one trainer and one scorer serve them all.

    model = SomeModel(encoder, **params)
    logits = model(batch)            # batch: dict[str, Tensor] from FeatureEncoder.transform -> to_tensors
    losses = model.loss(batch)       # {"loss": total, ...named parts}
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ctrflow.data.encoding import FeatureEncoder


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Encoder arrays to tensors without copying (int64 ids, float32 vectors and label)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class CTRModel(nn.Module):
    """Base class: subclasses set `name` and implement `forward`; override `loss` to add terms."""

    name: str = "base"

    def __init__(self, encoder: FeatureEncoder, **params: object):
        super().__init__()
        self.encoder = encoder
        self.params = dict(params)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return {"loss": bce, "bce": bce}

    @torch.no_grad()
    def predict_proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(batch))
        finally:
            self.train(was_training)
