"""Data validation with real Great Expectations: clean data passes, each kind of corruption is named in the message."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pandas as pd
import pytest

from ctrflow.data.tables import Dataset
from ctrflow.data.validation import DataValidationError, ValidationReport, validate_dataset, validation_summary_lines


def snapshot(ds: Dataset) -> dict[str, pd.DataFrame]:
    """A truly deep copy (pickle copies the vectors inside object columns too)."""
    return {t: pickle.loads(pickle.dumps(getattr(ds, t))) for t in ("interactions", "users", "items")}


def assert_unchanged(ds: Dataset, before: dict[str, pd.DataFrame]) -> None:
    for table, frame in before.items():
        pd.testing.assert_frame_equal(getattr(ds, table), frame, check_exact=True)


def test_tiny_dataset_passes(tiny_dataset, tmp_path):
    before = snapshot(tiny_dataset)
    report = validate_dataset(tiny_dataset, tmp_path / "report", min_rows=1_000, max_rows=100_000_000)
    assert isinstance(report, ValidationReport)
    assert report.success and report.failures == []
    assert report.json_path.exists() and report.html_path.exists()
    assert json.loads(report.json_path.read_text())["success"] is True
    assert "passed" in report.summary() and str(report.json_path) in report.summary()
    assert report.n_expectations > 20
    assert_unchanged(tiny_dataset, before)


def test_movielens_passes(tmp_path):
    from ctrflow.data.movielens import DatasetNotInstalled, load_movielens

    try:
        ds = load_movielens()
    except DatasetNotInstalled as exc:
        pytest.skip(str(exc))
    report = validate_dataset(ds, tmp_path, min_rows=1_000)
    assert report.success, report.summary()
    assert report.row_counts == {"interactions": 100_000, "users": 943, "items": 1_682}


def _with(ds: Dataset, **tables: pd.DataFrame) -> Dataset:
    return dataclasses.replace(ds, **tables)


NOW = pd.Timestamp("2026-06-01", tz="UTC")  # after every synthetic event (they span 2026-01-01 + 60 days)

# GX costs 1-3 s a run on this machine, so corruptions are planted in two datasets, each validated once; every
# corruption touches a different rule, and each group asserts the exact set of broken rules (nothing masks or
# bleeds into another). The parametrised test below then checks each kind's own message line.


def _values_corrupted(ds: Dataset) -> Dataset:
    """Bad values in interactions, with the schema intact."""
    df = ds.interactions.copy()
    df.loc[3, "label"] = 2
    df.loc[4, "scenario"] = "moon"
    df.loc[5, "event_timestamp"] = NOW + pd.Timedelta(days=30)
    df.loc[6, "event_timestamp"] = pd.Timestamp("1985-05-05", tz="UTC")
    df.loc[8, "user_id"] = 987_654
    df.loc[9, "item_id"] = 123_456
    df = pd.concat([df, df.iloc[[7]]], ignore_index=True)  # a duplicate (user, item, timestamp)
    return _with(ds, interactions=df)


def _schema_corrupted(ds: Dataset) -> Dataset:
    """Missing columns, wrong dtypes and broken keys across the three tables."""
    df = ds.interactions.drop(columns=["scenario"])
    df["user_id"] = df["user_id"].where(df.index != 3)  # a null key (the column becomes float)
    df["label"] = df["label"].astype(str)
    df["event_timestamp"] = df["event_timestamp"].dt.tz_localize(None)
    users = pd.concat([ds.users, ds.users.iloc[[0]]], ignore_index=True).drop(columns=["gender"])
    items = ds.items.copy()
    items["text_emb"] = [v[:31] if i == 5 else v for i, v in enumerate(items["text_emb"])]
    return _with(ds, interactions=df, users=users, items=items)


GROUPS = {
    "values": (
        _values_corrupted,
        {"min_rows": 10_000},
        {
            ("interactions", "", "expect_table_row_count_to_be_between"),
            ("interactions", "label", "expect_column_values_to_be_in_set"),
            ("interactions", "scenario", "expect_column_values_to_be_in_set"),
            ("interactions", "event_timestamp", "expect_column_values_to_be_between"),
            ("interactions", "(user_id, item_id, event_timestamp)", "expect_compound_columns_to_be_unique"),
            ("interactions", "user_id", "expect_column_values_to_be_null"),
            ("interactions", "item_id", "expect_column_values_to_be_null"),
        },
    ),
    "schema": (
        _schema_corrupted,
        {},
        {
            ("interactions", "scenario", "expect_column_to_exist"),
            ("interactions", "user_id", "expect_column_values_to_not_be_null"),
            ("interactions", "user_id", "expect_column_type_to_be"),
            ("interactions", "label", "expect_column_type_to_be"),
            ("interactions", "label", "expect_column_values_to_be_in_set"),
            ("interactions", "event_timestamp", "expect_column_type_to_be"),
            ("users", "user_id", "expect_column_values_to_be_unique"),
            ("users", "gender", "expect_column_to_exist"),
            ("items", "text_emb", "expect_column_values_to_be_in_set"),
        },
    ),
}

# (kind, group, substrings that must all appear on one line of the message: the column and the rule, the count)
KINDS = [
    ("label_2", "values", ["interactions.label: label must be in {0, 1}", "1 of 6,001 rows", "examples: 2"]),
    (
        "unknown_scenario",
        "values",
        ["interactions.scenario: scenario must be one of the spec's scenarios {home, search, cart, live}", "'moon'"],
    ),
    ("future_timestamp", "values", ["interactions.event_timestamp:", "no events from the future", "2026-07-01"]),
    (
        "timestamp_before_min",
        "values",
        ["interactions.event_timestamp: event_timestamp must be between 1990-01-01", "1985-05-05"],
    ),
    (
        "duplicate_key",
        "values",
        [
            "interactions.(user_id, item_id, event_timestamp): this key must be unique",
            "2 of 6,001 rows",
        ],
    ),
    (
        "unknown_user",
        "values",
        ["interactions.user_id: user_id must exist in users.user_id", "1 of 6,001", "examples: 987654"],
    ),
    (
        "unknown_item",
        "values",
        ["interactions.item_id: item_id must exist in items.item_id", "1 of 6,001", "examples: 123456"],
    ),
    ("too_few_rows", "values", ["interactions: row count must be at least 10,000", "observed: 6,001 rows"]),
    ("missing_column", "schema", ["interactions.scenario: required column 'scenario' is missing", "columns present"]),
    ("null_user_id", "schema", ["interactions.user_id: user_id must not be null", "1 of 6,000 rows"]),
    ("float_user_id", "schema", ["interactions.user_id: user_id must have dtype int64", "observed: float64"]),
    ("string_label", "schema", ["interactions.label: label must have dtype int64", "observed: object"]),
    (
        "naive_timestamp",
        "schema",
        [
            "interactions.event_timestamp: event_timestamp must have dtype datetime64[us, UTC]",
            "observed: datetime64[us]",
        ],
    ),
    ("duplicate_user_in_users", "schema", ["users.user_id: user_id must be unique", "2 of 201 rows", "examples: 1"]),
    ("missing_user_field", "schema", ["users.gender: required column 'gender' is missing"]),
    (
        "wrong_embedding_dim",
        "schema",
        ["items.text_emb: text_emb must be a vector of length 32", "1 of 150 rows", "examples: 31"],
    ),
]


@pytest.fixture(scope="module")
def group_errors(tiny_dataset, tmp_path_factory) -> dict[str, tuple[DataValidationError, Dataset, dict]]:
    """Validate each corrupted dataset once; keep the error, the input and a snapshot taken before validation."""
    out = {}
    for name, (corrupt, kwargs, _) in GROUPS.items():
        bad = corrupt(tiny_dataset)
        before = snapshot(bad)
        with pytest.raises(DataValidationError) as info:
            validate_dataset(bad, tmp_path_factory.mktemp(name), now=NOW, **kwargs)
        out[name] = (info.value, bad, before)
    return out


@pytest.mark.parametrize("group", list(GROUPS))
def test_group_breaks_exactly_the_planted_rules(group_errors, group):
    error, bad, before = group_errors[group]
    report = error.report
    broken = {(f["table"], f["column"], f["expectation"]) for f in report.failures}
    assert broken == GROUPS[group][2]
    message = str(error)
    assert message.startswith("Data validation FAILED") and "Traceback" not in message
    assert len(message.splitlines()) == len(report.failures) + 2  # verdict, one line per rule, where the report is
    assert report.json_path.exists() and report.html_path.exists()
    assert str(report.json_path) in message and str(report.html_path) in message
    assert not any(f["error"] for f in report.failures), "a rule crashed instead of reporting"
    assert_unchanged(bad, before)


@pytest.mark.parametrize("group,expected", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_corruption_is_named_in_the_message(group_errors, group, expected):
    message = str(group_errors[group][0])
    lines = [line for line in message.splitlines() if expected[0] in line]
    assert lines, f"{expected[0]!r} not in:\n{message}"
    for text in expected[1:]:
        assert any(text in line for line in lines), f"{text!r} not on the line {lines}"


def test_failure_report_without_raising(tiny_dataset, tmp_path):
    """raise_on_failure=False returns the report; failures carry table/column/count/examples; files are written."""
    interactions = tiny_dataset.interactions.copy()
    interactions.loc[0, "label"] = 5
    bad = _with(tiny_dataset, interactions=interactions, users=tiny_dataset.users.drop(columns=["region"]))
    report = validate_dataset(bad, tmp_path, max_rows=100, now=NOW, raise_on_failure=False)
    assert not report.success
    by_column = {(f["table"], f["column"]): f for f in report.failures}
    label = by_column[("interactions", "label")]
    assert label["expectation"] == "expect_column_values_to_be_in_set"
    assert label["unexpected_count"] == 1 and label["examples"] == [5]
    assert by_column[("users", "region")]["expectation"] == "expect_column_to_exist"
    rows = by_column[("interactions", "")]
    assert rows["rule"] == "row count must be between 1 and 100" and rows["observed"] == "6,000 rows"
    assert len(report.failures) == 3
    lines = validation_summary_lines(report)
    assert len(lines) == 5 and lines[-1].startswith("Report:")

    saved = json.loads(report.json_path.read_text())
    assert saved["success"] is False and len(saved["failures"]) == 3
    assert set(saved["results"]) == {"interactions", "users", "items"}
    assert saved["results"]["interactions"]["success"] is False
    assert "<html" in report.html_path.read_text().lower()
    pages = list(report.html_path.parent.glob("validations/**/*.html"))
    assert len(pages) == 3  # one GX data-docs page per table
