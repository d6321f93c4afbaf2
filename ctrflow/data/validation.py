"""Data validation with Great Expectations 1.x: three suites (interactions, users, items) run before anything else.

Bad data caught here costs a readable message; caught later it costs a confusing training crash or, worse, a model
quietly trained on garbage. GX gives us the checks, a JSON record and an HTML data-docs site per run; this module
adds what GX lacks (cross-table references, checks on columns that may be missing) and turns the results into one
line per broken rule.

Cross-table rules (every interaction's user/item exists) are derived, not looked up row by row: a hash `isin`
builds a column holding the key where it is unknown and null elsewhere, and GX checks that column is all null,
so its unexpected values are exactly the unknown ids. That stays linear on millions of rows and keeps the id
sets out of the suite JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctrflow.data.spec import Entity, FieldKind
from ctrflow.data.tables import BEHAVIOUR_COUNT_FIELDS, HIST_FIELD, TS_DTYPE, Dataset

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

log = logging.getLogger(__name__)

TABLES = ("interactions", "users", "items")
DATASOURCE = "ctrflow"
N_EXAMPLES = 5
# user fields that are derived from interactions (behaviour_table), never stored in the users table
DERIVED_USER_FIELDS = frozenset({"user_id", HIST_FIELD, *BEHAVIOUR_COUNT_FIELDS})


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

    def summary(self) -> str:
        return "\n".join(validation_summary_lines(self))


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
    lines = [head]
    for f in report.failures:
        lines.append("  - " + _failure_line(f))
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
            line += f"; examples: {', '.join(_show(v) for v in f['examples'])}"
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


def _expect(cls_name: str, table: str, about: str, rule: str, **kwargs: Any):
    """A GX expectation carrying, in its meta, the table, the column it is `about` and the rule in words."""
    import great_expectations.expectations as gxe

    return getattr(gxe, cls_name)(meta={"table": table, "column": about, "rule": rule}, **kwargs)


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
    ds: Dataset, min_rows: int, max_rows: int | None, lo: pd.Timestamp, hi: pd.Timestamp
) -> tuple[list, dict[str, pd.Series]]:
    spec, df, t = ds.spec, ds.interactions, "interactions"
    user, item, scen, label, ts = spec.user_key, spec.item_key, spec.scenario_field, spec.label, spec.timestamp
    exps, present = _exists(t, df, [user, item, scen, label, ts])
    derived: dict[str, pd.Series] = {}
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
    return exps, derived


def _users_suite(ds: Dataset) -> list:
    spec, df, t = ds.spec, ds.users, "users"
    user = spec.user_key
    fields = [f.column for f in spec.of_entity(Entity.USER) if f.name not in DERIVED_USER_FIELDS and f.column != user]
    exps, present = _exists(t, df, [user, *fields])
    if user in present:
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, user, f"{user} must not be null", column=user))
        exps.append(_expect("ExpectColumnValuesToBeUnique", t, user, f"{user} must be unique", column=user))
    return exps


def _vector_lengths(column: pd.Series) -> pd.Series:
    """Length of each vector (GX measures string lengths only); null stays null, a non-vector scalar is -1."""

    def length(v: Any) -> Any:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return pd.NA
        if isinstance(v, str | bytes):
            return -1
        try:
            return len(v)
        except TypeError:
            return -1

    return pd.Series([length(v) for v in column], index=column.index, dtype="Int64")


def _items_suite(ds: Dataset) -> tuple[list, dict[str, pd.Series]]:
    spec, df, t = ds.spec, ds.items, "items"
    item = spec.item_key
    fields = [f for f in spec.of_entity(Entity.ITEM) if f.column != item]
    exps, present = _exists(t, df, [item, *[f.column for f in fields]])
    derived: dict[str, pd.Series] = {}
    if item in present:
        exps.append(_expect("ExpectColumnValuesToNotBeNull", t, item, f"{item} must not be null", column=item))
        exps.append(_expect("ExpectColumnValuesToBeUnique", t, item, f"{item} must be unique", column=item))
    for f in fields:
        if f.kind is FieldKind.EMBEDDING and f.column in present:
            name = f"{f.column}_length"
            derived[name] = _vector_lengths(df[f.column])
            exps.append(
                _expect(
                    "ExpectColumnValuesToBeInSet",
                    t,
                    f.column,
                    f"{f.column} must be a vector of length {f.dim} (examples are lengths; -1 = not a vector)",
                    column=name,
                    value_set=[f.dim],
                )
            )
    return exps, derived


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
            "unexpected_count": res.get("unexpected_count"),
            "element_count": res.get("element_count"),
            "examples": _distinct(list(res.get("partial_unexpected_list") or [])),
            "observed": res.get("observed_value"),
            "error": _exception_message(r.exception_info or {}),
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
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Run the interactions, users and items suites with GX; write JSON + data docs to report_dir.

    The input frames are not modified (derived columns live in a separate frame). Raises DataValidationError
    (str() = the readable summary) when a rule is broken and raise_on_failure is true.
    """
    from great_expectations.core.run_identifier import RunIdentifier

    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    lo = _utc(pd.Timestamp(min_timestamp))
    hi = _utc(now if now is not None else pd.Timestamp.now(tz="UTC"))
    run_id = RunIdentifier(run_name=f"{dataset.name}-validation", run_time=pd.Timestamp.now(tz="UTC").to_pydatetime())

    inter_exps, inter_derived = _interactions_suite(dataset, min_rows, max_rows, lo, hi)
    item_exps, item_derived = _items_suite(dataset)
    plan = {
        "interactions": (_with_columns(dataset.interactions, inter_derived), inter_exps),
        "users": (dataset.users, _users_suite(dataset)),
        "items": (_with_columns(dataset.items, item_derived), item_exps),
    }

    ctx = _context(report_dir)
    results, failures, n_exp = {}, [], 0
    for table, (frame, exps) in plan.items():
        log.info("validating %s: %d rows, %d expectations", table, len(frame), len(exps))
        result = _run_table(ctx, table, frame, exps, run_id)
        results[table] = result
        failures.extend(_failures(table, result, list(getattr(dataset, table).columns)))
        n_exp += len(exps)
    ctx.build_data_docs()
    html_path = report_dir / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"

    json_path = report_dir / "validation.json"
    success = not failures
    payload = {
        "dataset": dataset.name,
        "success": success,
        "run_time": run_id.run_time.isoformat(),
        "bounds": {"min_timestamp": lo.isoformat(), "now": hi.isoformat(), "min_rows": min_rows, "max_rows": max_rows},
        "failures": failures,
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
    )
    log.info("validation %s; report in %s", "passed" if success else "FAILED", report_dir)
    if not success and raise_on_failure:
        raise DataValidationError(report)
    return report


def _with_columns(frame: pd.DataFrame, derived: dict[str, pd.Series]) -> pd.DataFrame:
    """A new frame with the derived columns appended, sharing the caller's data (no copy, no mutation)."""
    if not derived:
        return frame
    return pd.concat([frame, pd.DataFrame(derived, index=frame.index)], axis=1, copy=False)


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
