"""KFP v2 lightweight components: one per step, each a thin wrapper over `ctrflow.steps`.

Imports live inside the function bodies (KFP serialises the functions). The base image is configurable with
$CTRFLOW_BASE_IMAGE at compile time; it must have ctrflow installed (see the Dockerfile). Locally the KFP
SubprocessRunner runs them in this interpreter, so the image is not used.
"""

from __future__ import annotations

import os

BASE_IMAGE = os.environ.get("CTRFLOW_BASE_IMAGE", "ctrflow/python3.11:0.1.0")

from components.deploy import deploy_model  # noqa: E402
from components.drift import check_drift, check_quality, request_retraining  # noqa: E402
from components.embed import embed_items  # noqa: E402
from components.features import build_features  # noqa: E402
from components.finetune import finetune_model  # noqa: E402
from components.gate import promotion_gate  # noqa: E402
from components.gsvr import train_multiscenario  # noqa: E402
from components.pretrain import pretrain_model  # noqa: E402
from components.pytorchjob import train_pytorchjob  # noqa: E402
from components.register import register_model  # noqa: E402
from components.train import train_model  # noqa: E402
from components.validate import validate_data  # noqa: E402

__all__ = [
    "BASE_IMAGE",
    "build_features",
    "check_drift",
    "check_quality",
    "deploy_model",
    "embed_items",
    "finetune_model",
    "pretrain_model",
    "promotion_gate",
    "register_model",
    "request_retraining",
    "train_model",
    "train_multiscenario",
    "train_pytorchjob",
    "validate_data",
]
