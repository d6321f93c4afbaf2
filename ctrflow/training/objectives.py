"""What the one training loop optimises and how it scores an epoch on the validation rows.

An objective has two methods, as FuxiCTR's `BaseModel` splits `compute_loss` from `evaluate`:

    losses = objective.loss(model, batch)              # {"loss": optimised scalar, ...named parts, logged}
    scores = objective.validate(model, valid, batch_size)   # {"valid_<metric>": float | None}

and names the metric the trainer falls back to when AUC is undefined (`loss_metric`). The trainer picks the
monitored metric among the `validate` keys (`TrainConfig.monitor`, with its direction).

- `CTR`: the model's own `loss(batch)`. That is binary cross-entropy for most models; models add named terms
  there, so the variational ELBO of GSVR (BCE + β·(KL_user + KL_item), β warmed up through `set_epoch`), DMAE's
  distribution loss and DGenCTR's auxiliary denoising term all train as `CTR`. Validation: AUC and logloss of the
  click probabilities (ctrflow.training.metrics).
- `Denoising`: DGenCTR's discrete-diffusion pre-training loss (`model.diffusion_loss`). Validation: the denoising
  loss under a fixed corruption (a seeded generator, so epochs are comparable) and, when the label is diffused,
  the zero-shot CTR AUC of the pre-trained label head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from ctrflow.training.metrics import auc, logloss, predict


class Objective(Protocol):
    name: str
    metrics: tuple[str, ...]  # the keys `validate` returns: what `TrainConfig.monitor` may name
    loss_metric: str  # a validation metric that is always defined (the fallback when AUC is not)
    log_skip: tuple[str, ...]  # record keys left out of the epoch log line (still in the history)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def validate(self, model: nn.Module, valid: Mapping[str, torch.Tensor], batch_size: int) -> dict: ...


def _clean(x: float) -> float | None:
    return None if x != x else float(x)  # NaN (undefined) -> None


class CTR:
    """Click-through-rate training: the model's `loss(batch)` (BCE plus whatever terms the model adds)."""

    name = "ctr"
    metrics = ("valid_auc", "valid_logloss")
    loss_metric = "valid_logloss"
    log_skip: tuple[str, ...] = ()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model.loss(batch)

    def validate(self, model: nn.Module, valid: Mapping[str, torch.Tensor], batch_size: int) -> dict:
        scores = predict(model, dict(valid), batch_size)
        labels = valid["label"].numpy()
        return {"valid_auc": _clean(auc(labels, scores)), "valid_logloss": _clean(logloss(labels, scores))}


class Denoising:
    """DGenCTR's diffusion pre-training: `model.diffusion_loss(batch)` (absorbing-mask denoising).

    `seed` fixes the validation corruption (the same masks every epoch). Rows may carry a bool `label_known`
    (label-scarce pre-training): their label is masked and never a target where it is False.
    """

    name = "denoising"
    metrics = ("valid_loss", "valid_zero_shot_auc")
    loss_metric = "valid_loss"
    log_skip: tuple[str, ...] = ("train_field_",)  # per-field losses: in the history, too many for a log line

    def __init__(self, seed: int = 12345):
        self.seed = int(seed)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model.diffusion_loss(batch)
        out.pop("masked", None)  # a count, not a loss: averaging it over rows means nothing
        return out

    @torch.no_grad()
    def validate(self, model: nn.Module, valid: Mapping[str, torch.Tensor], batch_size: int) -> dict:
        was_training = model.training
        model.eval()
        try:
            gen = torch.Generator().manual_seed(self.seed)
            n_rows = len(valid["label"])
            total, n = 0.0, 0
            for start in range(0, n_rows, batch_size):
                batch = {k: v[start : start + batch_size] for k, v in valid.items()}
                total += float(model.diffusion_loss(batch, generator=gen)["loss"]) * len(batch["label"])
                n += len(batch["label"])
            out = {"valid_loss": total / max(n, 1)}
            if getattr(model, "label_in_diffusion", False):
                scores = predict(model, dict(valid), batch_size)
                out["valid_zero_shot_auc"] = _clean(auc(valid["label"].numpy(), scores))
            return out
        finally:
            model.train(was_training)


OBJECTIVES = {"ctr": CTR, "denoising": Denoising}
