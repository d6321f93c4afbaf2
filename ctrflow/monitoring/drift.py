"""Drift monitoring with Evidently: is what the model sees (and scores) now still what it was trained on?

One call compares a reference frame (the training slice) with a current frame (a later slice, or the serving
request log) field by field, for the whole population and for each scenario, writes Evidently's HTML/JSON report
for people and a compact summary for machines, and gives a verdict on-call can act on:

- ``ok`` (exit 0): every test that had enough data passed;
- ``breached`` (exit 1): a test with enough data failed (see `DriftResult.reasons`);
- ``not_enough_data`` (exit 3): no breach, and fewer than `min_current_rows` current values for the tests
  (a sample too small to test is never a breach: distance tests have no notion of sample size, PITFALLS.md);
- exit 2 is a usage error (bad input, bad configuration), raised as `DriftInputError`.

Per monitored column two signals are tested:

1. **value drift** (Evidently's `ValueDrift`, with the test chosen by sample size, not left to Evidently's
   reference-size rule): when the smaller of the two non-null samples has at most `pvalue_max_rows` values, a
   p-value test (KS for numbers, chi-square for categories), drifted when p < `pvalue_threshold`; above, a distance
   (normed Wasserstein for numbers, Jensen-Shannon for categories), drifted when the distance >= `stattest_threshold`.
   Fewer than `min_current_rows` non-null current values: ``not enough data`` for that column.
2. **missing-value share**: Evidently drops nulls before its tests, so a feature that stops arriving in 80% of
   requests is invisible to (1). The share of missing values is compared on its own: drifted when it moved by more
   than `max_missing_share_change` (absolute) *and* a two-proportion z-test gives p < `pvalue_threshold`.

A column null in every reference row cannot be value-tested (no reference distribution): it is reported as
``untestable`` while the other columns are still checked (its missing share is still compared).

Evidently cannot test list-valued columns, so a sequence field is monitored as its length (`<name>__len`) and an
embedding field as its L2 norm (`<name>__norm`). High-cardinality id fields (`FieldSpec.large`) would drift on
every slice (new users and items arrive all the time), so they only get an informational coverage figure: the
share of current rows whose id was seen in the reference, compared as exact int64 (never through float64).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrflow.config import DriftParams
from ctrflow.data.spec import Entity, FeatureSpec, FieldKind, FieldSpec

HTML_NAME = "drift_report.html"
JSON_NAME = "drift_report.json"
SUMMARY_NAME = "drift_summary.json"
SCENARIO_DIR = "scenarios"
FALLBACK = {Entity.USER: "fallback_user", Entity.ITEM: "fallback_item"}  # request-log flags: unknown user / item
LEN_SUFFIX = "__len"
NORM_SUFFIX = "__norm"

OK, BREACHED, NOT_ENOUGH_DATA = "ok", "breached", "not_enough_data"
# value-test statuses of one column
DRIFTED, NO_DRIFT, TOO_FEW, UNTESTABLE = "drifted", "no drift", "not enough data", "untestable"
EXIT_OK, EXIT_BREACH, EXIT_USAGE, EXIT_NOT_ENOUGH_DATA = 0, 1, 2, 3
EXIT_CODES = {OK: EXIT_OK, BREACHED: EXIT_BREACH, NOT_ENOUGH_DATA: EXIT_NOT_ENOUGH_DATA}
PVALUE_TESTS = {FieldKind.NUMERIC: "ks", FieldKind.CATEGORICAL: "chisquare"}
DISTANCE_TESTS = {FieldKind.NUMERIC: "wasserstein", FieldKind.CATEGORICAL: "jensenshannon"}


class DriftInputError(ValueError):
    """The frames given to the drift check cannot be compared; the message names the column, frame and rule."""


@dataclass
class PopulationDrift:
    """The drift of one population (everything, or one scenario): verdict, reasons and per-column results."""

    name: str
    verdict: str
    reasons: list[str]
    per_feature: dict[str, dict]  # monitored column -> {field, kind, test, score, threshold, status, drifted, missing}
    prediction_drift: dict | None  # {column, test, score, threshold, status, drifted}, None when not monitored
    drifted_share: float | None  # drifted / value-tested columns; None when none could be tested
    n_reference: int
    n_current: int
    notes: list[str] = field(default_factory=list)  # untestable / too-few columns: not a breach, worth reading
    html_path: str | None = None

    @property
    def breached(self) -> bool:
        return self.verdict == BREACHED

    @property
    def drifted_features(self) -> list[str]:
        return [n for n, r in self.per_feature.items() if r["drifted"] or r["missing"]["drifted"]]

    def to_dict(self) -> dict:
        return {**asdict(self), "breached": self.breached, "drifted_features": self.drifted_features}


@dataclass
class DriftResult:
    """The outcome of one drift check: the verdict, why, per scenario, and where the reports went."""

    verdict: str
    reasons: list[str]
    overall: PopulationDrift
    scenarios: dict[str, PopulationDrift]
    html_path: Path
    json_path: Path
    summary_path: Path
    id_coverage: dict[str, float | None] = field(default_factory=dict)  # large id field -> share of current ids seen
    thresholds: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # how the current frame was sampled, when it was
    snapshot: Any = field(default=None, repr=False)  # the whole population's Evidently snapshot (for a workspace)

    @property
    def breached(self) -> bool:
        return self.verdict == BREACHED

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    # the whole population's figures, for callers that do not look per scenario
    @property
    def per_feature(self) -> dict[str, dict]:
        return self.overall.per_feature

    @property
    def prediction_drift(self) -> dict | None:
        return self.overall.prediction_drift

    @property
    def drifted_share(self) -> float | None:
        return self.overall.drifted_share

    @property
    def drifted_features(self) -> list[str]:
        return self.overall.drifted_features

    @property
    def n_reference(self) -> int:
        return self.overall.n_reference

    @property
    def n_current(self) -> int:
        return self.overall.n_current

    def scenario_table(self) -> list[dict]:
        """One row per scenario: verdict, row counts, drifted features, prediction drift, the first reason."""
        rows = []
        for name, p in self.scenarios.items():
            pd_ = p.prediction_drift
            rows.append({
                "scenario": name, "verdict": p.verdict, "n_reference": p.n_reference, "n_current": p.n_current,
                "drifted_features": p.drifted_features,
                "prediction_drift": None if pd_ is None else pd_["status"],
                "reason": p.reasons[0] if p.reasons else (p.notes[0] if p.notes else ""),
                "html": p.html_path,
            })  # fmt: skip
        return rows

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "breached": self.breached,
            "exit_code": self.exit_code,
            "reasons": self.reasons,
            "drifted_share": self.drifted_share,
            "drifted_features": self.drifted_features,
            "per_feature": self.per_feature,
            "prediction_drift": self.prediction_drift,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "notes": self.overall.notes,
            "scenario_table": self.scenario_table(),
            "scenarios": {k: v.to_dict() for k, v in self.scenarios.items()},
            "id_coverage": self.id_coverage,
            "thresholds": self.thresholds,
            "sampling": self.sampling,
            "html_path": str(self.html_path),
            "json_path": str(self.json_path),
            "summary_path": str(self.summary_path),
        }

    def summary(self) -> str:
        """A terminal-friendly verdict, one line per monitored column, then the scenario table."""
        o = self.overall
        label = {OK: "ok", BREACHED: "BREACHED", NOT_ENOUGH_DATA: "NOT ENOUGH DATA"}[self.verdict]
        lines = [f"drift check: {label} (reference {o.n_reference:,} rows, current {o.n_current:,} rows)"]
        if o.drifted_share is not None:
            tested = sum(r["status"] in (DRIFTED, NO_DRIFT) for r in o.per_feature.values())
            drifted = sum(r["status"] == DRIFTED for r in o.per_feature.values())
            lines.append(
                f"drifted features: {drifted}/{tested} tested (share {o.drifted_share:.2f}, "
                f"max {self.thresholds.get('max_drifted_share')})"
            )
        if o.prediction_drift is not None:
            p = o.prediction_drift
            lines.append(f"prediction drift: {p['status']} ({p['test']}: {_fmt(p['score'])}, threshold {_fmt(p['threshold'])})")
        width = max([len(n) for n in o.per_feature] + [7])
        lines.append(f"  {'feature':<{width}}  {'value test':<15}  {'score':>8}  {'test':<12}  missing ref -> cur")
        for name, r in o.per_feature.items():
            m = r["missing"]
            lines.append(
                f"  {name:<{width}}  {r['status']:<15}  {_fmt(r['score']):>8}  {r['test'] or '-':<12}  "
                f"{m['reference_share']:.1%} -> {m['current_share']:.1%}{'  DRIFTED' if m['drifted'] else ''}"
            )
        for name, cov in self.id_coverage.items():
            lines.append(f"  {name} coverage (current ids seen in reference): {'n/a' if cov is None else f'{cov:.1%}'}")
        if self.scenarios:
            lines.append("scenarios:")
            for row in self.scenario_table():
                lines.append(
                    f"  {row['scenario']:<12} {row['verdict']:<16} current {row['n_current']:>7,}  "
                    f"drifted {row['drifted_features'] or '-'}  {row['reason']}"
                )
        lines += [f"reason: {r}" for r in self.reasons]
        lines += [f"note: {n}" for n in o.notes]
        lines.append(f"report: {self.html_path}")
        return "\n".join(lines)


def settings_of(settings: DriftParams | dict | None = None, **overrides: Any) -> DriftParams:
    """`settings` (params.yaml's `drift:` section, typed) with keyword overrides, validated."""
    base = settings if isinstance(settings, DriftParams) else DriftParams.model_validate(settings or {})
    try:
        return DriftParams.model_validate({**base.model_dump(), **overrides})
    except Exception as exc:  # pydantic's message names the key and the rule
        raise DriftInputError(f"drift settings: {exc}") from exc


def drift_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    spec: FeatureSpec,
    out_dir: str | Path,
    *,
    prediction_column: str | None = "prediction",
    settings: DriftParams | dict | None = None,
    sampling: dict | None = None,
    timestamp: dt.datetime | None = None,
    **overrides: Any,
) -> DriftResult:
    """Compare `current` with `reference` per spec field (and the prediction), overall and per scenario; write the
    reports; give the verdict (module docstring). `settings` is the `drift:` section (defaults: `DriftParams`);
    keyword `overrides` replace single keys (e.g. ``max_drifted_share=0.1``). `timestamp` dates the Evidently
    snapshots (default: now), naive UTC as Evidently's own (an aware one is converted).

    Breached when, in the whole population or in one scenario (with enough data): the share of value-drifted
    features exceeds `max_drifted_share`; a feature's missing share moved (every such feature is a reason); or,
    with `fail_on_prediction_drift`, the prediction drifted. Scenarios come from the spec's scenario column when
    both frames have it (`by_scenario`).

    An empty `current` (with the spec's columns) is "not enough data" (exit 3), like any sample under
    `min_current_rows`. Raises DriftInputError for frames that cannot be compared (an empty reference, a required column absent, non-numeric values
    in a numeric field, lists that are not lists).
    """
    s = settings_of(settings, **overrides)
    for name, frame in (("reference", reference), ("current", current)):
        if not isinstance(frame, pd.DataFrame):
            raise DriftInputError(f"{name} frame: expected a pandas DataFrame, got {type(frame).__name__}")
    if reference.empty:
        raise DriftInputError("reference frame is empty (0 rows): nothing to compare with")
    # an empty current frame (a request log with no request yet) goes on: 0 < min_current_rows, "not enough data"
    monitored = [f for f in spec.fields if not f.large]
    if not monitored:
        raise DriftInputError("feature spec: every field is a large id field; no feature to test for drift")
    required = [f.column for f in spec.fields] + ([prediction_column] if prediction_column else [])
    if current.empty:  # no row to test: a column the log never wrote (no request yet) is no usage error
        current = current.reindex(columns=list(dict.fromkeys([*current.columns, *required])))
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _naive_utc(timestamp)
    overall, snapshot = _population("all", ref, cur, columns, prediction_column, s, stamp)
    for which, frame in (("reference", ref), ("current", cur)):
        for col, n in frame.attrs.get("non_finite", {}).items():
            overall.notes.append(f"'{col}': {n:,} of {len(frame):,} {which} values are ±inf, counted as missing")
    scenarios: dict[str, PopulationDrift] = {}
    sc = spec.scenario_field
    if s.by_scenario and sc in reference.columns and sc in current.columns:
        ref_sc = reference[sc].astype(str).to_numpy()
        cur_sc = current[sc].astype(str).to_numpy()
        for name in sorted(set(cur_sc) | set(ref_sc)):
            r_mask, c_mask = ref_sc == name, cur_sc == name
            if not c_mask.any():  # trained on, no traffic now: worth a look (a surface down?), not testable
                scenarios[name] = _empty_population(
                    name, int(r_mask.sum()), 0, NOT_ENOUGH_DATA, f"scenario '{name}' has no current rows (reference {int(r_mask.sum()):,})"
                )
                continue
            if not r_mask.any():
                scenarios[name] = _empty_population(
                    name, 0, int(c_mask.sum()), NOT_ENOUGH_DATA, f"scenario '{name}' has no reference rows: nothing to compare with"
                )
                continue
            pop, snap = _population(name, ref[r_mask], cur[c_mask], columns, prediction_column, s, stamp)
            if snap is not None:
                folder = out / SCENARIO_DIR / _slug(name)
                folder.mkdir(parents=True, exist_ok=True)
                snap.save_html(str(folder / HTML_NAME))
                pop.html_path = str(folder / HTML_NAME)
            scenarios[name] = pop

    reasons = list(overall.reasons)
    for name, pop in scenarios.items():
        reasons += [f"scenario '{name}': {r}" for r in pop.reasons]
    if reasons:
        verdict = BREACHED
    elif overall.verdict == NOT_ENOUGH_DATA:
        verdict = NOT_ENOUGH_DATA
    else:
        verdict = OK
    result = DriftResult(
        verdict=verdict,
        reasons=reasons,
        overall=overall,
        scenarios=scenarios,
        html_path=out / HTML_NAME,
        json_path=out / JSON_NAME,
        summary_path=out / SUMMARY_NAME,
        id_coverage=_id_coverage(reference, current, spec),
        thresholds=s.model_dump(),
        sampling=sampling or {},
    )
    result.snapshot = snapshot
    if snapshot is not None:
        snapshot.save_html(str(result.html_path))
        snapshot.save_json(str(result.json_path))
        overall.html_path = str(result.html_path)
    else:  # nothing could be tested: still leave a page that says why
        result.html_path.write_text(_plain_html("drift check: not enough data", overall.notes + overall.reasons))
        result.json_path.write_text(json.dumps({"metrics": [], "tests": [], "notes": overall.notes}))
    result.summary_path.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def _empty_population(name: str, n_ref: int, n_cur: int, verdict: str, note: str) -> PopulationDrift:
    return PopulationDrift(name, verdict, [], {}, None, None, n_ref, n_cur, notes=[note])


