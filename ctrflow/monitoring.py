"""Drift monitoring with Evidently: is what the model sees (and scores) now still what it was trained on?

One call compares a reference frame (the training slice) with a current frame (a later slice, or the serving
request log) field by field, writes Evidently's HTML/JSON report for people and a compact summary for machines,
and says whether the drift breaches the thresholds in `params.yaml` (`drift:`), so the CLI and the monitoring
pipeline can fail on it.

Evidently cannot test list-valued columns, so a sequence field is monitored as its length (`<name>__len`) and an
embedding field as its L2 norm (`<name>__norm`). High-cardinality id fields (`FieldSpec.large`) would drift on
every slice (new users and items arrive all the time), so they only get an informational coverage figure: the
share of current rows whose id was seen in the reference.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ctrflow.data.spec import FeatureSpec, FieldKind, FieldSpec
from ctrflow.request_log import SEGMENTS
from ctrflow.request_log import read_request_log as read_logged_requests

HTML_NAME = "drift_report.html"
JSON_NAME = "drift_report.json"
SUMMARY_NAME = "drift_summary.json"
LEN_SUFFIX = "__len"
NORM_SUFFIX = "__norm"
MISSING_TEST = "all values missing"


class DriftInputError(ValueError):
    """The frames given to the drift check cannot be compared; the message names the column, frame and rule."""


@dataclass
class DriftResult:
    """The outcome of one drift check: the verdict, why, and where the reports went."""

    breached: bool
    reasons: list[str]
    drifted_share: float
    per_feature: dict[str, dict]  # monitored column -> {field, kind, test, score, threshold, drifted}
    prediction_drift: dict | None  # {column, test, score, threshold, drifted}, None when not monitored
    html_path: Path
    json_path: Path
    summary_path: Path
    id_coverage: dict[str, float] = field(default_factory=dict)  # large id field -> share of current ids seen
    thresholds: dict = field(default_factory=dict)
    n_reference: int = 0
    n_current: int = 0

    @property
    def drifted_features(self) -> list[str]:
        return [name for name, r in self.per_feature.items() if r["drifted"]]

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("html_path", "json_path", "summary_path"):
            d[k] = str(d[k])
        d["drifted_features"] = self.drifted_features
        return d

    def summary(self) -> str:
        """A terminal-friendly verdict plus one line per monitored column."""
        lines = [
            f"drift check: {'BREACHED' if self.breached else 'ok'} "
            f"(reference {self.n_reference:,} rows, current {self.n_current:,} rows)",
            f"drifted features: {len(self.drifted_features)}/{len(self.per_feature)} "
            f"(share {self.drifted_share:.2f}, max {self.thresholds.get('max_drifted_share')})",
        ]
        if self.prediction_drift is not None:
            p = self.prediction_drift
            lines.append(
                f"prediction drift: {'DETECTED' if p['drifted'] else 'no'} "
                f"({p['test']}: {_fmt(p['score'])}, threshold {_fmt(p['threshold'])})"
            )
        width = max([len(n) for n in self.per_feature] + [7])
        lines.append(f"  {'feature':<{width}}  drift  {'score':>8}  test")
        for name, r in self.per_feature.items():
            lines.append(f"  {name:<{width}}  {'YES' if r['drifted'] else 'no':<5}  {_fmt(r['score']):>8}  {r['test']}")
        for name, cov in self.id_coverage.items():
            lines.append(f"  {name} coverage (current ids seen in reference): {cov:.1%}")
        lines += [f"reason: {r}" for r in self.reasons]
        lines.append(f"report: {self.html_path}")
        return "\n".join(lines)


def read_request_log(path: str | Path) -> pd.DataFrame:
    """Read the serving request log (one Parquet file, or a directory of them, hive partitions included).

    A ctrflow request-log folder (it has `_segments/`) is read with `ctrflow.request_log.read_request_log`: the
    compacted parts plus the rows not compacted yet, ids kept int64.
    """
    path = Path(path)
    if not path.exists():
        raise DriftInputError(f"request log: {path} does not exist")
    if path.is_dir() and (path / SEGMENTS).is_dir():  # ctrflow's own log: parts plus un-compacted segments, ids exact
        try:
            frame = read_logged_requests(path)
        except Exception as exc:  # noqa: BLE001 - the user needs the path and the cause
            raise DriftInputError(f"request log: cannot read {path}: {exc}") from exc
        if frame.empty:
            raise DriftInputError(f"request log: {path} holds no rows")
        return frame
    if path.is_dir() and not any(path.rglob("*.parquet")):
        raise DriftInputError(f"request log: no *.parquet file under {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises a zoo of types; the user needs the path and the cause
        raise DriftInputError(f"request log: cannot read Parquet at {path}: {exc}") from exc
    if frame.empty:
        raise DriftInputError(f"request log: {path} holds no rows")
    return frame


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    out_dir: str | Path,
    *,
    prediction_column: str | None = "prediction",
    stattest_threshold: float = 0.05,
    max_drifted_share: float = 0.5,
    fail_on_prediction_drift: bool = True,
) -> DriftResult:
    """Compare `current` with `reference` per spec field (and the prediction), write the reports, give the verdict.

    Evidently picks each column's test by size and type (KS / chi-square p-values up to 1,000 rows, normed
    Wasserstein / Jensen-Shannon distances above); `stattest_threshold` is that test's threshold (a p-value below
    it, or a distance at or above it, is drift). Breached when the share of drifted features exceeds
    `max_drifted_share`, when a feature is missing from every current row, or (if `fail_on_prediction_drift`)
    when the prediction drifted.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    _check_thresholds(stattest_threshold, max_drifted_share)
    for name, frame in (("reference", reference), ("current", current)):
        if not isinstance(frame, pd.DataFrame):
            raise DriftInputError(f"{name} frame: expected a pandas DataFrame, got {type(frame).__name__}")
        if frame.empty:
            raise DriftInputError(f"{name} frame is empty (0 rows): nothing to compare")
    monitored = [f for f in spec.fields if not f.large]
    if not monitored:
        raise DriftInputError("feature spec: every field is a large id field; no feature to test for drift")
    required = [f.column for f in spec.fields] + ([prediction_column] if prediction_column else [])
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise DriftInputError(
                f"{name} frame ({len(frame):,} rows) lacks column(s) {missing} required by the feature spec"
                + (f" / prediction_column='{prediction_column}'" if prediction_column in missing else "")
            )

    ref = _monitoring_frame(reference, monitored, prediction_column, "reference")
    cur = _monitoring_frame(current, monitored, prediction_column, "current")
    columns = {_monitored_name(f): f for f in monitored}
    numerical = [c for c, f in columns.items() if f.kind is not FieldKind.CATEGORICAL]
    categorical = [c for c, f in columns.items() if f.kind is FieldKind.CATEGORICAL]

    empty_in_ref = [c for c in [*columns, *([prediction_column] if prediction_column else [])] if ref[c].isna().all()]
    if empty_in_ref:
        raise DriftInputError(
            f"reference frame: column(s) {empty_in_ref} are missing (null) in all {len(ref):,} rows; "
            "a reference must hold values to compare against"
        )
    # A feature that serving stopped sending is the loudest drift there is; Evidently refuses an all-null column,
    # so it is kept out of the Evidently run and marked drifted here.
    empty_in_cur = [c for c in columns if cur[c].isna().all()]
    tested = [c for c in columns if c not in empty_in_cur]
    pred_tested = prediction_column is not None
    if pred_tested and cur[prediction_column].isna().all():
        raise DriftInputError(
            f"current frame: prediction column '{prediction_column}' is null in all {len(cur):,} rows"
        )

    definition = DataDefinition(
        numerical_columns=[c for c in numerical if c in tested] + ([prediction_column] if pred_tested else []),
        categorical_columns=[c for c in categorical if c in tested],
    )
    metrics: list = []
    if tested:
        metrics.append(DataDriftPreset(columns=tested, threshold=stattest_threshold, drift_share=max_drifted_share))
    if pred_tested:
        metrics.append(ValueDrift(column=prediction_column, threshold=stattest_threshold))
    if not metrics:
        raise DriftInputError(
            f"current frame: every monitored column ({list(columns)}) is null in all {len(cur):,} rows"
        )
    keep = list(definition.numerical_columns or []) + list(definition.categorical_columns or [])
    try:
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur[keep], data_definition=definition),
            Dataset.from_pandas(ref[keep], data_definition=definition),
        )
    except Exception as exc:  # Evidently's own errors are terse; say which step failed and keep the cause
        raise DriftInputError(f"Evidently drift report failed on columns {keep}: {exc}") from exc

    drift = _column_drift(snapshot.dict())
    per_feature: dict[str, dict] = {}
    for col, f in columns.items():
        row = {"field": f.name, "kind": f.kind.value, "summarised_as": _summarised_as(f)}
        if col in empty_in_cur:
            row |= {"test": MISSING_TEST, "score": 1.0, "threshold": None, "drifted": True}
        else:
            if col not in drift:
                raise DriftInputError(f"Evidently returned no drift result for column '{col}'")
            row |= drift[col]
        per_feature[col] = row
    prediction_drift = drift.get(prediction_column) if pred_tested else None
    if pred_tested and prediction_drift is None:
        raise DriftInputError(f"Evidently returned no drift result for prediction column '{prediction_column}'")
    if prediction_drift is not None:
        prediction_drift = {"column": prediction_column, **prediction_drift}

    drifted = [c for c, r in per_feature.items() if r["drifted"]]
    drifted_share = len(drifted) / len(per_feature)
    reasons: list[str] = []
    if drifted_share > max_drifted_share:
        detail = ", ".join(f"{c} ({_describe(per_feature[c])})" for c in drifted)
        reasons.append(
            f"{len(drifted)} of {len(per_feature)} features drifted (share {drifted_share:.2f} > "
            f"max_drifted_share {max_drifted_share}): {detail}"
        )
    for c in empty_in_cur:
        reasons.append(f"feature '{c}' is null in all {len(cur):,} current rows (serving stopped sending it?)")
    if prediction_drift is not None and prediction_drift["drifted"] and fail_on_prediction_drift:
        reasons.append(f"prediction '{prediction_column}' drifted ({_describe(prediction_drift)})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = DriftResult(
        breached=bool(reasons),
        reasons=reasons,
        drifted_share=drifted_share,
        per_feature=per_feature,
        prediction_drift=prediction_drift,
        html_path=out / HTML_NAME,
        json_path=out / JSON_NAME,
        summary_path=out / SUMMARY_NAME,
        id_coverage=_id_coverage(reference, current, spec),
        thresholds={
            "stattest_threshold": stattest_threshold,
            "max_drifted_share": max_drifted_share,
            "fail_on_prediction_drift": fail_on_prediction_drift,
        },
        n_reference=len(reference),
        n_current=len(current),
    )
    snapshot.save_html(str(result.html_path))
    snapshot.save_json(str(result.json_path))
    result.summary_path.write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _check_thresholds(stattest_threshold: float, max_drifted_share: float) -> None:
    if not (isinstance(stattest_threshold, int | float) and stattest_threshold > 0):
        raise DriftInputError(f"stattest_threshold must be a number > 0, got {stattest_threshold!r}")
    if not (isinstance(max_drifted_share, int | float) and 0 <= max_drifted_share <= 1):
        raise DriftInputError(f"max_drifted_share must be in [0, 1], got {max_drifted_share!r}")


