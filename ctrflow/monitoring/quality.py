"""Online quality from delayed clicks: the label feed joined to what was served, AUC and calibration over time.

The label feed is Parquet with one row per click event (or per feedback event: `clicked` 0 or 1):
``request_id`` (string), ``item_id`` (int64), ``clicked`` (0/1), ``timestamp`` (UTC). It is joined to the request
log by (request id, item id): a served row is **clicked** when a feed row of its key with ``clicked = 1`` has a
timestamp in ``[ts, ts + attribution_window_s]``; **not clicked** when none has and its window has closed (the feed
reaches past ``ts + window``); **pending** (left out) while its window is still open at the feed's last timestamp.
A click after the window, or of a key never served, is counted (``late_clicks``, ``unmatched_clicks``), not used.

Per group (everything, each scenario, each model, each time window of ``time_window``, each scenario in each window)
with at least ``min_labelled_rows`` labelled rows: online AUC (`ctrflow.training.metrics.auc`, NaN -> None for one
class), predicted CTR (mean score), observed CTR (click share) and their ratio. A group **breaches** when
``|observed / predicted - 1| > max_calibration_error`` *and* the clicks are significantly off the expected count
(z = (clicks - sum p) / sqrt(sum p(1-p)), two-sided p < ``pvalue_threshold``), or when its AUC is below
``min_online_auc`` (when set). A shadow / challenger model's logged scores (``shadow_score``, optional
``shadow_model``) are scored on the same labelled rows, beside the served model (AUC and its difference).

Verdicts and exit codes as drift: ``ok`` 0, ``breached`` 1, ``not_enough_data`` 3 (no group reached
``min_labelled_rows``). A served score that is no probability (NaN, ±inf, outside [0, 1]) is a breach of its own
(``invalid_predictions`` in the join counts); those rows are left out of the figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrflow.config import QualityParams
from ctrflow.guard import cut
from ctrflow.monitoring.drift import BREACHED, EXIT_CODES, NOT_ENOUGH_DATA, OK

LABEL_COLUMNS = {"request_id": "string", "item_id": "int64", "clicked": "0/1", "timestamp": "UTC timestamp"}
LOG_COLUMNS = ("request_id", "item_id", "ts", "scenario", "model", "prediction")
SHADOW_SCORE, SHADOW_MODEL = "shadow_score", "shadow_model"
SUMMARY_NAME = "quality_summary.json"
JOINED_NAME = "labelled_requests.parquet"


class QualityInputError(ValueError):
    """The label feed or the request log cannot be joined; the message names the table, column, rule and rows."""


@dataclass
class QualityResult:
    """Online quality of one run: the verdict, why, per-group figures and the series over time."""

    verdict: str
    reasons: list[str]
    overall: dict
    by_scenario: dict[str, dict]
    by_model: dict[str, dict]
    series: list[dict]  # one row per (time window, scenario or "all"): start, scenario, n, auc, predicted, observed
    join: dict  # served, duplicate_rows, labelled, clicked, pending, late_clicks, unmatched_clicks
    shadow: dict | None  # {model, overall: {...}, by_scenario: {...}} when the log holds shadow scores
    thresholds: dict = field(default_factory=dict)
    summary_path: Path | None = None

    @property
    def breached(self) -> bool:
        return self.verdict == BREACHED

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict, "breached": self.breached, "exit_code": self.exit_code, "reasons": self.reasons,
            "overall": self.overall, "by_scenario": self.by_scenario, "by_model": self.by_model, "series": self.series,
            "join": self.join, "shadow": self.shadow, "thresholds": self.thresholds,
            "summary_path": None if self.summary_path is None else str(self.summary_path),
        }  # fmt: skip

    def summary(self) -> str:
        label = {OK: "ok", BREACHED: "BREACHED", NOT_ENOUGH_DATA: "NOT ENOUGH DATA"}[self.verdict]
        j = self.join
        lines = [
            f"online quality: {label} ({j['labelled']:,} labelled of {j['served']:,} served rows; "
            f"{j['clicked']:,} clicks; {j['pending']:,} pending; {j['late_clicks']:,} late, {j['unmatched_clicks']:,} unmatched clicks)",
            f"  {'group':<24} {'rows':>8} {'auc':>7} {'pred CTR':>9} {'obs CTR':>8} {'obs/pred':>9}  verdict",
        ]
        groups = [("all", self.overall)] + [(f"scenario {k}", v) for k, v in self.by_scenario.items()]
        groups += [(f"model {k}", v) for k, v in self.by_model.items()]
        for name, g in groups:
            lines.append(
                f"  {name:<24} {g['n']:>8,} {_fmt(g['auc']):>7} {_fmt(g['predicted_ctr']):>9} "
                f"{_fmt(g['observed_ctr']):>8} {_fmt(g['ratio']):>9}  {g['verdict']}"
            )
        if self.shadow:
            s = self.shadow["overall"]
            lines.append(
                f"shadow '{self.shadow['model']}': auc {_fmt(s['shadow_auc'])} vs served {_fmt(s['served_auc'])} "
                f"(difference {_fmt(s['auc_difference'])}) on {s['n']:,} rows"
            )
        lines += [f"reason: {r}" for r in self.reasons]
        return "\n".join(lines)


def read_labels(path: str | Path) -> pd.DataFrame:
    """The label feed (a Parquet file or folder), checked and typed: request_id str, item_id int64, clicked 0/1,
    timestamp UTC. Raises QualityInputError naming the column, rule and row count."""
    path = Path(path)
    if not path.exists():
        raise QualityInputError(f"label feed: {path} does not exist")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types; the user needs the path and the cause
        raise QualityInputError(f"label feed: cannot read Parquet at {path}: {exc}") from exc
    return check_labels(frame)


def check_labels(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise QualityInputError(f"label feed ({len(frame):,} rows) lacks column(s) {missing}; expected {LABEL_COLUMNS}")
    out = pd.DataFrame({"request_id": frame["request_id"].astype(str)})
    if not pd.api.types.is_integer_dtype(frame["item_id"].dtype):
        raise QualityInputError(
            f"label feed: column 'item_id' must be int64 (ids are compared exactly; float64 rounds above 2**53), got {frame['item_id'].dtype}"
        )
    nulls = {c: int(frame[c].isna().sum()) for c in LABEL_COLUMNS if frame[c].isna().any()}
    if nulls:
        raise QualityInputError(f"label feed: null values in {nulls} (of {len(frame):,} rows); every column must hold a value")
    out["item_id"] = frame["item_id"].astype("int64")
    clicked = pd.to_numeric(frame["clicked"], errors="coerce")
    bad = ~clicked.isin([0, 1])
    if bad.any():
        raise QualityInputError(
            f"label feed: column 'clicked' must be 0 or 1; {int(bad.sum()):,} of {len(frame):,} rows are not "
            f"(e.g. {frame.loc[bad, 'clicked'].tolist()[0]!r})"  # a Python value: 2, not np.int64(2)
        )
    out["clicked"] = clicked.astype("int8")
    ts = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    if ts.isna().any():
        raise QualityInputError(f"label feed: column 'timestamp': {int(ts.isna().sum()):,} of {len(frame):,} rows are not timestamps")
    out["timestamp"] = ts
    return out


def join_labels(log: pd.DataFrame, labels: pd.DataFrame, window_s: float) -> tuple[pd.DataFrame, dict]:
    """Served rows with their click outcome (module docstring): returns (labelled rows, join counts).

    The labelled frame has the log's columns plus ``clicked`` (0/1); pending rows are left out."""
    if log.empty:  # a log with no request yet may hold no column either: nothing served, nothing to join
        log = log.reindex(columns=list(dict.fromkeys([*log.columns, *LOG_COLUMNS])))
        log["item_id"] = log["item_id"].astype("int64")
    missing = [c for c in LOG_COLUMNS if c not in log.columns]
    if missing:
        raise QualityInputError(f"request log ({len(log):,} rows) lacks column(s) {missing} needed to join labels")
    labels = check_labels(labels)
    served = log.copy()
    served["request_id"] = served["request_id"].astype(str)
    if not pd.api.types.is_integer_dtype(served["item_id"].dtype):
        raise QualityInputError(f"request log: column 'item_id' must be an integer column, got {served['item_id'].dtype}")
    served["item_id"] = served["item_id"].astype("int64")
    served["ts"] = pd.to_datetime(served["ts"], utc=True)
    n_logged = len(served)
    # one outcome per (request, item): a key logged twice (a retried write) is one impression
    served = served.drop_duplicates(["request_id", "item_id"], keep="first").reset_index(drop=True)
    window = pd.Timedelta(seconds=window_s)

    clicks = labels[labels["clicked"] == 1]
    keyed = clicks.merge(served[["request_id", "item_id", "ts"]].reset_index(), on=["request_id", "item_id"], how="left")
    matched = keyed["index"].notna()
    unmatched = int((~matched).sum())
    keyed = keyed[matched]
    in_window = (keyed["timestamp"] >= keyed["ts"]) & (keyed["timestamp"] <= keyed["ts"] + window)
    late = int((~in_window).sum())
    clicked_rows = set(keyed.loc[in_window, "index"].astype("int64"))
    served["clicked"] = np.isin(np.arange(len(served)), list(clicked_rows)).astype("int8")
    horizon = labels["timestamp"].max() if len(labels) else pd.Timestamp.min.tz_localize("UTC")
    closed = served["ts"] + window <= horizon
    keep = closed | (served["clicked"] == 1)  # a click inside the window is final even while the window is open
    joined = served[keep].reset_index(drop=True)
    counts = {
        "served": len(served), "duplicate_rows": n_logged - len(served), "labelled": len(joined), "clicked": int(joined["clicked"].sum()),
        "pending": int((~keep).sum()), "late_clicks": late, "unmatched_clicks": unmatched,
        "label_rows": len(labels), "window_s": window_s,
        "horizon": None if not len(labels) else str(horizon),
    }  # fmt: skip
    return joined, counts


