"""CTR metrics: AUC, logloss, gAUC (user-grouped AUC) and per-scenario AUC.

AUC is undefined when the labels hold one class (a tiny scenario, a cold user): the functions here return NaN
then, never raise, and `evaluate` reports it as None so its result stays valid JSON.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score

from ctrflow.data.encoding import FeatureEncoder

_EPS = 1e-7


def _as_1d(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _check(labels: np.ndarray, scores: np.ndarray) -> None:
    if len(labels) != len(scores):
        raise ValueError(f"metrics: {len(labels)} labels but {len(scores)} scores")


def auc(labels: object, scores: object) -> float:
    """ROC AUC; NaN when the labels hold fewer than two classes (undefined)."""
    y, s = _as_1d(labels), _as_1d(scores).astype(np.float64)
    _check(y, s)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def logloss(labels: object, scores: object) -> float:
    """Binary cross-entropy of probabilities (clipped to [1e-7, 1-1e-7]); NaN for no rows."""
    y, p = _as_1d(labels), _as_1d(scores).astype(np.float64)
    _check(y, p)
    if len(y) == 0:
        return float("nan")
    return float(log_loss(y, np.clip(p, _EPS, 1 - _EPS), labels=[0, 1]))


def gauc(labels: object, scores: object, groups: object) -> float:
    """Impression-weighted mean of per-group AUC, over the groups that hold both classes.

    Computed for all groups at once from within-group average ranks (Mann-Whitney U), which equals sklearn's AUC
    per group, ties included, without a Python loop over millions of users. NaN when no group has both classes.
    """
    y, s, g = _as_1d(labels).astype(np.float64), _as_1d(scores), _as_1d(groups)
    _check(y, s)
    if len(g) != len(y):
        raise ValueError(f"gauc: {len(y)} labels but {len(g)} groups")
    df = pd.DataFrame({"g": g, "y": y, "s": s.astype(np.float64)})
    df["r"] = df.groupby("g", sort=False)["s"].rank(method="average")
    df["rp"] = df["r"] * df["y"]
    per = df.groupby("g", sort=False).agg(n=("y", "size"), pos=("y", "sum"), rank_pos=("rp", "sum"))
    per["neg"] = per["n"] - per["pos"]
    per = per[(per["pos"] > 0) & (per["neg"] > 0)]
    if per.empty:
        return float("nan")
    group_auc = (per["rank_pos"] - per["pos"] * (per["pos"] + 1) / 2) / (per["pos"] * per["neg"])
    return float((group_auc * per["n"]).sum() / per["n"].sum())


def scenario_auc(labels: object, scores: object, scenarios: object) -> dict[str, float]:
    """AUC per scenario name (NaN for a scenario whose rows hold one class), in sorted name order."""
    y, s, sc = _as_1d(labels), _as_1d(scores), _as_1d(scenarios)
    _check(y, s)
    if len(sc) != len(y):
        raise ValueError(f"scenario_auc: {len(y)} labels but {len(sc)} scenario values")
    names = sc.astype(str)
    return {name: auc(y[names == name], s[names == name]) for name in sorted(set(names.tolist()))}


@torch.no_grad()
def predict(model: torch.nn.Module, batch: dict[str, torch.Tensor], batch_size: int = 8192) -> np.ndarray:
    """Click probabilities for every row of a tensor batch, in chunks, in eval mode (the mode is restored)."""
    n = _rows(batch)
    was_training = model.training
    model.eval()
    try:
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in batch.items()}
            out[start : start + batch_size] = torch.sigmoid(model(chunk)).float().cpu().numpy()
        return out
    finally:
        model.train(was_training)


def _rows(batch: dict[str, torch.Tensor]) -> int:
    if not batch:
        raise ValueError("empty batch: no tensors")
    lengths = {k: len(v) for k, v in batch.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch tensors differ in row count: {lengths}")
    return next(iter(lengths.values()))


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def format_value(value: object, digits: int = 4) -> str:
    """One metric for a log line: floats with `digits` decimals; None or NaN (undefined, e.g. AUC on a one-class
    split) as "n/a", so a log call never formats None as a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}"
    return str(value)


def format_metrics(record: dict, skip: tuple[str, ...] = ()) -> str:
    """`key=value, ...` for a log line (see `format_value`); keys starting with one of `skip` are left out."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in record.items() if not k.startswith(skip))


def one_class_note(labels: object) -> str | None:
    """Why AUC is undefined on these labels ("all N rows are negatives"), or None when both classes are present."""
    y = _as_1d(labels)
    if len(y) == 0:
        return "it has no rows"
    values = np.unique(y)
    if len(values) >= 2:
        return None
    kind = "positives" if float(values[0]) == 1.0 else "negatives"
    return f"all {len(y)} rows are {kind}"


def evaluate(
    model: torch.nn.Module,
    batch_tensors: dict[str, torch.Tensor],
    encoder: FeatureEncoder,
    user_ids: object | None = None,
    batch_size: int = 8192,
    subsets: dict[str, object] | None = None,
) -> dict:
    """Every metric of one split: auc, logloss, gauc, scenario_auc {name: auc}, n (rows), and for each named row
    subset (`subsets`: name -> bool mask [n], e.g. cold items) `<name>_auc` and `<name>_rows` (absent when the
    subset is empty). The one place metrics are computed: the pipeline steps, the benchmarks and GSVR all use it.

    Undefined values are None (JSON-safe). gAUC groups by `user_ids` when given (raw ids); otherwise by the
    encoded user id, leaving out id 0 (users unknown to the encoder cannot be told apart). Scenario ids are
    decoded to names through the encoder's vocabulary (id = vocab index + 1; 0 is reported as "unknown").
    """
    if "label" not in batch_tensors:
        raise KeyError("evaluate: the batch has no 'label' tensor (transform the frame with with_label=True)")
    spec = encoder.spec
    scores = predict(model, batch_tensors, batch_size)
    labels = batch_tensors["label"].cpu().numpy()

    if user_ids is not None:
        groups = _as_1d(user_ids)
        keep = np.ones(len(groups), dtype=bool)
    else:
        groups = batch_tensors[spec.user_key].cpu().numpy()
        keep = groups != 0

    out: dict = {
        "auc": _none_if_nan(auc(labels, scores)),
        "logloss": _none_if_nan(logloss(labels, scores)),
        "gauc": _none_if_nan(gauc(labels[keep], scores[keep], groups[keep])),
    }
    if spec.scenario_field in batch_tensors:
        vocab = np.asarray(["unknown", *map(str, encoder.vocabs[spec.scenario_field])], dtype=object)
        names = vocab[batch_tensors[spec.scenario_field].cpu().numpy()]
        out["scenario_auc"] = {k: _none_if_nan(v) for k, v in scenario_auc(labels, scores, names).items()}
    for name, mask in (subsets or {}).items():
        m = _as_1d(mask).astype(bool)
        if len(m) != len(labels):
            raise ValueError(f"evaluate: subset '{name}' has {len(m)} flags for {len(labels)} rows")
        if m.any():
            out[f"{name}_auc"] = _none_if_nan(auc(labels[m], scores[m]))
            out[f"{name}_rows"] = int(m.sum())
    out["n"] = int(len(labels))
    return out