def _monitored_name(f: FieldSpec) -> str:
    if f.kind is FieldKind.SEQUENCE:
        return f.name + LEN_SUFFIX
    if f.kind is FieldKind.EMBEDDING:
        return f.name + NORM_SUFFIX
    return f.name


def _summarised_as(f: FieldSpec) -> str:
    return {FieldKind.SEQUENCE: "length", FieldKind.EMBEDDING: "l2_norm"}.get(f.kind, "value")


def _monitoring_frame(
    frame: pd.DataFrame, fields: list[FieldSpec], prediction_column: str | None, which: str
) -> pd.DataFrame:
    """One scalar column per field (lists summarised), typed the same way whatever the source frame was."""
    out: dict[str, pd.Series] = {}
    for f in fields:
        s = frame[f.column]
        if f.kind is FieldKind.CATEGORICAL:
            out[_monitored_name(f)] = _as_category_text(s)
        elif f.kind is FieldKind.NUMERIC:
            out[_monitored_name(f)] = _as_float(s, f"column '{f.column}' (numeric field '{f.name}')", which)
        elif f.kind is FieldKind.SEQUENCE:
            out[_monitored_name(f)] = _list_stat(s, f, which, np.size, missing=0.0)
        else:
            out[_monitored_name(f)] = _list_stat(s, f, which, _l2_norm, missing=math.nan)
    if prediction_column is not None:
        out[prediction_column] = _as_float(frame[prediction_column], f"prediction column '{prediction_column}'", which)
    return pd.DataFrame(out).reset_index(drop=True)