def _population(
    name: str,
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    columns: dict[str, FieldSpec],
    prediction_column: str | None,
    s: DriftParams,
    timestamp: dt.datetime | None = None,
) -> tuple[PopulationDrift, Any]:
    """Test one population: missing shares here, value drift with Evidently (one Report); returns the result and
    the Evidently snapshot (None when no column had enough data to test)."""
    n_ref, n_cur = len(ref), len(cur)
    if n_cur < s.min_current_rows:
        note = f"{n_cur:,} current rows, fewer than min_current_rows={s.min_current_rows}: not tested"
        return _empty_population(name, n_ref, n_cur, NOT_ENOUGH_DATA, note), None

    per_feature: dict[str, dict] = {}
    plan: dict[str, tuple[str, float]] = {}  # column -> (Evidently method, threshold)
    notes: list[str] = []
    for col, f in columns.items():
        row: dict[str, Any] = {"field": f.name, "kind": f.kind.value, "summarised_as": _summarised_as(f)}
        # an unknown user/item (a request-log fallback row) has no features by design: not a feature gone missing
        flag = FALLBACK.get(f.entity)
        known = ~cur[flag].fillna(False).astype(bool) if flag in cur.columns else slice(None)
        row["missing"] = _missing_share_test(ref[col], cur.loc[known, col], s)
        status, method, threshold = _plan(ref[col], cur[col], f.kind, s)
        row |= {"test": method, "score": None, "threshold": threshold, "status": status, "drifted": False}
        if status == UNTESTABLE:
            notes.append(f"'{col}' is untestable: null in all {n_ref:,} reference rows (no distribution to compare with)")
        elif status == TOO_FEW:
            n = int(cur[col].notna().sum())
            notes.append(f"'{col}': {n:,} non-null current values, fewer than min_current_rows={s.min_current_rows}")
        else:
            plan[col] = (method, threshold)
        per_feature[col] = row
    pred_row = None
    if prediction_column is not None:
        status, method, threshold = _plan(ref[prediction_column], cur[prediction_column], FieldKind.NUMERIC, s)
        pred_row = {"column": prediction_column, "test": method, "score": None, "threshold": threshold, "status": status, "drifted": False}
        pred_row["missing"] = _missing_share_test(ref[prediction_column], cur[prediction_column], s)
        if status == TOO_FEW:
            notes.append(f"prediction: fewer than min_current_rows={s.min_current_rows} non-null current values")
        elif status == UNTESTABLE:
            notes.append(f"prediction: null in all {n_ref:,} reference rows")
        else:
            plan[prediction_column] = (method, threshold)

    # Evidently draws a histogram of every numeric column it tests, and numpy cannot bin some finite columns (one
    # value so large that the +-0.5 padding of a constant range is lost to rounding, e.g. 1e300 in every row):
    # those are tested here with the same statistic (`_value_test`) instead of stopping the whole report
    for col in [c for c, (method, _) in plan.items() if method in ("ks", "wasserstein")]:
        if _binnable(ref[col]) and _binnable(cur[col]):
            continue
        method, threshold = plan.pop(col)
        score, drifted = _value_test(ref[col], cur[col], method, threshold)
        target = pred_row if col == prediction_column else per_feature[col]
        target |= {"score": score, "drifted": drifted, "status": DRIFTED if drifted else NO_DRIFT}
        notes.append(f"'{col}': tested by ctrflow ({method}), not Evidently: its histogram cannot bin these values")

    snapshot = None
    if plan:
        snapshot = _evidently_run(ref, cur, plan, columns, prediction_column, timestamp)
        drift = _column_drift(snapshot.dict())
        for col in plan:
            if col not in drift:
                raise DriftInputError(f"Evidently returned no drift result for column '{col}'")
            target = pred_row if col == prediction_column else per_feature[col]
            target["score"] = drift[col]["score"]
            target["drifted"] = drift[col]["drifted"]
            target["status"] = DRIFTED if drift[col]["drifted"] else NO_DRIFT

    tested = [c for c, r in per_feature.items() if r["status"] in (DRIFTED, NO_DRIFT)]
    drifted = [c for c in tested if per_feature[c]["drifted"]]
    drifted_share = len(drifted) / len(tested) if tested else None
    reasons: list[str] = []
    if drifted_share is not None and drifted_share > s.max_drifted_share:
        detail = ", ".join(f"{c} ({_describe(per_feature[c])})" for c in drifted)
        reasons.append(
            f"{len(drifted)} of {len(tested)} tested features drifted (share {drifted_share:.2f} > "
            f"max_drifted_share {s.max_drifted_share}): {detail}"
        )
    for c, r in per_feature.items():
        m = r["missing"]
        if m["drifted"]:
            reasons.append(
                f"feature '{c}' missing in {m['current_share']:.1%} of {m['n_current']:,} current rows "
                f"(reference {m['reference_share']:.1%}; change > {s.max_missing_share_change}, z-test p={m['p_value']:.2g})"
            )
    if pred_row is not None and pred_row["drifted"] and s.fail_on_prediction_drift:
        reasons.append(f"prediction '{prediction_column}' drifted ({_describe(pred_row)})")
    if pred_row is not None and pred_row["missing"]["drifted"]:  # a model answering NaN / inf is no drift test
        m = pred_row["missing"]
        reasons.append(
            f"prediction '{prediction_column}' missing or non-finite in {m['current_share']:.1%} of {m['n_current']:,} "
            f"current rows (reference {m['reference_share']:.1%}; z-test p={m['p_value']:.2g})"
        )
    any_missing_tested = any(r["missing"]["status"] != TOO_FEW for r in per_feature.values())
    if reasons:
        verdict = BREACHED
    elif not plan and not any_missing_tested:
        verdict = NOT_ENOUGH_DATA
    else:
        verdict = OK
    return (
        PopulationDrift(name, verdict, reasons, per_feature, pred_row, drifted_share, n_ref, n_cur, notes=notes),
        snapshot,
    )


