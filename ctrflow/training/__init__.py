"""Training: the one trainer (fit, early stop on a monitored metric, checkpoint/resume), its objectives (CTR,
diffusion denoising), the train-and-save recipe of the steps and benchmarks (`recipe`), diffusion pre-training
(`pretrain`), metrics and the model artifact."""

from __future__ import annotations

from ctrflow.training.artifact import LoadedModel, Scorer, load_model_artifact, save_model_artifact
from ctrflow.training.metrics import auc, evaluate, gauc, logloss, predict, scenario_auc
from ctrflow.training.trainer import TrainConfig, Trainer, TrainResult, seed_everything

__all__ = [
    "LoadedModel",
    "Scorer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "auc",
    "evaluate",
    "gauc",
    "load_model_artifact",
    "logloss",
    "predict",
    "save_model_artifact",
    "scenario_auc",
    "seed_everything",
]
