"""params.yaml: the single source of hyper-parameters, thresholds and locations."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def params_path(path: str | Path | None = None) -> Path:
    """Explicit path, else $CTRFLOW_PARAMS, else ./params.yaml, else the one beside the package."""
    for candidate in (path, os.environ.get("CTRFLOW_PARAMS"), "params.yaml", REPO_ROOT / "params.yaml"):
        if candidate and Path(candidate).exists():
            return Path(candidate).resolve()
    raise FileNotFoundError(f"params.yaml not found (tried {path!r}, $CTRFLOW_PARAMS, ./params.yaml, {REPO_ROOT})")


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = yaml.safe_load(params_path(path).read_text()) or {}
    if overrides:
        params = merge(params, overrides)
    return params


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge `overrides` into a copy of `base`; dotted keys ("train.epochs") address nested values."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
            target[parts[-1]] = merge(target[parts[-1]], value)
        else:
            target[parts[-1]] = value
    return out


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) into an overrides dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override '{pair}' must look like key.sub=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def from_struct(params: Any) -> Any:
    """Undo KFP's protobuf Struct round trip, which turns every number into a float (50 → 50.0).

    Integral floats become ints again: sizes and counts need ints, and an integral float used as a rate or
    threshold behaves the same as an int.
    """
    if isinstance(params, dict):
        return {k: from_struct(v) for k, v in params.items()}
    if isinstance(params, list):
        return [from_struct(v) for v in params]
    if isinstance(params, float) and params.is_integer():
        return int(params)
    return params