def group_quality(y: np.ndarray, p: np.ndarray, s: QualityParams) -> dict:
    """AUC, predicted and observed CTR, their ratio and the calibration z-test of one group, with its verdict."""
    from ctrflow.training.metrics import auc

    n = len(y)
    out: dict[str, Any] = {"n": n, "clicks": int(y.sum()) if n else 0}
    if n == 0:
        return out | {"auc": None, "predicted_ctr": None, "observed_ctr": None, "ratio": None, "p_value": None,
                      "verdict": NOT_ENOUGH_DATA, "reasons": []}  # fmt: skip
    a = auc(y, p)
    pred, obs = float(p.mean()), float(y.mean())
    var = float((p * (1 - p)).sum())
    z = (float(y.sum()) - float(p.sum())) / math.sqrt(var) if var > 0 else 0.0
    from scipy.stats import norm

    p_value = float(2 * norm.sf(abs(z)))
    ratio = obs / pred if pred > 0 else None
    out |= {"auc": None if math.isnan(a) else a, "predicted_ctr": pred, "observed_ctr": obs, "ratio": ratio, "p_value": p_value}
    reasons: list[str] = []
    if n < s.min_labelled_rows:
        return out | {"verdict": NOT_ENOUGH_DATA, "reasons": []}
    if ratio is not None and abs(ratio - 1) > s.max_calibration_error and p_value < s.pvalue_threshold:
        reasons.append(
            f"observed CTR {obs:.4f} vs predicted {pred:.4f} (ratio {ratio:.2f}, allowed 1 ± {s.max_calibration_error}; "
            f"z-test p={p_value:.2g}) on {n:,} labelled rows"
        )
    if s.min_online_auc is not None and out["auc"] is not None and out["auc"] < s.min_online_auc:
        reasons.append(f"online AUC {out['auc']:.4f} < min_online_auc {s.min_online_auc} on {n:,} labelled rows")
    return out | {"verdict": BREACHED if reasons else OK, "reasons": reasons}