def _plan(ref: pd.Series, cur: pd.Series, kind: FieldKind, s: DriftParams) -> tuple[str, str | None, float | None]:
    """(status, Evidently method, threshold) of one column's value test, chosen by the non-null sample sizes."""
    n_ref, n_cur = int(ref.notna().sum()), int(cur.notna().sum())
    kind = FieldKind.CATEGORICAL if kind is FieldKind.CATEGORICAL else FieldKind.NUMERIC
    if n_ref == 0:
        return UNTESTABLE, None, None
    if n_cur < s.min_current_rows:
        return TOO_FEW, None, None
    if min(n_ref, n_cur) <= s.pvalue_max_rows:
        return NO_DRIFT, PVALUE_TESTS[kind], s.pvalue_threshold
    return NO_DRIFT, DISTANCE_TESTS[kind], s.stattest_threshold


def _binnable(values: pd.Series, bins: int = 10) -> bool:
    """Whether numpy can make the `bins`-bin histogram Evidently draws of a column's finite values."""
    finite = values.to_numpy(dtype="float64", na_value=np.nan)
    finite = finite[np.isfinite(finite)]
    try:
        np.histogram(finite, bins=bins)
    except ValueError:
        return False
    return True


def _value_test(ref: pd.Series, cur: pd.Series, method: str, threshold: float) -> tuple[float | None, bool]:
    """(score, drifted) of Evidently's numeric tests, computed on the non-null values as Evidently does: `ks`, the
    two-sample KS p-value, drifted when <= threshold; `wasserstein`, the Wasserstein distance over the reference's
    standard deviation (at least 0.001), drifted when >= threshold (inf when the values overflow float64)."""
    from scipy import stats

    r = ref.dropna().to_numpy(dtype="float64")
    c = cur.dropna().to_numpy(dtype="float64")
    if method == "ks":
        p = float(stats.ks_2samp(r, c).pvalue)
        return p, p <= threshold
    with np.errstate(over="ignore", invalid="ignore"):
        norm = max(float(np.std(r)), 0.001)
        score = float(stats.wasserstein_distance(r, c)) / norm
    if math.isnan(score):  # inf - inf in the overflowing sums: the distributions are far apart
        score = math.inf
    return score, score >= threshold


