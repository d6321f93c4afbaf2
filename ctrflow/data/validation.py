"""Data validation with Great Expectations 1.x: three suites (interactions, users, items) run before anything else.

Bad data caught here costs a readable message; caught later it costs a confusing training crash or, worse, a model
quietly trained on garbage. GX gives us the checks, a JSON record and an HTML data-docs site per run; this module
adds what GX lacks (cross-table references, checks on columns that may be missing) and turns the results into one
line per broken rule.

Cross-table rules (every interaction's user/item exists) are derived, not looked up row by row: a hash `isin`
builds a column holding the key where it is unknown and null elsewhere, and GX checks that column is all null,
so its unexpected values are exactly the unknown ids. That stays linear on millions of rows and keeps the id
sets out of the suite JSON. The same trick carries every per-row rule GX cannot state on the raw column (a NaN
inside a vector, epoch numbers in the wrong unit, a list cell that is not a list): a derived column holds an example
(the row key and the bad value) where the rule breaks and null elsewhere.

What is checked, by kind (each rule names its table, column, rule and row count):
- presence and types: required columns, unique column names, key dtypes, numeric fields stored as numbers,
  categoricals of one type, sequence cells that are lists of one element type, vectors of the declared length;
- values: keys not null and unique, labels in {0, 1}, known scenarios, no ±inf in numeric fields and no NaN or
  ±inf inside any vector (a NaN in a scalar numeric field is a missing value: it gets the encoder's "unknown"
  bucket, and is allowed);
- timestamps: datetime64[us, UTC] between `min_timestamp` and now; a column the loader could not convert
  (`tables.parse_timestamps` leaves it as it was) is checked as what it is: epoch numbers (the likely unit is
  named) or text (ISO 8601), so the report is written either way;
- declared fields: user and item fields in their tables, context fields (entity: context) in interactions, all
  under the same rules;
- emptiness: tables with no rows, declared fields null (NaN, empty text, empty list) in every row. Partly missing
  fields are normal and pass; more than `warn_null_share` missing gives a warning (a join upstream may have broken);
- labels: both classes overall (else a failure: AUC is undefined and nothing can be learned); the train, valid and
  test splits of `splits.make_split` (the features step's split) must each hold rows; a split, a scenario or a
  scenario within the valid or test split with one class gives a warning (its AUC will be undefined).
Warnings are GX expectations with severity "warning": they are in the report and the summary, and never fail a run.
(GX's own per-table `success` in the data docs and in validation.json's "results" counts them; ctrflow's verdict,
validation.json's top-level "success", counts only the critical ones.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrflow.data.spec import Entity, FieldKind, FieldSpec
from ctrflow.data.splits import SPLITS, make_split
from ctrflow.data.tables import BEHAVIOUR_COUNT_FIELDS, HIST_FIELD, TS_DTYPE, Dataset

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

log = logging.getLogger(__name__)
# GX's INFO lines (a dozen "Skipping registering function ..." on import, multi-line config dumps) drown the CLI's
# output; set before GX is first imported, which is where the first of them come from. An explicit level is kept.
_gx_log = logging.getLogger("great_expectations")
if _gx_log.level == logging.NOTSET:
    _gx_log.setLevel(logging.WARNING)

TABLES = ("interactions", "users", "items")
DATASOURCE = "ctrflow"
N_EXAMPLES = 5
# user fields that are derived from interactions (behaviour_table), never stored in the users table
DERIVED_USER_FIELDS = frozenset({"user_id", HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS})
SPLIT_COLUMN = "_split"  # derived: the split of each interaction, for the per-split label rules
SCORED_SPLITS = ("valid", "test")  # the splits whose per-scenario AUC training reports
# GX passes a not-null rule when the non-null share is at least `mostly`: any value at all passes this one
AT_LEAST_ONE = 1e-12
EPOCH_UNITS = (("seconds", 1.0), ("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
WARNING = "warning"


@dataclass
class ValidationReport:
    """What a validation run found, and where GX wrote its record."""

    success: bool
    failures: list[dict[str, Any]]
    json_path: Path
    html_path: Path
    dataset: str = ""
    n_expectations: int = 0
    row_counts: dict[str, int] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(validation_summary_lines(self))

    def warning_lines(self) -> list[str]:
        """One line per warning, in the failure lines' form (`<table>.<column>: <rule>; ...`)."""
        return [_failure_line(w) for w in self.warnings]