def quality_report(
    log: pd.DataFrame,
    labels: pd.DataFrame,
    out_dir: str | Path | None = None,
    *,
    settings: QualityParams | dict | None = None,
    sampling: dict | None = None,
    **overrides: Any,
) -> QualityResult:
    """Join, score every group, give the verdict; writes ``quality_summary.json`` and the labelled rows
    (``labelled_requests.parquet``) into `out_dir` when given. `sampling` (from `read_current`) is recorded in the
    join counts when the log was sampled (then ``unmatched_clicks`` includes clicks of rows left out)."""
    base = settings if isinstance(settings, QualityParams) else QualityParams.model_validate(settings or {})
    try:
        s = QualityParams.model_validate({**base.model_dump(), **overrides})
    except Exception as exc:  # pydantic names the key and rule
        raise QualityInputError(f"quality settings: {exc}") from exc
    joined, counts = join_labels(log, labels, s.attribution_window_s)
    if sampling and sampling.get("sampled"):  # clicks of rows outside the sample count as unmatched: say so
        counts["log_sampled"] = {k: sampling[k] for k in ("rows_total", "rows_read", "seed")}
    # a served score that is no probability (NaN, ±inf, outside [0, 1]: a broken model or log) made the mean and the
    # z-test NaN or inf, and the group came out "ok"; such rows are a breach of their own, left out of the figures
    p = joined["prediction"].to_numpy(dtype="float64", na_value=np.nan)
    valid = np.isfinite(p) & (p >= 0) & (p <= 1)
    invalid = int((~valid).sum())
    counts["invalid_predictions"] = invalid
    invalid_reason = None
    if invalid:
        examples = ", ".join(dict.fromkeys(repr(float(v)) for v in p[~valid][:50]))
        invalid_reason = (
            f"request log: prediction must be a probability in [0, 1]; {invalid:,} of {len(p):,} labelled rows broke it "
            f"(e.g. {cut(examples, 60)}); those rows are left out of AUC and calibration"
        )
        joined = joined[valid].reset_index(drop=True)
    y = joined["clicked"].to_numpy(dtype="float64")
    p = joined["prediction"].to_numpy(dtype="float64")

    overall = group_quality(y, p, s)
    by_scenario = {str(k): group_quality(y[idx], p[idx], s) for k, idx in _groups(joined, "scenario")}
    by_model = {str(k): group_quality(y[idx], p[idx], s) for k, idx in _groups(joined, "model")}
    series = _series(joined, y, p, s)
    shadow = _shadow(joined, y, p) if SHADOW_SCORE in joined.columns and joined[SHADOW_SCORE].notna().any() else None

    reasons = [invalid_reason] if invalid_reason else []
    reasons += [f"all traffic: {r}" for r in overall["reasons"]]
    reasons += [f"scenario '{k}': {r}" for k, g in by_scenario.items() for r in g["reasons"]]
    reasons += [f"model '{k}': {r}" for k, g in by_model.items() for r in g["reasons"]]
    verdicts = [overall["verdict"], *(g["verdict"] for g in by_scenario.values())]
    if reasons:
        verdict = BREACHED
    elif all(v == NOT_ENOUGH_DATA for v in verdicts):
        verdict = NOT_ENOUGH_DATA
    else:
        verdict = OK
    result = QualityResult(verdict, reasons, overall, by_scenario, by_model, series, counts, shadow, s.model_dump())
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        joined.to_parquet(out / JOINED_NAME, index=False)
        result.summary_path = out / SUMMARY_NAME
        result.summary_path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _groups(frame: pd.DataFrame, column: str) -> list[tuple[Any, np.ndarray]]:
    if column not in frame.columns:
        return []
    keys = frame[column].astype(str).to_numpy()
    return [(k, np.flatnonzero(keys == k)) for k in sorted(set(keys))]


