"""Turns a feature frame (one row per event, raw values) into the arrays every model reads.

The encoder is fitted on the training split only and saved beside the model, so serving encodes a request
exactly as training did. Index 0 is reserved in every vocabulary for "unknown or padding": an id never seen
in training is scored with that fallback instead of being refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ctrflow.data.spec import FeatureSpec, FieldKind, FieldSpec


class FeatureEncoder:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.vocabs: dict[str, list] = {}
        self.boundaries: dict[str, list[float]] = {}

    # ---- fitting -------------------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> FeatureEncoder:
        for f in self.spec.fields:
            if f.column not in frame.columns:
                raise KeyError(f"field '{f.name}': column '{f.column}' is not in the frame ({list(frame.columns)})")
            if f.kind is FieldKind.CATEGORICAL:
                self.vocabs[f.name] = _sorted_unique(frame[f.column].dropna().to_numpy())
            elif f.kind is FieldKind.SEQUENCE and not f.vocab_of:
                self.vocabs[f.name] = _sorted_unique(_flatten(frame[f.column])[0])
            elif f.kind is FieldKind.NUMERIC:
                values = pd.to_numeric(frame[f.column], errors="coerce").dropna().to_numpy(dtype=float)
                qs = np.quantile(values, np.linspace(0, 1, f.buckets + 1)[1:-1]) if len(values) else np.array([])
                self.boundaries[f.name] = np.unique(qs).tolist()
        return self

    def vocab_size(self, name: str) -> int:
        """Number of token ids of a field, the reserved 0 included."""
        f = self.spec[name]
        if f.kind is FieldKind.NUMERIC:
            return len(self.boundaries[f.name]) + 2
        if f.kind is FieldKind.EMBEDDING:
            raise ValueError(f"field '{name}' is an embedding; it has no vocabulary")
        return len(self.vocabs[f.vocab_of or f.name]) + 1

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {f.name: self.vocab_size(f.name) for f in self.spec.fields if f.kind is not FieldKind.EMBEDDING}

    # ---- transforming --------------------------------------------------------------------------------
    def transform(self, frame: pd.DataFrame, with_label: bool = True) -> dict[str, np.ndarray]:
        """Arrays keyed by field name (+ 'label'): int64 ids, int64 [n, max_len] sequences, float32 vectors."""
        out: dict[str, np.ndarray] = {}
        for f in self.spec.fields:
            col = frame[f.column] if f.column in frame.columns else pd.Series([None] * len(frame), index=frame.index)
            out[f.name] = self._encode(f, col)
        if with_label:
            if self.spec.label not in frame.columns:
                raise KeyError(f"column '{self.spec.label}' (the label) is not in the frame")
            out["label"] = frame[self.spec.label].to_numpy(dtype=np.float32)
        return out

    def _encode(self, f: FieldSpec, col: pd.Series) -> np.ndarray:
        if f.kind is FieldKind.CATEGORICAL:
            return _lookup(self.vocabs[f.name], col.to_numpy())
        if f.kind is FieldKind.NUMERIC:
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
            ids = np.searchsorted(np.asarray(self.boundaries[f.name]), values, side="right") + 1
            ids[np.isnan(values)] = 0
            return ids.astype(np.int64)
        if f.kind is FieldKind.SEQUENCE:
            flat, lengths = _flatten(col)
            codes = _lookup(self.vocabs[f.vocab_of or f.name], flat)
            out = np.zeros((len(col), f.max_len), dtype=np.int64)
            ends = np.cumsum(lengths)
            for row, (end, n) in enumerate(zip(ends, lengths)):
                if n:
                    keep = min(n, f.max_len)  # the most recent values are at the end of the list
                    out[row, :keep] = codes[end - keep : end]
            return out
        # EMBEDDING: missing vectors become zeros
        out = np.zeros((len(col), f.dim), dtype=np.float32)
        for row, v in enumerate(col.to_numpy()):
            if v is not None and not (np.isscalar(v) and pd.isna(v)):
                arr = np.asarray(v, dtype=np.float32)
                if arr.shape != (f.dim,):
                    raise ValueError(f"field '{f.name}': expected a vector of length {f.dim}, got shape {arr.shape}")
                out[row] = arr
        return out

    # ---- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "vocabs": self.vocabs, "boundaries": self.boundaries}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureEncoder:
        enc = cls(FeatureSpec.from_dict(d["spec"]))
        enc.vocabs = d["vocabs"]
        enc.boundaries = d["boundaries"]
        return enc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoder:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _json_default(o: object) -> object:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _sorted_unique(values: np.ndarray) -> list:
    uniq = pd.unique(pd.Series(values))
    try:
        uniq = sorted(uniq)
    except TypeError:
        uniq = sorted(uniq, key=str)
    return [v.item() if hasattr(v, "item") else v for v in uniq]


def _lookup(vocab: list, values: np.ndarray) -> np.ndarray:
    """Vocabulary index + 1 for each value; 0 for unknown or missing."""
    index = pd.Index(vocab)
    values = np.asarray(values)
    if values.dtype == object and len(vocab) and isinstance(vocab[0], (int, np.integer)):
        values = _exact_ints(values)
    codes = index.get_indexer(values)
    return (codes + 1).astype(np.int64)


def _exact_ints(values: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """Object cells (ints, integral floats, digit text, None) as nullable int64, every int kept exact.

    pd.to_numeric would go through float64 as soon as one cell is missing, and float64 holds ints exactly only up to
    2**53: a hashed id near 2**62 would then be looked up as its neighbour's token. Anything else is missing (NA).
    """

    def exact(v: object) -> int | None:
        if isinstance(v, bool | np.bool_):
            return None
        if isinstance(v, int | np.integer):
            return int(v) if -(2**63) <= int(v) < 2**63 else None
        if isinstance(v, float | np.floating) and np.isfinite(v) and float(v).is_integer():
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            return exact(int(v.strip()))
        return None

    return pd.array([exact(v) for v in values], dtype="Int64")


def _flatten(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    cells = [c if c is not None and not (np.isscalar(c) and pd.isna(c)) else [] for c in col.to_numpy()]
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    flat = np.concatenate([np.asarray(c) for c in cells]) if lengths.sum() else np.array([], dtype=object)
    return flat, lengths