class DataValidationError(ValueError):
    """Raised when a dataset breaks one or more rules; str() is the readable summary."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(report.summary())


def validation_summary_lines(report: ValidationReport) -> list[str]:
    """The report as text lines: a verdict, one line per failed rule, then where the files are."""
    rows = ", ".join(f"{t} {n:,}" for t, n in report.row_counts.items())
    if report.success:
        head = f"Data validation passed for '{report.dataset}': {report.n_expectations} expectations ({rows} rows)."
    else:
        head = (
            f"Data validation FAILED for '{report.dataset}': {len(report.failures)} of {report.n_expectations} "
            f"expectations broken ({rows} rows)."
        )
    if report.warnings:
        head += f" {len(report.warnings)} warning{'s' if len(report.warnings) > 1 else ''}:"
    lines = [head]
    for f in report.failures:
        lines.append("  - " + _failure_line(f))
    for w in report.warnings:
        lines.append("  warning: " + _failure_line(w))
    lines.append(f"Report: {report.json_path} (JSON), {report.html_path} (HTML data docs)")
    return lines


def _failure_line(f: dict[str, Any]) -> str:
    where = f"{f['table']}.{f['column']}" if f.get("column") else f["table"]
    line = f"{where}: {f['rule']}"
    if f.get("error"):
        return f"{line}; could not be checked: {f['error']}"
    if f.get("unexpected_count") is not None:
        total = f.get("element_count")
        of = f" of {total:,}" if isinstance(total, int) else ""
        line += f"; {f['unexpected_count']:,}{of} rows broke it"
        if f.get("examples"):
            show = str if f.get("verbatim") else _show
            line += f"; examples: {', '.join(show(v) for v in f['examples'])}"
    elif f.get("missing"):
        line += f"; missing: {', '.join(_show(v) for v in f['missing'])}"
    elif f.get("observed") is not None:
        line += f"; observed: {f['observed']}"
    return line


def _show(value: Any) -> str:
    """One example value, short: long vectors are shown by their length."""
    if isinstance(value, list | tuple | np.ndarray) and len(value) > 8:
        return f"<vector of length {len(value)}>"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + ")"
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------------------------
# suites


def _expect(cls_name: str, table: str, about: str, rule: str, *, verbatim: bool = False, **kwargs: Any):
    """A GX expectation carrying, in its meta, the table, the column it is `about` and the rule in words.

    `verbatim`: its examples are ready-made text ("item_id 7 (nan at [0])"), shown without quotes.
    """
    import great_expectations.expectations as gxe

    meta = {"table": table, "column": about, "rule": rule, **({"verbatim": True} if verbatim else {})}
    return getattr(gxe, cls_name)(meta=meta, **kwargs)


def _per_row(
    table: str,
    about: str,
    rule: str,
    derived: dict[str, pd.Series],
    name: str,
    values: pd.Series,
    verbatim: bool = True,
):
    """A per-row rule on a derived column (`values`: an example where the rule breaks, null elsewhere)."""
    derived[name] = values
    return _expect("ExpectColumnValuesToBeNull", table, about, rule, verbatim=verbatim, column=name)


def _exists(table: str, df: pd.DataFrame, columns: list[str]) -> tuple[list, list[str]]:
    """ExpectColumnToExist for each required column; returns the expectations and the columns that are present."""
    exps = [_expect("ExpectColumnToExist", table, c, f"required column '{c}' is missing", column=c) for c in columns]
    return exps, [c for c in columns if c in df.columns]


def _unknown_keys(keys: pd.Series, reference: pd.Series) -> pd.Series:
    """The key where it is not in `reference`, null elsewhere (nulls themselves count as known: not-null reports them)."""
    known = keys.isin(reference.dropna().unique()) | keys.isna()
    out = keys.astype("Int64") if pd.api.types.is_integer_dtype(keys) else keys.astype(object)
    return out.mask(known)


def _interactions_suite(
    ds: Dataset,
    min_rows: int,
    max_rows: int | None,
    lo: pd.Timestamp,
    hi: pd.Timestamp,
    split_method: str = "temporal",
    seed: int = 0,
    warn_null_share: float = 0.9,
) -> tuple[list, dict[str, pd.Series]]:
    spec, df, t = ds.spec, ds.interactions, "interactions"
    user, item, scen, label, ts = spec.user_key, spec.item_key, spec.scenario_field, spec.label, spec.timestamp
    # declared context fields (entity: context) live in this table: the same per-field rules as user/item fields
    context = [f for f in spec.of_entity(Entity.CONTEXT) if f.column not in (user, item, scen, label, ts)]
    exps, present = _exists(t, df, [user, item, scen, label, ts, *[f.column for f in context]])
    derived: dict[str, pd.Series] = {}
    for f in context:
        if f.column in present:
            exps.extend(_field_rules(t, f, df[f.column], lambda i: f"row {i}", derived, warn_null_share))
    rows = f"between {min_rows:,} and {max_rows:,}" if max_rows is not None else f"at least {min_rows:,}"
    exps.append(
        _expect(
            "ExpectTableRowCountToBeBetween", t, "", f"row count must be {rows}", min_value=min_rows, max_value=max_rows
        )
    )
    for c in (user, item):
        if c in present:
            exps.append(_expect("ExpectColumnValuesToNotBeNull", t, c, f"{c} must not be null", column=c))
            exps.append(_expect("ExpectColumnTypeToBe", t, c, f"{c} must have dtype int64", column=c, type_="int64"))
    if label in present:
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, label, f"{label} must not be null", column=label))
        exps.append(
            _expect("ExpectColumnTypeToBe", t, label, f"{label} must have dtype int64", column=label, type_="int64")
        )
        exps.append(
            _expect(
                "ExpectColumnValuesToBeInSet", t, label, f"{label} must be in {{0, 1}}", column=label, value_set=[0, 1]
            )
        )
        if _is_int(df[label]):
            counts = _class_counts(df[label])
            exps.append(
                _expect(
                    "ExpectColumnDistinctValuesToContainSet",
                    t,
                    label,
                    f"{label} must hold both classes, 0 (no click) and 1 (click), or AUC is undefined and nothing can "
                    f"be learned ({counts})",
                    column=label,
                    value_set=[0, 1],
                )
            )
    if scen in present:
        allowed = "{" + ", ".join(spec.scenarios) + "}"
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, scen, f"{scen} must not be null", column=scen))
        # the value set is the type check too (only the spec's strings pass); a per-row type check costs ~1 s/M rows
        exps.append(
            _expect(
                "ExpectColumnValuesToBeInSet",
                t,
                scen,
                f"{scen} must be one of the spec's scenarios {allowed}",
                column=scen,
                value_set=list(spec.scenarios),
            )
        )
    if ts in present:
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, ts, f"{ts} must not be null", column=ts))
        exps.append(
            _expect("ExpectColumnTypeToBe", t, ts, f"{ts} must have dtype {TS_DTYPE}", column=ts, type_=TS_DTYPE)
        )
        # a column the loader could not convert: say what is wrong with its values (unit, text), row by row
        unparsed = _unparsed_timestamps(df[ts], ts, lo, hi)
        if unparsed is not None:
            rule, values = unparsed
            exps.append(_per_row(t, ts, rule, derived, f"{ts}_unparsed", values, verbatim=False))
        # comparing a naive or non-datetime column with UTC bounds raises: the dtype rule above reports it instead
        if isinstance(df[ts].dtype, pd.DatetimeTZDtype):
            exps.append(
                _expect(
                    "ExpectColumnValuesToBeBetween",
                    t,
                    ts,
                    f"{ts} must be between {lo.isoformat()} and now ({hi.isoformat()}): no events from the future",
                    column=ts,
                    min_value=lo.to_pydatetime(),
                    max_value=hi.to_pydatetime(),
                )
            )
    key = [user, item, ts]
    if all(c in present for c in key):
        exps.append(
            _expect(
                "ExpectCompoundColumnsToBeUnique",
                t,
                f"({', '.join(key)})",
                "this key must be unique: one event per user, item and timestamp",
                column_list=key,
            )
        )
    for c, other, table in ((user, ds.users, "users"), (item, ds.items, "items")):
        if c in present and c in other.columns:
            name = f"{c}_not_in_{table}"
            derived[name] = _unknown_keys(df[c], other[c])
            exps.append(_expect("ExpectColumnValuesToBeNull", t, c, f"{c} must exist in {table}.{c}", column=name))
    exps.extend(_split_rules(ds, split_method, seed, derived))
    return exps, derived


def _is_int(col: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _class_counts(labels: pd.Series) -> str:
    """'0: 1,234 rows, 1: 56 rows' (the two classes, zero counts included)."""
    n1 = int((labels == 1).sum())
    n0 = int((labels == 0).sum())
    return f"0: {n0:,} rows, 1: {n1:,} rows"


def _split_rules(ds: Dataset, method: str, seed: int, derived: dict[str, pd.Series]) -> list:
    """Every split non-empty (a failure); a split, a scenario, or a scenario of a scored split with one class (warnings).

    The split is `splits.make_split` with the features step's settings, so these are the rows training will see.
    Each class rule is one GX expectation over a derived column holding '<group>:<label>' per row: the distinct
    values must contain both classes of every group, and GX's missing values name the group and the absent class.
    (Row conditions, one expectation per group, cost ~0.7 s each on 500k rows; this costs one pass per level.)
    Only run when the label and timestamp columns are sound: on broken columns their own rules report them.
    """
    spec, df, t = ds.spec, ds.interactions, "interactions"
    label, scen, ts = spec.label, spec.scenario_field, spec.timestamp
    if df.empty or label not in df.columns or not _is_int(df[label]) or df[label].isna().any():
        return []
    if method == "temporal" and (ts not in df.columns or str(df[ts].dtype) != TS_DTYPE or df[ts].isna().any()):
        return []
    split = make_split(df, method, seed=seed)
    derived[SPLIT_COLUMN] = split.astype(object)
    sizes = split.value_counts()
    setting = f"data.split={method}" + (f", data.seed={seed}" if method == "random" else "")
    shown = ", ".join(f"{s} {int(sizes.get(s, 0)):,}" for s in SPLITS)
    exps = [
        _expect(
            "ExpectColumnDistinctValuesToContainSet",
            t,
            "split",
            f"every split must hold rows ({setting}: {shown} rows)",
            column=SPLIT_COLUMN,
            value_set=list(SPLITS),
        )
    ]
    y = df[label].to_numpy()
    if len(np.unique(y)) < 2:
        return exps  # the overall both-classes rule fails: one line says it all
    split_code = pd.Categorical(split, categories=list(SPLITS)).codes
    has_scen = scen in df.columns
    scen_code = pd.Categorical(df[scen], categories=list(spec.scenarios)).codes if has_scen else None

    def level(name: str, about: str, groups: list[str], code: np.ndarray, only: list[int]) -> None:
        """One warning over the groups `only` (indices into `groups`); rows of other groups are left null."""
        if not only:
            return
        values = np.array([f"{g}:{c}" for g in groups for c in (0, 1)] + [None], dtype=object)
        keep = np.isin(code, only) & np.isin(y, (0, 1))
        index = np.where(keep, code * 2 + np.clip(y, 0, 1), len(values) - 1)
        derived[name] = pd.Series(values[index], index=df.index)
        lacking = []
        for g in only:
            classes = np.unique(y[code == g])
            if len(classes) == 0:
                lacking.append(f"{groups[g]} holds no rows")
            elif len(classes) == 1:
                lacking.append(f"{groups[g]} holds {int((code == g).sum()):,} rows, all {int(classes[0])}")
        rule = f"{about} should hold both classes of {label}, or AUC is undefined there" + (
            f" ({'; '.join(lacking)})" if lacking else ""
        )
        exps.append(
            _expect(
                "ExpectColumnDistinctValuesToContainSet",
                t,
                label,
                rule,
                column=name,
                value_set=[f"{groups[g]}:{c}" for g in only for c in (0, 1)],
                severity=WARNING,
            )
        )

    def one_class(code: np.ndarray, g: int) -> bool:
        return len(np.unique(y[code == g])) == 1

    nonempty_splits = [g for g in range(len(SPLITS)) if (split_code == g).any()]
    level(f"{label}_by_split", f"each split ({setting})", list(SPLITS), split_code, nonempty_splits)
    if scen_code is None:
        return exps
    # every declared scenario: one without rows trains its tower on nothing and gets no AUC
    level(f"{label}_by_scenario", "each scenario", list(spec.scenarios), scen_code, list(range(len(spec.scenarios))))
    # scenario within the valid and test splits (per-scenario AUC is reported there); a scenario or split that holds
    # one class throughout is said once, above
    pairs = [f"{sc} in {sp}" for sp in SCORED_SPLITS for sc in spec.scenarios]
    pair_code = np.full(len(df), -1)
    wanted = []
    for i, sp in enumerate(SCORED_SPLITS):
        g_split = SPLITS.index(sp)
        for j in range(len(spec.scenarios)):
            g = i * len(spec.scenarios) + j
            rows = (split_code == g_split) & (scen_code == j)
            pair_code[rows] = g
            said = not (split_code == g_split).any() or one_class(split_code, g_split) or one_class(scen_code, j)
            if (scen_code == j).any() and not said:
                wanted.append(g)
    level(f"{label}_by_scenario_and_split", "each scenario within the valid and test splits", pairs, pair_code, wanted)
    return exps


def _unparsed_timestamps(col: pd.Series, name: str, lo: pd.Timestamp, hi: pd.Timestamp) -> tuple[str, pd.Series] | None:
    """For a timestamp column held as numbers or text: the rule in words, and the raw value where a row breaks it.

    Numbers are read as epoch seconds (as `tables.to_utc_us` does); where they fall outside [lo, hi] the rule names
    the epoch unit (s, ms, us, ns) that would put most of them in range. Text must be ISO 8601. None for datetime
    columns (the dtype and range rules cover them).
    """
    if isinstance(col.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(col):
        return None
    lo_s, hi_s = lo.timestamp(), hi.timestamp()
    span = f"between {lo.isoformat()} and now ({hi.isoformat()})"
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        seconds = col.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isnan(seconds) & ~((seconds >= lo_s) & (seconds <= hi_s))
        rule = f"{name} holds numbers, read as epoch seconds, which must fall {span}" + _unit_hint(
            seconds[bad], lo_s, hi_s
        )
    else:
        parsed = pd.to_datetime(col, utc=True, errors="coerce", format="ISO8601")
        bad = (col.notna() & (parsed.isna() | (parsed < lo) | (parsed > hi))).to_numpy()
        rule = f"{name} must be a timestamp; text must be an ISO 8601 date-time {span}"
        numbers = pd.to_numeric(col[bad], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        numbers = numbers[np.isfinite(numbers)]
        if len(numbers):
            rule += f"; {len(numbers):,} are numbers as text" + _unit_hint(numbers, lo_s, hi_s)
    values = col.astype("Int64") if _is_int(col) else col.astype(object)
    return rule, values.mask(~bad)


def _unit_hint(numbers: np.ndarray, lo_s: float, hi_s: float) -> str:
    """'; the likely unit is epoch milliseconds (...)': the epoch unit that puts most of `numbers` in [lo_s, hi_s]."""
    finite = numbers[np.isfinite(numbers)]
    if not len(finite):
        return ""
    fits = {unit: int(((finite / f >= lo_s) & (finite / f <= hi_s)).sum()) for unit, f in EPOCH_UNITS}
    unit = max(fits, key=lambda u: fits[u])
    if not fits[unit]:
        return "; no epoch unit (seconds, milliseconds, microseconds, nanoseconds) puts them in range"
    return (
        f"; the likely unit is epoch {unit} ({fits[unit]:,} of the {len(numbers):,} rows outside fall in range read "
        f"as {unit}): store epoch seconds or a UTC timestamp"
    )


def _profile_suite(ds: Dataset, table: str, warn_null_share: float) -> tuple[list, dict[str, pd.Series]]:
    """users or items: the key (present, int64, not null, unique), at least one row, and every declared field."""
    spec, df, t = ds.spec, getattr(ds, table), table
    entity, key = (Entity.USER, spec.user_key) if table == "users" else (Entity.ITEM, spec.item_key)
    fields = [f for f in spec.of_entity(entity) if f.name not in DERIVED_USER_FIELDS and f.column != key]
    exps, present = _exists(t, df, [key, *[f.column for f in fields]])
    derived: dict[str, pd.Series] = {}
    exps.append(_expect("ExpectTableRowCountToBeBetween", t, "", f"{t} must hold at least one row", min_value=1))
    if key in present:
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, key, f"{key} must not be null", column=key))
        exps.append(_expect("ExpectColumnValuesToBeUnique", t, key, f"{key} must be unique", column=key))
        exps.append(_expect("ExpectColumnTypeToBe", t, key, f"{key} must have dtype int64", column=key, type_="int64"))
        keys = df[key].to_numpy()

        def row_name(i: int) -> str:
            return f"{key} {_show(keys[i])}"
    else:

        def row_name(i: int) -> str:
            return f"row {i}"

    for f in fields:
        if f.column in present:
            exps.extend(_field_rules(t, f, df[f.column], row_name, derived, warn_null_share))
    return exps, derived


def _field_rules(
    t: str, f: FieldSpec, col: pd.Series, row_name: Any, derived: dict[str, pd.Series], warn_null_share: float
) -> list:
    """The rules of one declared user/item field: not empty throughout, and its kind's rules on every row.

    `row_name(i)` labels row i in examples ("item_id 7"). A rule that cannot break for the column's dtype (±inf in an
    int column, mixed types in a str column) is not run.
    """
    c = f.column
    exps = []
    blank = _blank(col)
    if len(col):
        target = c
        if _is_object(col) and (blank & col.notna().to_numpy()).any():  # empty text or lists count as missing
            target = f"{c}_present"
            derived[target] = col.mask(blank)
        exps.append(
            _expect(
                "ExpectColumnValuesToNotBeNull",
                t,
                c,
                f"{c} must hold a value in at least one row (it is null, NaN or empty in every row)",
                column=target,
                mostly=AT_LEAST_ONE,
            )
        )
        if not blank.all() and warn_null_share < 1:
            exps.append(
                _expect(
                    "ExpectColumnValuesToNotBeNull",
                    t,
                    c,
                    f"{c} should be missing (null, NaN or empty) in at most {warn_null_share:.0%} of rows: this much "
                    "missing often means a broken join upstream",
                    column=target,
                    mostly=1.0 - warn_null_share,
                    severity=WARNING,
                )
            )

    def per_row(suffix: str, rule: str, problem: Any, only: np.ndarray | None = None) -> None:
        """A rule checked row by row: `problem(value)` says what is wrong with one cell, or None.

        Checked on the rows in `only` (default: the non-null ones); an example is the row's name and the problem.
        """
        check = col.notna().to_numpy() if only is None else only
        found = np.full(len(col), None, dtype=object)
        cells = col.to_numpy()
        for i in np.flatnonzero(check):
            why = problem(cells[i])
            if why is not None:
                found[i] = f"{row_name(i)} ({why})"
        exps.append(_per_row(t, c, rule, derived, f"{c}_{suffix}", pd.Series(found, index=col.index)))

    if f.kind is FieldKind.CATEGORICAL and col.dtype == object:  # a str/int/float dtype holds one type
        kinds = _kinds(col)  # vectorised: type() per cell, then one lookup per distinct type
        present = col.notna().to_numpy()
        scalar = pd.Series(kinds[present & np.isin(kinds, SCALAR_KINDS)], dtype=object)
        major = scalar.mode().iloc[0] if len(scalar) else "str"
        per_row(
            "mixed_types",
            f"{c} is categorical: its values must be scalars of one type (mostly {major} here); mixed types collide "
            "or split once written as text",
            lambda v: f"{_short(v)} is {_kind(v)}",
            only=present & (kinds != major),
        )
    elif f.kind is FieldKind.NUMERIC:
        if not pd.api.types.is_numeric_dtype(col):
            per_row(
                "not_numbers",
                f"{c} is a numeric field: it must be stored as numbers (an int or float dtype), not {col.dtype}",
                lambda v: None if _is_missing(v) else _short(v),
            )
        elif pd.api.types.is_float_dtype(col):
            per_row(
                "non_finite",
                f"{c} must be finite: ±inf breaks its quantile buckets (NaN is a missing value and is allowed)",
                str,
                only=np.isinf(col.to_numpy(dtype=np.float64, na_value=np.nan)),
            )
    elif f.kind is FieldKind.SEQUENCE:
        per_row(
            "not_a_list",
            f"{c} is a sequence field: each cell must be a list (or missing)",
            lambda v: None if _is_missing(v) or _is_flat_list(v) else f"{_short(v)} is not a list",
        )
        element_kinds = pd.Series([k for v in col if _is_flat_list(v) for k in _element_kinds(v)], dtype=object)
        major = element_kinds.mode().iloc[0] if len(element_kinds) else "str"
        per_row(
            "element_types",
            f"the elements of {c} must all be of one type (mostly {major} here)",
            lambda v: _odd_element(v, major) if _is_flat_list(v) else None,
        )
    elif f.kind is FieldKind.EMBEDDING:
        name = f"{c}_length"
        lengths = _vector_lengths(col)
        derived[name] = lengths
        exps.append(
            _expect(
                "ExpectColumnValuesToBeInSet",
                t,
                c,
                f"{c} must be a vector of length {f.dim} (examples are lengths; -1 = not a vector)",
                column=name,
                value_set=[f.dim],
            )
        )
        per_row(
            "non_finite",
            f"every element of {c} must be a finite number: one NaN or ±inf inside a vector makes training diverge "
            "(a missing vector is allowed)",
            _non_finite,
            only=_maybe_non_finite(col, (lengths == f.dim).fillna(False).to_numpy(dtype=bool)),
        )
    return exps


SCALAR_KINDS = ("str", "int", "float", "bool", "bytes")


def _is_object(col: pd.Series) -> bool:
    """Python objects or pandas strings: cells that may be text, lists or anything else."""
    return col.dtype == object or isinstance(col.dtype, pd.StringDtype)


def _is_missing(v: Any) -> bool:
    """None, NaN, NaT, pd.NA (a list or array is never missing, even if empty)."""
    if v is None:
        return True
    if isinstance(v, list | tuple | np.ndarray | dict | set):
        return False
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _blank(col: pd.Series) -> np.ndarray:
    """Per row: missing, empty or blank text, or an empty list: the value carries nothing."""
    out = col.isna().to_numpy().copy()
    if not _is_object(col):
        return out
    kinds = _kinds(col)
    text = kinds == "str"
    if text.any():
        out[text] = col[text].str.strip().eq("").to_numpy(dtype=bool)
    lists = kinds == "list"
    if lists.any():
        out[lists] = col[lists].map(len).to_numpy() == 0
    return out


def _kind(v: Any) -> str:
    """A value's type in words: bool, int, float, str, bytes, list, or the Python type's name."""
    return _kind_of_type(type(v))


def _kind_of_type(t: type) -> str:
    for kind, types in (
        ("bool", (bool, np.bool_)),
        ("int", (int, np.integer)),
        ("float", (float, np.floating)),
        ("str", (str,)),
        ("bytes", (bytes,)),
        ("list", (list, tuple, np.ndarray)),
    ):
        if issubclass(t, types):
            return kind
    return t.__name__


def _kinds(col: pd.Series) -> np.ndarray:
    """_kind of every cell (an object array), with one Python call per distinct type, not per cell."""
    types = col.map(type)
    lookup = {t: _kind_of_type(t) for t in pd.unique(types)}
    return types.map(lookup).to_numpy(dtype=object)


def _short(v: Any) -> str:
    text = _show(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_flat_list(v: Any) -> bool:
    """A list, tuple or 1-D array whose elements are not themselves lists."""
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and (v.dtype != object or not any(isinstance(x, list | tuple | np.ndarray) for x in v))
    if isinstance(v, list | tuple):
        return not any(isinstance(x, list | tuple | np.ndarray) for x in v)
    return False


def _element_kinds(v: Any) -> set[str]:
    if isinstance(v, np.ndarray) and v.dtype != object:
        return {_kind(v.dtype.type(0))} if len(v) else set()
    return {_kind(x) for x in v if not _is_missing(x)}


def _odd_element(v: Any, major: str) -> str | None:
    """'3 at [1] is int' for the first element whose type is not `major`; None when all are."""
    if major in _element_kinds(v) and len(_element_kinds(v)) == 1:
        return None
    for i, x in enumerate(v):
        if not _is_missing(x) and _kind(x) != major:
            return f"{_short(x)} at [{i}] is {_kind(x)}"
    return None


def _maybe_non_finite(col: pd.Series, rows: np.ndarray) -> np.ndarray:
    """The rows (of `rows`: vectors of the declared length) that _non_finite must look at one by one.

    Fast path: numeric vectors stack into one matrix, and only the rows holding a NaN or ±inf are kept. Otherwise
    (lists of mixed objects, text inside) every row is.
    """
    cells = col.to_numpy()[rows]
    try:
        matrix = np.stack(cells) if len(cells) else np.zeros((0, 0))
    except (ValueError, TypeError):
        return rows
    if matrix.dtype.kind not in "iufb":
        return rows
    out = rows.copy()
    out[rows] = ~np.isfinite(matrix.astype(np.float64, copy=False)).all(axis=1)
    return out


def _non_finite(v: Any) -> str | None:
    """'nan at [0]' for the first element of a vector that is not a finite number; None when every one is."""
    if isinstance(v, np.ndarray) and v.dtype.kind in "iufb":
        a = v.astype(np.float64, copy=False)
    else:
        for i, x in enumerate(v):
            if _kind(x) not in ("int", "float", "bool"):
                return f"{_short(x)} at [{i}] is not a number"
        a = np.asarray(v, dtype=np.float64)
    finite = np.isfinite(a)
    if finite.all():
        return None
    i = int(np.argmin(finite))
    return f"{a[i]} at [{i}]"


def _vector_lengths(column: pd.Series) -> pd.Series:
    """Length of each vector (GX measures string lengths only); null stays null, a non-vector is -1.

    A cell is a vector when it is a list, tuple or 1-D array of scalars: text, a scalar or a list of lists is not.
    """

    def length(v: Any) -> Any:
        if _is_missing(v):
            return pd.NA
        return len(v) if _is_flat_list(v) else -1

    return pd.Series([length(v) for v in column], index=column.index, dtype="Int64")


# ---------------------------------------------------------------------------------------------------------------
# running


def _context(report_dir: Path):
    """A file-backed GX context in report_dir: it keeps suites, results and the data-docs site side by side."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(report_dir))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def _run_table(ctx, table: str, frame: pd.DataFrame, expectations: list, run_id) -> Any:
    import great_expectations as gx

    source = (
        ctx.data_sources.add_or_update_pandas(DATASOURCE) if table == TABLES[0] else ctx.data_sources.get(DATASOURCE)
    )
    try:
        asset = source.get_asset(table)
    except LookupError:
        asset = source.add_dataframe_asset(table)
    try:
        batch = asset.get_batch_definition("whole")
    except (KeyError, LookupError):
        batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = gx.ExpectationSuite(name=table, expectations=expectations)
    suite = ctx.suites.add_or_update(suite)
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=table, data=batch, suite=suite))
    return vd.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 4 * N_EXAMPLES},
        run_id=run_id,
    )