def _missing_share_test(ref: pd.Series, cur: pd.Series, s: DriftParams) -> dict:
    """The missing-value share, reference vs current: a change larger than `max_missing_share_change` that a
    two-proportion z-test also finds significant (p < pvalue_threshold). Pooled standard error
    sqrt(p(1-p)(1/n_ref + 1/n_cur)); when it is 0 (both shares 0 or both 1) nothing moved (p = 1)."""
    from scipy.stats import norm

    n_ref, n_cur = len(ref), len(cur)
    k_ref, k_cur = int(ref.isna().sum()), int(cur.isna().sum())
    p_ref, p_cur = k_ref / n_ref, k_cur / n_cur
    pooled = (k_ref + k_cur) / (n_ref + n_cur)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n_cur))
    p_value = 1.0 if se == 0 else float(2 * norm.sf(abs(p_cur - p_ref) / se))
    enough = n_cur >= s.min_current_rows
    drifted = enough and abs(p_cur - p_ref) > s.max_missing_share_change and p_value < s.pvalue_threshold
    status = TOO_FEW if not enough else (DRIFTED if drifted else NO_DRIFT)
    return {"reference_share": p_ref, "current_share": p_cur, "n_current": n_cur, "p_value": p_value, "status": status, "drifted": drifted}


def _evidently_run(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    plan: dict[str, tuple[str, float]],
    columns: dict[str, FieldSpec],
    prediction_column: str | None,
    timestamp: dt.datetime | None = None,
) -> Any:
    """One Evidently Report: `ValueDrift` with the planned test per column, and `MissingValueCount` per column (for
    the HTML; its verdict is ours, so its default tests are off)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MissingValueCount, ValueDrift

    categorical = [c for c in plan if c in columns and columns[c].kind is FieldKind.CATEGORICAL]
    numerical = [c for c in plan if c not in categorical]
    keep = list(dict.fromkeys([*columns, *([prediction_column] if prediction_column else [])]))
    definition = DataDefinition(
        numerical_columns=numerical + [c for c in keep if c not in plan and (c not in columns or columns[c].kind is not FieldKind.CATEGORICAL)],
        categorical_columns=categorical + [c for c in keep if c not in plan and c in columns and columns[c].kind is FieldKind.CATEGORICAL],
    )
    metrics: list = [ValueDrift(column=c, method=m, threshold=t) for c, (m, t) in plan.items()]
    metrics += [MissingValueCount(column=c, tests=[], share_tests=[]) for c in keep]
    try:
        return Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur[keep].reset_index(drop=True), data_definition=definition),
            Dataset.from_pandas(ref[keep].reset_index(drop=True), data_definition=definition),
            timestamp=timestamp,
        )
    except Exception as exc:  # Evidently's own errors are terse; say which step failed and keep the cause
        raise DriftInputError(f"Evidently drift report failed on columns {list(plan)}: {exc}") from exc


def _naive_utc(t: dt.datetime | None) -> dt.datetime | None:
    """Evidently compares snapshot timestamps with its own naive ones (an aware one breaks `evidently ui` series)."""
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(dt.UTC).replace(tzinfo=None)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "scenario"


def _plain_html(title: str, lines: list[str]) -> str:
    import html

    items = "".join(f"<li>{html.escape(x)}</li>" for x in lines)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1><ul>{items}</ul></body></html>"


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
    """One scalar column per field (lists summarised, a missing list stays missing), typed the same way whatever
    the source frame was; the index is reset so masks line up."""
    out: dict[str, pd.Series] = {}
    frame = frame.reset_index(drop=True)
    for f in fields:
        s = frame[f.column]
        if f.kind is FieldKind.CATEGORICAL:
            out[_monitored_name(f)] = _as_category_text(s)
        elif f.kind is FieldKind.NUMERIC:
            out[_monitored_name(f)] = _as_float(s, f"column '{f.column}' (numeric field '{f.name}')", which)
        elif f.kind is FieldKind.SEQUENCE:
            out[_monitored_name(f)] = _list_stat(s, f, which, np.size)
        else:
            out[_monitored_name(f)] = _list_stat(s, f, which, _l2_norm)
    if prediction_column is not None:
        out[prediction_column] = _as_float(frame[prediction_column], f"prediction column '{prediction_column}'", which)
    # ±inf (a value, or a vector holding one) as missing: Evidently drops non-finite values before its tests, and a
    # column of them reached it empty and stopped the whole report; counted by the missing-share test instead
    non_finite: dict[str, int] = {}
    for col, values in out.items():
        if values.dtype == "float64":
            inf = np.isinf(values.to_numpy())
            if inf.any():
                non_finite[col] = int(inf.sum())
                out[col] = values.mask(inf)
    for flag in FALLBACK.values():
        if flag in frame.columns and flag not in out:
            out[flag] = frame[flag].astype("boolean")
    result = pd.DataFrame(out)
    result.attrs["non_finite"] = non_finite
    return result


def _as_category_text(s: pd.Series) -> pd.Series:
    """Categories as text, so int ids from one source and float ids (Feast fills gaps with NaN) from another match.

    Integer columns (int64, nullable Int64) are written from their exact values: an id of 2**62 + 1 or 2**63 - 1
    never passes through float64 (which rounds above 2**53). A float column is written as an integer where every
    value is integral and within int64's exact range, else as its float text."""
    notna = s.notna().to_numpy()
    if pd.api.types.is_integer_dtype(s.dtype):
        text = s.astype("Int64").astype(str).astype(object)
    elif pd.api.types.is_float_dtype(s.dtype):
        vals = s.to_numpy(dtype="float64", na_value=np.nan)
        finite = vals[~np.isnan(vals)]
        if np.all(finite == np.round(finite)) and (finite.size == 0 or np.abs(finite).max() < 2.0**53):
            text = pd.Series(vals, index=s.index).astype("Int64").astype(str).astype(object)
        else:
            text = s.astype(str).astype(object)
    else:
        text = s.astype(str).astype(object)
    return text.where(notna, None)


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