def _as_category_text(s: pd.Series) -> pd.Series:
    """Categories as text, so int ids from one source and float ids (Feast fills gaps with NaN) from another match."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        vals = s.to_numpy(dtype="float64", na_value=np.nan)
        if np.all(np.isnan(vals) | (vals == np.round(vals))):
            s = pd.Series(vals, index=s.index).astype("Int64")
    text = s.astype(str).astype(object)
    return text.where(s.notna().to_numpy(), None)


def _as_float(s: pd.Series, what: str, which: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(s):
        s = s.astype("float64")
    num = pd.to_numeric(s, errors="coerce").astype("float64")
    bad = int((num.isna() & s.notna()).sum())
    if bad:
        example = s[num.isna() & s.notna()].iloc[0]
        raise DriftInputError(
            f"{which} frame: {what} must be numeric; {bad:,} of {len(s):,} rows are not (e.g. {example!r})"
        )
    return num


def _l2_norm(v) -> float:
    a = np.asarray(v, dtype="float64")
    return float(np.sqrt(np.dot(a.ravel(), a.ravel())))


def _list_stat(s: pd.Series, f: FieldSpec, which: str, stat, missing: float) -> pd.Series:
    values = np.empty(len(s), dtype="float64")
    bad = 0
    example = None
    for i, v in enumerate(s.to_numpy(dtype=object)):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            values[i] = missing
        elif isinstance(v, list | tuple | np.ndarray):
            try:
                values[i] = stat(v)
            except (TypeError, ValueError):
                values[i], bad, example = math.nan, bad + 1, v if example is None else example
        else:
            values[i], bad, example = math.nan, bad + 1, v if example is None else example
    if bad:
        raise DriftInputError(
            f"{which} frame: column '{f.column}' ({f.kind.value} field '{f.name}') must hold lists"
            f"{' of numbers' if f.kind is FieldKind.EMBEDDING else ''}; {bad:,} of {len(s):,} rows do not "
            f"(e.g. {example!r})"
        )
    return pd.Series(values, index=s.index)


def _column_drift(report: dict) -> dict[str, dict]:
    """Per column: Evidently's chosen test, score, threshold and verdict (its ValueDrift test status)."""
    by_metric: dict[str, dict] = {}
    for m in report.get("metrics", []):
        cfg = m.get("config", {})
        if cfg.get("type", "").endswith(":ValueDrift"):
            by_metric[m["id"]] = {
                "column": cfg["column"],
                "test": cfg.get("method"),
                "score": _num(m.get("value")),
                "threshold": _num(cfg.get("threshold")),
            }
    out: dict[str, dict] = {}
    for t in report.get("tests", []):
        metric = by_metric.get(t.get("metric_config", {}).get("metric_id", ""))
        if metric is None:
            continue
        col = metric.pop("column")
        out[col] = {**metric, "drifted": t.get("status") == "FAIL"}
    return out


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _describe(r: dict) -> str:
    if r["test"] == MISSING_TEST:
        return MISSING_TEST
    return f"{r['test']} {_fmt(r['score'])}, threshold {_fmt(r['threshold'])}"


def _id_coverage(reference: pd.DataFrame, current: pd.DataFrame, spec: FeatureSpec) -> dict[str, float]:
    """Share of current rows whose large-id value was seen in the reference (cold-start pressure, not a verdict)."""
    cov: dict[str, float] = {}
    for f in spec.fields:
        if f.large and f.kind is FieldKind.CATEGORICAL:
            ref_ids = set(_as_category_text(reference[f.column]).dropna())
            cur_ids = _as_category_text(current[f.column])
            cov[f.name] = float(cur_ids.isin(ref_ids).mean())
    return cov
