"""Data validation with real Great Expectations: clean data passes, each kind of corruption is named in the message."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------
# Every kind of input that would break a later step (or quietly degrade it), on small hand-made tables whose row
# counts are easy to check by hand: 40 interactions (users 1-4, items 10-13, scenarios a/b alternating, labels
# 0,0,1,1 repeating, one event an hour), 4 users, 4 items. The temporal split puts rows 0-31 in train, 32-35 in
# valid and 36-39 in test, so every split, scenario and scenario-within-split holds both classes.

SMALL_START = pd.Timestamp("2025-01-01", tz="UTC")
SMALL_FIELDS = [
    {"name": "gender", "kind": "categorical", "entity": "user"},
    {"name": "age", "kind": "numeric", "entity": "user", "buckets": 4},
    {"name": "region", "kind": "categorical", "entity": "user"},
    {"name": "user_emb", "kind": "embedding", "entity": "user", "dim": 3},
    {"name": "genre", "kind": "categorical", "entity": "item"},
    {"name": "price", "kind": "numeric", "entity": "item", "buckets": 4},
    {"name": "tags", "kind": "sequence", "entity": "item", "max_len": 3},
    {"name": "text_emb", "kind": "embedding", "entity": "item", "dim": 3},
]


def small_dataset() -> Dataset:
    from ctrflow.data.spec import FeatureSpec, FieldSpec
    from ctrflow.data.tables import standard_fields

    n = 40
    interactions = pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64) % 4 + 1,
            "item_id": 10 + (np.arange(n, dtype=np.int64) // 4) % 4,
            "scenario": ["a", "b"] * (n // 2),
            "label": np.array([0, 0, 1, 1] * (n // 4), dtype=np.int64),
            "event_timestamp": (SMALL_START + pd.to_timedelta(np.arange(n), unit="h")).astype("datetime64[us, UTC]"),
        }
    )
    vec = [np.array([0.1, 0.2, 0.3], dtype=np.float32) + i for i in range(4)]
    users = pd.DataFrame(
        {
            "user_id": np.array([1, 2, 3, 4], dtype=np.int64),
            "gender": ["F", "M", "F", "M"],
            "age": [20.0, 30.0, 40.0, 50.0],
            "region": ["x", "y", "x", "y"],
            "user_emb": list(vec),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.array([10, 11, 12, 13], dtype=np.int64),
            "genre": ["g1", "g2", "g1", "g2"],
            "price": [1.0, 2.0, 3.0, 4.0],
            "tags": [["t1"], ["t1", "t2"], [], ["t3"]],
            "text_emb": list(vec),
        }
    )
    spec = FeatureSpec(fields=[*standard_fields(5), *(FieldSpec(**f) for f in SMALL_FIELDS)], scenarios=["a", "b"])
    return Dataset("small", interactions, users, items, spec)


def _rules(report: ValidationReport, warnings: bool = False) -> list[tuple[str, str, str]]:
    """(table, column, rule) of each failure (or warning), sorted."""
    return sorted((f["table"], f["column"], f["rule"]) for f in (report.warnings if warnings else report.failures))


def _line(report: ValidationReport, start: str, warning: bool = False) -> str:
    """The one summary line that starts with `start` (after the '  - ' or '  warning: ' prefix)."""
    prefix = "  warning: " if warning else "  - "
    lines = [x for x in report.summary().splitlines() if x.startswith(prefix + start)]
    assert len(lines) == 1, f"{start!r}: {len(lines)} lines in\n{report.summary()}"
    return lines[0]


def test_small_clean_dataset_passes_without_warnings(tmp_path):
    report = validate_dataset(small_dataset(), tmp_path, now=NOW)
    assert report.success, report.summary()
    assert report.warnings == [] and "warning" not in report.summary()


def _profile_values_corrupted() -> Dataset:
    """One bad value per rule in users and items; the users frame carries a repeated index (as a Parquet may)."""
    ds = small_dataset()
    users = ds.users.copy()
    users["gender"] = np.array([None] * 4, dtype=object)  # null throughout
    users["age"] = ["20", "30", None, "n/a"]  # a numeric field stored as text: 3 non-null rows
    users["region"] = ["x", None, "", "  "]  # missing (null or blank) in 3 of 4 rows: a warning at 50%
    emb = list(users["user_emb"])
    emb[1] = np.array([0.1, -np.inf, 0.3], dtype=np.float32)  # user 2
    emb[2] = np.array([np.nan, 0.5])  # user 3: wrong length (only the length rule reports it, not the NaN)
    users["user_emb"] = emb
    users.index = [0, 0, 1, 1]
    items = ds.items.copy()
    items["genre"] = ["g1", "g2", 7, "g2"]  # item 12: an int among strings
    items["price"] = [1.0, 2.0, np.inf, np.nan]  # item 12: +inf (item 13's NaN is a missing value: allowed)
    items["tags"] = [["t1"], "t1 t2", [], ["t3", 5]]  # item 11: text, not a list; item 13: an int among strings
    vectors = list(items["text_emb"])
    vectors[0] = np.array([np.nan, 0.2, 0.3], dtype=np.float32)  # item 10
    vectors[1] = [0.1, 0.2, np.inf]  # item 11 (a plain list)
    vectors[3] = None  # item 13: no vector is a missing value: allowed
    items["text_emb"] = vectors
    return _with(ds, users=users, items=items)


PROFILE_RULES = {
    ("users", "gender", "gender must hold a value in at least one row (it is null, NaN or empty in every row)"),
    ("users", "age", "age is a numeric field: it must be stored as numbers (an int or float dtype), not object"),
    ("users", "user_emb", "user_emb must be a vector of length 3 (examples are lengths; -1 = not a vector)"),
    (
        "users",
        "user_emb",
        "every element of user_emb must be a finite number: one NaN or ±inf inside a vector makes training diverge "
        "(a missing vector is allowed)",
    ),
    (
        "items",
        "genre",
        "genre is categorical: its values must be scalars of one type (mostly str here); mixed types collide or "
        "split once written as text",
    ),
    (
        "items",
        "price",
        "price must be finite: ±inf breaks its quantile buckets (NaN is a missing value and is allowed)",
    ),
    ("items", "tags", "tags is a sequence field: each cell must be a list (or missing)"),
    ("items", "tags", "the elements of tags must all be of one type (mostly str here)"),
    (
        "items",
        "text_emb",
        "every element of text_emb must be a finite number: one NaN or ±inf inside a vector makes training diverge "
        "(a missing vector is allowed)",
    ),
}


@pytest.fixture(scope="module")
def profile_report(tmp_path_factory) -> tuple[ValidationReport, Dataset, dict]:
    bad = _profile_values_corrupted()
    before = snapshot(bad)
    report = validate_dataset(
        bad, tmp_path_factory.mktemp("profile"), now=NOW, warn_null_share=0.5, raise_on_failure=False
    )
    return report, bad, before


def test_profile_group_breaks_exactly_the_planted_rules(profile_report):
    report, bad, before = profile_report
    assert set(_rules(report)) == PROFILE_RULES and len(report.failures) == len(PROFILE_RULES)
    assert not any(f["error"] for f in report.failures), "a rule crashed instead of reporting"
    assert_unchanged(bad, before)


@pytest.mark.parametrize(
    "start,expected",
    [
        ("users.gender:", ["4 of 4 rows broke it"]),
        ("users.age:", ["3 of 4 rows broke it", "examples: user_id 1 ('20'), user_id 2 ('30'), user_id 4 ('n/a')"]),
        ("users.user_emb: user_emb must be a vector", ["1 of 4 rows broke it", "examples: 2"]),
        ("users.user_emb: every element", ["1 of 4 rows broke it", "examples: user_id 2 (-inf at [1])"]),
        ("items.genre:", ["1 of 4 rows broke it", "examples: item_id 12 (7 is int)"]),
        ("items.price:", ["1 of 4 rows broke it", "examples: item_id 12 (inf)"]),
        ("items.tags: tags is a sequence", ["1 of 4 rows broke it", "examples: item_id 11 ('t1 t2' is not a list)"]),
        ("items.tags: the elements", ["1 of 4 rows broke it", "examples: item_id 13 (5 at [1] is int)"]),
        (
            "items.text_emb: every element",
            ["2 of 4 rows broke it", "examples: item_id 10 (nan at [0]), item_id 11 (inf at [2])"],
        ),
    ],
    ids=[
        "all_null",
        "numeric_as_text",
        "vector_length",
        "user_vector_inf",
        "mixed_categorical",
        "inf_numeric",
        "sequence_not_list",
        "sequence_mixed_elements",
        "item_vector_nan",
    ],
)
def test_profile_kind_is_named_with_its_row_count(profile_report, start, expected):
    line = _line(profile_report[0], start)
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"


def test_mostly_missing_field_warns_but_passes(profile_report):
    report = profile_report[0]
    assert _rules(report, warnings=True) == [
        (
            "users",
            "region",
            "region should be missing (null, NaN or empty) in at most 50% of rows: this much missing often means a "
            "broken join upstream",
        )
    ]
    assert "3 of 4 rows broke it" in _line(report, "users.region:", warning=True)
    saved = json.loads(report.json_path.read_text())
    assert [w["column"] for w in saved["warnings"]] == ["region"] and len(saved["failures"]) == len(PROFILE_RULES)


def test_structure_repeated_columns_wrong_key_dtype_text_timestamps(tmp_path):
    """Repeated column names, a uint64 key beyond int64, and text timestamps that do not parse."""
    ds = small_dataset()
    users = pd.concat([ds.users, ds.users[["gender"]]], axis=1)  # 'gender' twice
    users["user_id"] = np.array([1, 2, 3, 2**63 + 5], dtype=np.uint64)  # out of int64 range (not referenced)
    inter = ds.interactions.copy()
    inter = inter[inter.user_id != 4].reset_index(drop=True)  # 30 rows
    text = inter["event_timestamp"].map(lambda t: t.isoformat()).astype(object)
    text[0] = "not a date"
    text[1] = "1736000000000"  # epoch milliseconds, as text
    text[2] = "1850-01-01T00:00:00+00:00"  # parses, before min_timestamp
    inter["event_timestamp"] = text
    bad = _with(ds, interactions=inter, users=users)
    before = snapshot(bad)
    report = validate_dataset(bad, tmp_path, now=NOW, raise_on_failure=False)
    assert {(f["table"], f["column"], f["expectation"]) for f in report.failures} == {
        ("users", "gender", "expect_table_columns_to_match_set"),
        ("users", "user_id", "expect_column_type_to_be"),
        ("interactions", "event_timestamp", "expect_column_type_to_be"),
        ("interactions", "event_timestamp", "expect_column_values_to_be_null"),
    }
    assert "column name 'gender' must appear once; it appears 2 times" in _line(report, "users.gender:")
    assert "observed: uint64" in _line(report, "users.user_id:")
    line = _line(report, "interactions.event_timestamp: event_timestamp must be a timestamp")
    assert "text must be an ISO 8601 date-time" in line and "3 of 30 rows broke it" in line
    assert "1 are numbers as text; the likely unit is epoch milliseconds (1 of the 1 rows" in line
    assert "examples: 'not a date', '1736000000000', '1850-01-01T00:00:00+00:00'" in line
    assert not any(f["error"] for f in report.failures)
    assert_unchanged(bad, before)


def test_labels_without_a_click_and_splits_that_come_out_empty(tmp_path):
    """No positive at all, every event at one instant (the temporal split puts all in test), and no items."""
    ds = small_dataset()
    inter = ds.interactions.copy()
    inter["label"] = 0
    inter["event_timestamp"] = pd.Series(SMALL_START, index=inter.index).astype("datetime64[us, UTC]")
    inter["item_id"] = 10 + np.arange(40, dtype=np.int64) // 4  # (user, item, time) stays unique: 10 items
    bad = _with(ds, interactions=inter, items=ds.items.iloc[:0])
    report = validate_dataset(bad, tmp_path, now=NOW, raise_on_failure=False)
    assert {(f["table"], f["column"], f["expectation"]) for f in report.failures} == {
        ("interactions", "label", "expect_column_distinct_values_to_contain_set"),
        ("interactions", "split", "expect_column_distinct_values_to_contain_set"),
        ("interactions", "item_id", "expect_column_values_to_be_null"),
        ("items", "", "expect_table_row_count_to_be_between"),
    }
    label = _line(report, "interactions.label:")
    assert "both classes" in label and "(0: 40 rows, 1: 0 rows)" in label and "missing: 1" in label
    split = _line(report, "interactions.split:")
    assert "data.split=temporal: train 0, valid 0, test 40 rows" in split and "missing: 'train', 'valid'" in split
    assert "40 of 40 rows broke it" in _line(report, "interactions.item_id:")
    assert "observed: 0 rows" in _line(report, "items:")
    assert report.warnings == []  # no class at all is a failure; per-split warnings would only repeat it


def test_random_split_with_an_empty_split_fails(tmp_path):
    """5 events split 8:1:1 at random: round(0.5) = 0 rows for valid."""
    ds = small_dataset()
    inter = ds.interactions.iloc[[0, 2, 3, 4, 6]].reset_index(drop=True)
    report = validate_dataset(
        _with(ds, interactions=inter), tmp_path, now=NOW, split_method="random", seed=0, raise_on_failure=False
    )
    assert [(f["table"], f["column"]) for f in report.failures] == [("interactions", "split")]
    line = _line(report, "interactions.split:")
    assert "data.split=random, data.seed=0: train 4, valid 0, test 1 rows" in line and "missing: 'valid'" in line


def test_one_class_in_a_split_or_a_scenario_warns(tmp_path):
    """Test (rows 36-39) holds no click, scenario b never clicks, scenario a clicks in every valid row, scenario c
    has no rows: warnings, not failures."""
    ds = small_dataset()
    ds = _with(ds, spec=dataclasses.replace(ds.spec, scenarios=["a", "b", "c"]))
    inter = ds.interactions.copy()
    inter.loc[32:, "label"] = 0
    inter.loc[(inter.index < 32) & (inter.scenario == "b"), "label"] = 0
    inter.loc[[32, 34], "label"] = 1  # valid: clicks in scenario a only (rows 32, 34), none in b (33, 35)
    report = validate_dataset(_with(ds, interactions=inter), tmp_path, now=NOW)
    assert report.success and report.failures == []
    assert len(report.warnings) == 3, report.warning_lines()
    split = _line(report, "interactions.label: each split (data.split=temporal) should hold both classes", warning=True)
    assert "AUC is undefined there (test holds 4 rows, all 0); missing: 'test:1'" in split
    scenario = _line(report, "interactions.label: each scenario should hold both classes of label", warning=True)
    assert "(b holds 20 rows, all 0; c holds no rows); missing: 'b:1', 'c:0', 'c:1'" in scenario
    within = _line(report, "interactions.label: each scenario within the valid and test splits should", warning=True)
    assert "(a in valid holds 2 rows, all 1); missing: 'a in valid:0'" in within
    # b within valid/test and a within test hold one class too: said once, by the split and scenario lines
    summary = report.summary()
    assert summary.splitlines()[0].endswith("3 warnings:") and "passed" in summary.splitlines()[0]
    saved = json.loads(report.json_path.read_text())
    assert saved["success"] is True and len(saved["warnings"]) == 3


def test_loaders_keep_a_timestamp_column_they_cannot_convert():
    """parse_timestamps never raises: it converts what converts and leaves the rest for validation to explain."""
    from ctrflow.data.tables import TS_DTYPE, parse_timestamps

    seconds = pd.Series([1_735_689_600, 1_735_693_200], dtype=np.int64)
    assert str(parse_timestamps(seconds).dtype) == TS_DTYPE
    assert parse_timestamps(seconds)[0] == pd.Timestamp("2025-01-01", tz="UTC")
    text = pd.Series(["2025-01-01T00:00:00Z", "2025-01-01 01:00:00+01:00"])
    assert (parse_timestamps(text) == pd.Timestamp("2025-01-01", tz="UTC")).all()
    for raw in (seconds * 1_000, seconds * 1_000_000, pd.Series(["2025-01-01", "yesterday"])):
        kept = parse_timestamps(raw)
        assert kept is raw  # untouched: validation sees the values as they came


@pytest.mark.parametrize(
    "factor,unit",
    [(1, None), (1_000, "milliseconds"), (1_000_000, "microseconds"), (1_000_000_000, "nanoseconds")],
)
def test_epoch_numbers_name_their_likely_unit(factor, unit):
    """Epoch numbers in s/ms/us/ns (as the loader leaves them) break the rule row by row, naming the unit."""
    from ctrflow.data.validation import _unparsed_timestamps

    col = pd.Series([1_735_689_600 * factor, 1_735_693_200 * factor, None, 42], dtype="Int64")
    lo, hi = pd.Timestamp("1990-01-01", tz="UTC"), NOW
    rule, values = _unparsed_timestamps(col, "event_timestamp", lo, hi)
    assert rule.startswith("event_timestamp holds numbers, read as epoch seconds, which must fall between 1990-01-01")
    broken = values.dropna().tolist()
    if unit is None:
        assert broken == [42] and "no epoch unit (seconds, milliseconds, microseconds, nanoseconds)" in rule
    else:
        assert broken == [1_735_689_600 * factor, 1_735_693_200 * factor, 42]  # the null is the not-null rule's
        assert f"the likely unit is epoch {unit} (2 of the 3 rows outside fall in range read as {unit})" in rule


def _write_user_data(ds: Dataset, data) -> None:
    """The dataset as the user's Parquet files + schema.yaml (README, 'Your own data')."""
    import yaml

    data.mkdir()
    ds.interactions.to_parquet(data / "interactions.parquet", index=False)
    ds.users.to_parquet(data / "users.parquet", index=False)
    ds.items.to_parquet(data / "items.parquet", index=False)
    schema = {"name": "small", "scenarios": ds.spec.scenarios, "behaviour_max_len": 5, "fields": SMALL_FIELDS}
    (data / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))