def _exception_message(info: dict) -> str | None:
    """GX keeps an expectation's exception either flat or per metric; return the first message."""
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return str(v.get("exception_message"))
    return None


def _distinct(values: list) -> list:
    """The first N_EXAMPLES distinct values (GX lists the first unexpected rows, often repeats)."""
    seen, out = set(), []
    for v in values:
        key = repr(v)
        if key not in seen:
            seen.add(key)
            out.append(_plain(v))
    return out[:N_EXAMPLES]


def _failures(table: str, result: Any, columns: list[str]) -> list[dict[str, Any]]:
    """One plain dict per failed expectation: table, column, rule in words, count, a few distinct examples."""
    out = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        meta, res = cfg.meta or {}, r.result or {}
        failure: dict[str, Any] = {
            "table": table,
            "expectation": cfg.type,
            "column": meta.get("column", cfg.kwargs.get("column", "")),
            "rule": meta.get("rule", cfg.type),
            "severity": getattr(cfg.severity, "value", str(cfg.severity)),
            "unexpected_count": res.get("unexpected_count"),
            "element_count": res.get("element_count"),
            "examples": _distinct(list(res.get("partial_unexpected_list") or [])),
            "missing": sorted((_plain(v) for v in res.get("partial_missing_list") or []), key=str),
            "observed": res.get("observed_value"),
            "error": _exception_message(r.exception_info or {}),
            "verbatim": bool(meta.get("verbatim")),
        }
        if cfg.type == "expect_column_to_exist":
            failure["observed"] = f"columns present: {columns}"
        elif cfg.type == "expect_column_values_to_not_be_null":
            failure["examples"] = []  # the examples would all be null
        elif cfg.type == "expect_table_row_count_to_be_between" and isinstance(failure["observed"], int):
            failure["observed"] = f"{failure['observed']:,} rows"
        out.append(failure)
    return out