def _series(joined: pd.DataFrame, y: np.ndarray, p: np.ndarray, s: QualityParams) -> list[dict]:
    """Per time window: all traffic, each scenario, and (when the log holds more than one) each model; the figures
    of `group_quality`, oldest first. Each row has `start`, `scenario` and `model` ("all" where not split)."""
    if joined.empty:
        return []
    starts = joined["ts"].dt.tz_convert("UTC").dt.floor(s.time_window)
    several_models = "model" in joined.columns and joined["model"].nunique() > 1
    rows = []
    for start in sorted(starts.unique()):
        in_window = np.flatnonzero((starts == start).to_numpy())
        sub = joined.iloc[in_window]
        groups = [("all", "all", np.arange(len(sub)))]
        groups += [(k, "all", idx) for k, idx in _groups(sub, "scenario")]
        if several_models:
            groups += [("all", k, idx) for k, idx in _groups(sub, "model")]
        for scenario, model, idx in groups:
            full = in_window[idx]
            g = group_quality(y[full], p[full], s)
            rows.append({"start": str(start), "scenario": scenario, "model": model, **{k: v for k, v in g.items() if k != "reasons"}})
    return rows


def _shadow(joined: pd.DataFrame, y: np.ndarray, p: np.ndarray) -> dict:
    """The shadow model against the served one on the rows both scored (AUC, mean score, difference)."""
    from ctrflow.training.metrics import auc

    has = joined[SHADOW_SCORE].notna().to_numpy()
    q = joined[SHADOW_SCORE].to_numpy(dtype="float64", na_value=np.nan)
    model = None
    if SHADOW_MODEL in joined.columns:
        names = joined.loc[has, SHADOW_MODEL].dropna().astype(str).unique()
        model = ",".join(sorted(names)) or None

    def compare(idx: np.ndarray) -> dict:
        a_served, a_shadow = auc(y[idx], p[idx]), auc(y[idx], q[idx])
        ok = not (math.isnan(a_served) or math.isnan(a_shadow))
        return {
            "n": int(len(idx)), "served_auc": None if math.isnan(a_served) else a_served,
            "shadow_auc": None if math.isnan(a_shadow) else a_shadow,
            "auc_difference": (a_shadow - a_served) if ok else None,
            "served_mean_score": float(p[idx].mean()) if len(idx) else None,
            "shadow_mean_score": float(q[idx].mean()) if len(idx) else None,
        }  # fmt: skip

    rows = np.flatnonzero(has)
    by_scenario = {}
    if "scenario" in joined.columns:
        sc = joined["scenario"].astype(str).to_numpy()
        by_scenario = {k: compare(rows[sc[rows] == k]) for k in sorted(set(sc[rows]))}
    return {"model": model or "shadow", "overall": compare(rows), "by_scenario": by_scenario}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
