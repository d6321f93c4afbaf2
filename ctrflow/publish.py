"""What a training step hands to its orchestrator: the KFP components' one way to publish a training result.

KFP artifacts are used duck-typed (`.metadata`, `.log_metric`), so this module needs no kfp import and works with
any object that has them (tests construct `kfp.dsl.Model` / `kfp.dsl.Metrics` directly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SPLITS = ("valid", "test")
METRICS = ("auc", "logloss", "gauc")


def publish_training(result: Mapping[str, Any], model: Any, metrics: Any) -> float:
    """Record a training step's result on its KFP outputs; returns the validation AUC (the component's output).

    `result`: what `ctrflow.steps.train_step` / `finetune_step` / `gsvr_step` return ({"model", "valid_auc",
    "test_auc", "metrics": {split: {auc, logloss, gauc, ...}}}). `model` gets the model name and both AUCs as
    metadata; `metrics` gets `<split>_<metric>` for every split and metric present (a metric that is undefined on a
    split, e.g. gAUC without users having both labels, is None and left out). Raises KeyError when `result` has no
    "model" or "valid_auc" (not a training result).
    """
    model.metadata.update({"model": result["model"], "valid_auc": result["valid_auc"], "test_auc": result.get("test_auc")})
    for split in SPLITS:
        for key in METRICS:
            value = (result.get("metrics", {}).get(split) or {}).get(key)
            if value is not None:
                metrics.log_metric(f"{split}_{key}", float(value))
    return float(result["valid_auc"])