def validate_dataset(
    dataset: Dataset,
    report_dir: str | Path,
    *,
    min_rows: int = 1,
    max_rows: int | None = None,
    min_timestamp: str = "1990-01-01",
    now: pd.Timestamp | None = None,
    split_method: str = "temporal",
    seed: int = 0,
    warn_null_share: float = 0.9,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Run the interactions, users and items suites with GX; write JSON + data docs to report_dir.

    `split_method`/`seed` are the features step's split (params data.split, data.seed): the per-split rules check
    the rows each split will hold. `warn_null_share` (a share in [0, 1]): a declared field missing in more rows than
    that gets a warning. The input frames are not modified (derived columns live in a separate frame). Raises
    DataValidationError (str() = the readable summary) when a rule is broken and raise_on_failure is true; warnings
    never raise (they are in report.warnings, the summary and the JSON).
    """
    from great_expectations.core.run_identifier import RunIdentifier

    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    lo = _utc(pd.Timestamp(min_timestamp))
    hi = _utc(now if now is not None else pd.Timestamp.now(tz="UTC"))
    run_id = RunIdentifier(run_name=f"{dataset.name}-validation", run_time=pd.Timestamp.now(tz="UTC").to_pydatetime())

    # repeated column names: the repeats are renamed so every rule sees one column, and a rule reports them
    unique = {t: _unique_columns(getattr(dataset, t)) for t in TABLES}
    view = dataclasses.replace(dataset, **{t: frame for t, (frame, _) in unique.items()})
    inter_exps, inter_derived = _interactions_suite(
        view, min_rows, max_rows, lo, hi, split_method, seed, warn_null_share
    )
    inter_exps += _shadowing_rules(view.interactions, dataset.spec, inter_derived)
    user_exps, user_derived = _profile_suite(view, "users", warn_null_share)
    item_exps, item_derived = _profile_suite(view, "items", warn_null_share)
    suites = {
        "interactions": (inter_exps, inter_derived),
        "users": (user_exps, user_derived),
        "items": (item_exps, item_derived),
    }
    plan = {}
    for t, (exps, derived) in suites.items():
        frame, repeats = unique[t]
        plan[t] = (_with_columns(frame, derived), _repeat_rules(t, frame, repeats) + exps)

    ctx = _context(report_dir)
    results, found, n_exp = {}, [], 0
    for table, (frame, exps) in plan.items():
        log.info("validating %s: %d rows, %d expectations", table, len(frame), len(exps))
        result = _run_table(ctx, table, frame, exps, run_id)
        results[table] = result
        found.extend(_failures(table, result, list(getattr(dataset, table).columns)))
        n_exp += len(exps)
    ctx.build_data_docs()
    html_path = report_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    failures = [f for f in found if f["severity"] != WARNING]
    warnings = [f for f in found if f["severity"] == WARNING]

    json_path = report_dir / "validation.json"
    success = not failures
    payload = {
        "dataset": dataset.name,
        "success": success,
        "run_time": run_id.run_time.isoformat(),
        "bounds": {"min_timestamp": lo.isoformat(), "now": hi.isoformat(), "min_rows": min_rows, "max_rows": max_rows},
        "split": {"method": split_method, "seed": seed},
        "failures": failures,
        "warnings": warnings,
        "results": {t: r.to_json_dict() for t, r in results.items()},
    }
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default))

    report = ValidationReport(
        success=success,
        failures=failures,
        json_path=json_path,
        html_path=html_path,
        dataset=dataset.name,
        n_expectations=n_exp,
        row_counts={t: len(f) for t, (f, _) in plan.items()},
        warnings=warnings,
    )
    log.info("validation %s; report in %s", "passed" if success else "FAILED", report_dir)
    for w in warnings:
        log.warning("validation warning: %s", _failure_line(w))
    if not success and raise_on_failure:
        raise DataValidationError(report)
    return report


def _unique_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The frame with a RangeIndex and each repeated column name renamed ('gender' -> 'gender__2'); the renames.

    A shallow copy: the caller's frame and data are untouched. The RangeIndex lets derived columns join by position
    (a loaded Parquet may carry a repeated index, which pandas cannot align on).
    """
    out = frame.copy(deep=False)
    out.index = pd.RangeIndex(len(out))
    names = [str(c) for c in out.columns]
    seen: dict[str, int] = {}
    taken = set(names)
    repeats: dict[str, list[str]] = {}
    new = []
    for c in names:
        seen[c] = seen.get(c, 0) + 1
        if seen[c] == 1:
            new.append(c)
            continue
        k = seen[c]
        while f"{c}__{k}" in taken:
            k += 1
        taken.add(f"{c}__{k}")
        repeats.setdefault(c, []).append(f"{c}__{k}")
        new.append(f"{c}__{k}")
    out.columns = new
    return out, repeats


def _repeat_rules(table: str, frame: pd.DataFrame, repeats: dict[str, list[str]]) -> list:
    """One rule per repeated column name: the frame's columns, less its renamed repeats, is the set it must have."""
    exps = []
    for name, renamed in repeats.items():
        exps.append(
            _expect(
                "ExpectTableColumnsToMatchSet",
                table,
                name,
                f"column name '{name}' must appear once; it appears {len(renamed) + 1} times (checked here as "
                f"{', '.join([name, *renamed])})",
                column_set=[c for c in frame.columns if c not in renamed],
                exact_match=True,
            )
        )
    return exps


def _shadowing_rules(interactions: pd.DataFrame, spec: Any, derived: dict[str, pd.Series]) -> list:
    """One rule per undeclared interactions column named like a user or item field, or like a column the features
    step derives: the training frame is the interactions joined with those, so such a column used to pass validation
    and stop the features step ("entity_df: columns [...] are features of service ..."). Every row holding it breaks
    the rule (a null shows as 'null'). Other undeclared columns are carried along unused."""
    own = {f.column: f for f in spec.fields if f.entity is not Entity.CONTEXT}
    made = {"split", HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS}
    keys = {spec.user_key, spec.item_key, spec.scenario_field, spec.label, "event_timestamp"}
    exps = []
    for c in interactions.columns:
        if c in keys or (c not in own and c not in made):
            continue
        what = f"the {own[c].entity.value} field '{own[c].name}'" if c in own else "a column the features step makes"
        col = interactions[c].astype(object)
        exps.append(
            _per_row(
                "interactions", c,
                f"column '{c}' is not a context field of schema.yaml but is named like {what}: the training frame "
                "would hold it twice; drop or rename it (or declare a context field of another name)",
                derived, f"_{c}_shadows_a_field", col.where(col.notna(), "null"), verbatim=False,
            )
        )  # fmt: skip
    return exps


def _with_columns(frame: pd.DataFrame, derived: dict[str, pd.Series]) -> pd.DataFrame:
    """A new frame with the derived columns appended by position, sharing the caller's data (no copy, no mutation)."""
    if not derived:
        return frame
    extra = pd.DataFrame({k: v.array for k, v in derived.items()}, index=frame.index)
    return pd.concat([frame, extra], axis=1, copy=False)


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _plain(value: Any) -> Any:
    """numpy scalars as Python values, so failures print and serialise plainly."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


__all__ = ["DataValidationError", "ValidationReport", "validate_dataset", "validation_summary_lines"]