def test_validate_step_passes_the_split_settings_and_returns_warnings(tmp_path):
    """validate_step reads data.split/data.seed (the features step's split) and validation.warn_null_share; a warning
    does not stop it: the dataset is written and the warning lines are returned."""
    from ctrflow.config import load_params
    from ctrflow.steps import validate_step

    ds = small_dataset()
    inter = ds.interactions.copy()
    inter.loc[inter.scenario == "b", "label"] = 0  # scenario b never clicks
    _write_user_data(_with(ds, interactions=inter), tmp_path / "data")
    overrides = {"data.source": "parquet", "data.path": str(tmp_path / "data"), "data.split": "random"}
    params = load_params(None, {**overrides, "data.seed": 3, "validation.min_rows": 10})
    result = validate_step(params, tmp_path / "ds", tmp_path / "rep")
    assert (tmp_path / "ds" / "interactions.parquet").exists()
    assert any(w.startswith("interactions.label: each scenario should hold both") for w in result["warnings"])
    assert any("(b holds 20 rows, all 0)" in w for w in result["warnings"])
    saved = json.loads(Path(result["report_json"]).read_text())
    assert saved["split"] == {"method": "random", "seed": 3} and saved["success"] is True


def test_cli_epoch_milliseconds_exit_2_with_the_report_written(tmp_path, monkeypatch, capsys):
    """The whole way a user meets it: Parquet with epoch-ms timestamps -> `ctrflow validate` -> exit 2, one line per
    rule naming interactions.event_timestamp, the unit and the rows; the report written; no dataset written."""
    from ctrflow import cli

    ds = small_dataset()
    data = tmp_path / "data"
    inter = ds.interactions.copy()
    inter["event_timestamp"] = inter["event_timestamp"].astype("int64") // 1_000  # us -> ms
    _write_user_data(_with(ds, interactions=inter), data)
    out, rep = tmp_path / "ds", tmp_path / "rep"
    argv = ["ctrflow", "--set", "data.source=parquet", "--set", f"data.path={data}", "--set", "validation.min_rows=10"]
    monkeypatch.setattr("sys.argv", [*argv, "validate", "--out", str(out), "--report", str(rep)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Out of bounds" not in err
    lines = [x for x in err.splitlines() if x.startswith("  - interactions.event_timestamp: ")]
    assert len(lines) == 2, err
    unit = [x for x in lines if "holds numbers" in x]
    assert unit and "the likely unit is epoch milliseconds" in unit[0] and "40 of 40 rows broke it" in unit[0]
    assert "examples: 1735689600000, 1735693200000" in unit[0]
    assert not out.exists()  # nothing written downstream
    saved = json.loads((rep / "validation.json").read_text())
    assert saved["success"] is False and len(saved["failures"]) == 2
    assert (rep / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").exists()


def test_great_expectations_info_lines_stay_out_of_the_cli_output(tmp_path):
    """The CLI logs at INFO: GX's import-time lines ("Skipping registering function ...", a dozen per run) and its
    config dumps must not reach a user's terminal; ctrflow's own INFO lines do."""
    import subprocess
    import sys

    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from ctrflow.data import validation as v; "
        "v._expect('ExpectColumnToExist', 't', 'c', 'r', column='c'); v._context(sys.argv[1]); "
        "v.log.info('ours')"
    )
    import os

    from ctrflow.config import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's ctrflow, not an installed one
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "ctrflow.data.validation INFO ours" in out.stderr or "INFO:ctrflow.data.validation:ours" in out.stderr
    assert "great_expectations" not in out.stderr, out.stderr[:2000]


def test_context_fields_in_interactions_get_the_field_rules(tmp_path):
    """A declared context field (entity: context) lives in the interactions table: a missing column, ±inf in a
    numeric one, a NaN inside a vector and a field null throughout are named like user and item fields (they
    passed unchecked before, and the NaN made training diverge)."""
    from ctrflow.data.spec import FieldSpec

    ds = small_dataset()
    extra = [
        FieldSpec("dwell", "numeric", "context", buckets=4),
        FieldSpec("ctx_emb", "embedding", "context", dim=2),
        FieldSpec("device", "categorical", "context"),
        FieldSpec("page", "categorical", "context"),
    ]
    spec = dataclasses.replace(ds.spec, fields=[*ds.spec.fields, *extra])
    inter = ds.interactions.copy()
    dwell = np.arange(40, dtype=np.float64)
    dwell[[4, 9]] = [np.inf, np.nan]  # row 4: +inf; row 9: NaN is a missing value (allowed)
    inter["dwell"] = dwell
    vectors = [np.array([0.5, 1.5]) for _ in range(40)]
    vectors[7] = np.array([np.nan, 1.0])
    inter["ctx_emb"] = vectors
    inter["page"] = None  # declared, null in every row
    bad = _with(ds, interactions=inter, spec=spec)
    before = snapshot(bad)
    report = validate_dataset(bad, tmp_path, now=NOW, raise_on_failure=False)
    assert {(f["table"], f["column"], f["expectation"]) for f in report.failures} == {
        ("interactions", "device", "expect_column_to_exist"),
        ("interactions", "dwell", "expect_column_values_to_be_null"),
        ("interactions", "ctx_emb", "expect_column_values_to_be_null"),
        ("interactions", "page", "expect_column_values_to_not_be_null"),
    }
    assert "1 of 40 rows broke it; examples: row 4 (inf)" in _line(report, "interactions.dwell: dwell must be finite")
    assert "1 of 40 rows broke it; examples: row 7 (nan at [0])" in _line(report, "interactions.ctx_emb: every element")
    assert "40 of 40 rows broke it" in _line(report, "interactions.page: page must hold a value in at least one row")
    assert not any(f["error"] for f in report.failures)
    assert_unchanged(bad, before)


def test_undeclared_interaction_column_named_like_a_field_is_refused_others_carried(tmp_path):
    """A denormalised export: interactions carry the user's 'gender' and a 'split' of their own, undeclared. They
    passed validation and stopped the features step ("entity_df: columns ['gender'] are features of service ...");
    now each is a rule naming table, column and rows. An undeclared column of another name ('session') is fine."""
    ds = small_dataset()
    inter = ds.interactions.copy()
    n = len(inter)
    inter["gender"] = ["F"] * (n - 1) + [None]  # a null row holds the column too
    inter["split"] = "train"
    inter["session"] = 7
    report = validate_dataset(_with(ds, interactions=inter), tmp_path, now=NOW, raise_on_failure=False)
    assert _rules(report) == [
        ("interactions", "gender", "column 'gender' is not a context field of schema.yaml but is named like the user "
         "field 'gender': the training frame would hold it twice; drop or rename it (or declare a context field of another name)"),
        ("interactions", "split", "column 'split' is not a context field of schema.yaml but is named like a column the "
         "features step makes: the training frame would hold it twice; drop or rename it (or declare a context field of another name)"),
    ]  # fmt: skip
    assert f"{n} of {n} rows broke it; examples: 'F'" in _line(report, "interactions.gender:")
    assert f"{n} of {n} rows broke it; examples: 'train'" in _line(report, "interactions.split:")
    assert validate_dataset(_with(ds, interactions=inter.drop(columns=["gender", "split"])), tmp_path / "ok", now=NOW).success