def _list_stat(s: pd.Series, f: FieldSpec, which: str, stat) -> pd.Series:
    values = np.empty(len(s), dtype="float64")
    bad = 0
    example = None
    for i, v in enumerate(s.to_numpy(dtype=object)):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            values[i] = math.nan  # missing, counted by the missing-share test
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
    """Per column: Evidently's test, score, threshold and verdict (its ValueDrift test status)."""
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
    return f"{r['test']} {_fmt(r['score'])}, threshold {_fmt(r['threshold'])}"


def _id_keys(s: pd.Series) -> pd.Series:
    """Ids as exact keys: integers as int64 (nullable), anything else as text."""
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("Int64")
    return _as_category_text(s)


def _id_coverage(reference: pd.DataFrame, current: pd.DataFrame, spec: FeatureSpec) -> dict[str, float | None]:
    """Share of current rows (with an id) whose large-id value was seen in the reference (cold-start pressure, not
    a verdict); ids compared as int64 when both sides are integers. None when no current row has an id."""
    cov: dict[str, float | None] = {}
    for f in spec.fields:
        if f.large and f.kind is FieldKind.CATEGORICAL:
            ref_ids, cur_ids = _id_keys(reference[f.column]), _id_keys(current[f.column])
            if ref_ids.dtype != cur_ids.dtype:  # one side int, the other not: compare as text
                ref_ids, cur_ids = _as_category_text(reference[f.column]), _as_category_text(current[f.column])
            cur_ids = cur_ids.dropna()
            cov[f.name] = float(cur_ids.isin(set(ref_ids.dropna())).mean()) if len(cur_ids) else None
    return cov
