"""The model artifact: one self-contained folder that the registry stores and the service loads.

    model.pt       the model's state dict
    model.json     {"name", "params"}: enough to rebuild the model through the registry (+ versions, extra)
    encoder.json   the fitted FeatureEncoder (spec, vocabularies, buckets): serving encodes exactly as training did
    metrics.json   evaluation results
    params.json    the run's parameters (provenance)

Loading needs nothing but the folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models import build_model
from ctrflow.models.base import CTRModel, to_tensors
from ctrflow.training.metrics import predict

FILES = ("model.pt", "model.json", "encoder.json", "metrics.json", "params.json")
FORMAT_VERSION = 1


def _jsonable(x: object) -> object:
    """NaN → None, numpy scalars/arrays → Python, tuples → lists: strict JSON that every reader accepts."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False))


def save_model_artifact(
    directory: str | Path,
    model: CTRModel,
    encoder: FeatureEncoder,
    metrics: dict,
    params: dict,
    extra: dict | None = None,
) -> Path:
    """Write the artifact folder (created if needed; existing files are overwritten) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = getattr(model, "name", "")
    if not name or name == CTRModel.name:
        raise ValueError(f"save_model_artifact: {type(model).__name__} has no registered model name")
    torch.save(model.state_dict(), directory / "model.pt")
    _write_json(
        directory / "model.json",
        {
            "format_version": FORMAT_VERSION,
            "name": name,
            "params": getattr(model, "params", {}),
            "torch_version": torch.__version__,
            "extra": extra or {},
        },
    )
    encoder.save(directory / "encoder.json")
    _write_json(directory / "metrics.json", metrics)
    _write_json(directory / "params.json", params)
    return directory


@dataclass
class LoadedModel:
    model: CTRModel  # in eval mode
    encoder: FeatureEncoder
    metrics: dict
    params: dict
    name: str
    extra: dict = field(default_factory=dict)
    directory: Path | None = None

    def scorer(self, batch_size: int = 8192) -> Scorer:
        return Scorer(self.model, self.encoder, batch_size=batch_size)


def load_model_artifact(directory: str | Path) -> LoadedModel:
    """Rebuild the model from an artifact folder, weights loaded, in eval mode."""
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).exists()]
    if missing:
        raise FileNotFoundError(f"model artifact {directory}: missing {missing} (expected {list(FILES)})")
    meta = json.loads((directory / "model.json").read_text())
    encoder = FeatureEncoder.load(directory / "encoder.json")
    model = build_model(meta["name"], encoder, meta.get("params", {}))
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(
        model=model,
        encoder=encoder,
        metrics=json.loads((directory / "metrics.json").read_text()),
        params=json.loads((directory / "params.json").read_text()),
        name=meta["name"],
        extra=meta.get("extra", {}),
        directory=directory,
    )


class Scorer:
    """Raw feature frame in, click probabilities out: the one scoring path of batch jobs and the service.

    Ids the encoder never saw are scored with the "unknown" index 0. A column of the spec that is absent from
    the frame is an error (a missing join, not an unknown value) unless `allow_missing_columns=True`, in which
    case the field is encoded as unknown.
    """

    def __init__(
        self, model: CTRModel, encoder: FeatureEncoder, batch_size: int = 8192, allow_missing_columns: bool = False
    ):
        self.model = model.eval()
        self.encoder = encoder
        self.batch_size = batch_size
        self.allow_missing_columns = allow_missing_columns
        self.columns = sorted({f.column for f in encoder.spec.fields})

    @classmethod
    def from_directory(cls, directory: str | Path, **kwargs: object) -> Scorer:
        loaded = load_model_artifact(directory)
        return cls(loaded.model, loaded.encoder, **kwargs)

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities (float32, one per row, in row order)."""
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"Scorer.score expects a pandas DataFrame, got {type(frame).__name__}")
        if len(frame) == 0:
            return np.zeros(0, dtype=np.float32)
        if not self.allow_missing_columns:
            missing = [c for c in self.columns if c not in frame.columns]
            if missing:
                raise KeyError(f"Scorer: columns {missing} are missing from the frame ({len(frame)} rows)")
        arrays = self.encoder.transform(frame, with_label=False)
        return predict(self.model, to_tensors(arrays), self.batch_size)
