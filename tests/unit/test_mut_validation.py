"""Validation gating: the row-count bar, drift, the key checks done in polars and what a report says.

Written to kill mutmut's survivors in `features/validation.py` (issue #17). Most tests here
call the pure checks directly (no great-expectations context), so they are fast.
"""

import logging
import math
import re
from datetime import date

import polars as pl
import pytest

from features.contracts import LABELS, USER_CATEGORY_AFFINITY, USER_FEATURES, Column, TableContract
from features.validation import (
    ValidationFailed,
    ValidationReport,
    _check_as_of,
    _check_finite,
    _check_types,
    _check_unique,
    _exception_message,
    _json_safe,
    build_expectation_suite,
    build_reference_profile,
    check_row_count,
    detect_drift,
    is_sorted_by,
    profile_table,
)

AS_OF = date(2024, 3, 4)


def reference(rows: float, snapshots: int = 3) -> dict:
    return {"row_count": rows, "snapshots": snapshots, "columns": {}}


# --- the row-count bar -----------------------------------------------------------------------


def test_the_row_count_bar_is_the_ratio_of_the_median_rounded_up():
    # 0.5 x 9 = 4.5 -> at least 5 rows.
    assert check_row_count(USER_FEATURES, 5, reference(9), 0.5) == (None, None)
    failure, warning = check_row_count(USER_FEATURES, 4, reference(9), 0.5)
    assert warning is None
    assert failure == {
        "expectation": "expect_table_row_count_to_be_between",
        "columns": [],
        "expected": {"min_value": 5},
        "observed": 4,
        "unexpected_count": None,
        "examples": [],
        "hint": "0.5 x the median 9 rows of the last 3 passed snapshot(s); if the drop is real, set "
        "RECSYS_MIN_ROWS_RATIO lower (now 0.5) to accept it",
    }


def test_the_row_count_bar_is_at_least_one_row():
    assert check_row_count(USER_FEATURES, 1, reference(1), 0.1) == (None, None)


def test_an_empty_table_is_left_to_the_suites_own_row_count_check():
    assert check_row_count(USER_FEATURES, 0, reference(100), 0.5) == (None, None)


def test_a_reference_without_a_snapshot_count_speaks_of_one_snapshot():
    failure, _ = check_row_count(USER_FEATURES, 1, {"row_count": 10}, 0.5)
    assert "of the last 1 passed snapshot(s)" in failure["hint"]


def test_labels_below_the_bar_warn_and_name_the_numbers():
    failure, warning = check_row_count(LABELS, 3, reference(10, snapshots=4), 0.5)
    assert failure is None
    assert warning == (
        "labels row count 3 is below 5 (0.5 x the median 10 rows of the last 4 passed snapshot(s)): "
        "not blocking, not served"
    )


def test_the_reference_is_the_median_of_each_statistic_ignoring_missing_ones():
    profiles = [
        {"row_count": 10, "columns": {"a": {"mean": 1.0, "p90": 4.0}}},
        {"row_count": 30, "columns": {"a": {"mean": 3.0}, "b": {"max": 7.0}}},
        {"row_count": 20},
    ]
    assert build_reference_profile(profiles) == {
        "row_count": 20,
        "snapshots": 3,
        "columns": {
            "a": {"mean": 2.0, "p50": None, "p90": 4.0, "min": None, "max": None},
            "b": {"mean": None, "p50": None, "p90": None, "min": None, "max": 7.0},
        },
    }


# --- drift -----------------------------------------------------------------------------------


def profile(column: str, **stats: float | None) -> dict:
    return {"row_count": 10, "columns": {column: stats}}


def test_drift_exactly_at_the_threshold_is_not_reported():
    before, after = profile("events_4w", mean=10.0), profile("events_4w", mean=12.5)
    assert detect_drift(USER_FEATURES, after, before, threshold=0.25) == []
    assert len(detect_drift(USER_FEATURES, after, before, threshold=0.2499)) == 1


def test_drift_down_is_reported_with_its_sign_and_the_reference():
    before = {**profile("days_since_last_event", p90=20.0), "snapshots": 4}
    after = profile("days_since_last_event", p90=10.0)
    assert detect_drift(USER_FEATURES, after, before, threshold=0.25) == [
        "user_features.days_since_last_event p90 moved 20 -> 10 (-50%) against the median of the last 4 "
        "passed snapshot(s), beyond the drift threshold 25%"
    ]


def test_drift_is_relative_to_the_size_of_a_negative_reference():
    before, after = profile("events_4w", p50=-10.0), profile("events_4w", p50=-5.0)
    (message,) = detect_drift(USER_FEATURES, after, before, threshold=0.25)
    assert "(+50%)" in message and "of the last 1 passed" in message


def test_drift_from_zero_down_is_minus_infinity():
    (message,) = detect_drift(USER_FEATURES, profile("events_4w", mean=-1.0), profile("events_4w", mean=0.0), 0.25)
    assert "(-inf%)" in message


def test_drift_looks_only_at_drift_columns_and_at_mean_p50_p90():
    before = {"row_count": 10, "columns": {"events_4w": {"min": 1.0, "max": 1.0}, "events_1w": {"mean": 1.0}}}
    after = {"row_count": 10, "columns": {"events_4w": {"min": 9.0, "max": 9.0}, "events_1w": {"mean": 9.0}}}
    assert detect_drift(USER_FEATURES, after, before, threshold=0.25) == []


def test_drift_skips_statistics_missing_on_either_side():
    before = {"row_count": 10, "columns": {"events_4w": {"mean": None, "p50": 1.0}}}
    after = {"row_count": 10, "columns": {"events_4w": {"mean": 5.0}}}
    assert detect_drift(USER_FEATURES, after, before, threshold=0.25) == []
    assert detect_drift(USER_FEATURES, {"row_count": 1, "columns": {}}, {"row_count": 1}, 0.25) == []


# --- profile ---------------------------------------------------------------------------------


def test_a_profile_keeps_only_finite_statistics():
    frame = pl.DataFrame(
        {"as_of": [AS_OF] * 3, "user_id": [1, 2, 3], "category": ["a", "b", "c"], "events_12w": [1, 2, 3],
         "share_12w": [0.5, math.inf, 1.0]},
        schema=USER_CATEGORY_AFFINITY.schema,
    )  # fmt: skip
    stats = profile_table(USER_CATEGORY_AFFINITY, frame)["columns"]["share_12w"]
    assert stats == {"mean": None, "p50": 1.0, "p90": None, "min": 0.5, "max": None}


def test_a_profile_skips_numeric_contract_columns_the_frame_has_as_text():
    frame = pl.DataFrame({"as_of": [AS_OF], "user_id": [1], "category": ["a"], "events_12w": ["1"]})
    assert profile_table(USER_CATEGORY_AFFINITY, frame) == {"row_count": 1, "columns": {}}


# --- checks done in polars -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "strict", "expected"),
    [
        ([(1, "a"), (1, "b"), (2, "a")], True, True),
        ([(1, "a"), (1, "a"), (2, "a")], True, False),
        ([(1, "a"), (1, "a"), (2, "a")], False, True),
        ([(1, "b"), (1, "a")], False, False),
        ([(2, "a"), (1, "b")], False, False),
        ([(1, "a"), (2, "a"), (2, "b"), (3, "a")], True, True),
        ([(1, None), (1, "b")], False, False),
        ([(1, "a")], True, True),
        ([], True, True),
    ],
)
def test_sorted_by_compares_rows_lexicographically(rows, strict, expected):
    frame = pl.DataFrame(rows, schema={"k": pl.Int64, "s": pl.String}, orient="row")
    assert is_sorted_by(frame, ["k", "s"], strict=strict) is expected


def uniqueness(columns: list[str]):
    contract = TableContract(name="t", key=tuple(columns), columns=tuple(Column(c, pl.Int64()) for c in ("a", "b")))
    (expectation,) = [e for e in build_expectation_suite(contract).expectations if "unique" in e.expectation_type]
    return expectation


def test_repeated_keys_are_counted_with_examples_even_out_of_order():
    frame = pl.DataFrame({"a": [3, 1, 3, 1, 2, 3], "b": [0, 0, 0, 0, 0, 0]})
    failure = _check_unique(uniqueness(["a", "b"]), frame)
    assert failure["expectation"] == "expect_compound_columns_to_be_unique"
    assert (failure["columns"], failure["unexpected_count"]) == (["a", "b"], 5)
    assert failure["examples"] == [(3, 0), (1, 0)]
    single = _check_unique(uniqueness(["a"]), frame)
    assert (single["expectation"], single["columns"], single["unexpected_count"]) == (
        "expect_column_values_to_be_unique", ["a"], 5
    )  # fmt: skip


def test_unique_keys_pass_sorted_or_not_and_a_missing_key_column_is_left_to_the_column_check():
    assert _check_unique(uniqueness(["a", "b"]), pl.DataFrame({"a": [2, 1, 2], "b": [1, 1, 2]})) is None
    assert _check_unique(uniqueness(["a", "b"]), pl.DataFrame({"a": [1, 1, 2], "b": [1, 2, 1]})) is None
    assert _check_unique(uniqueness(["a", "b"]), pl.DataFrame({"a": [1, 1]})) is None


def test_many_repeated_keys_give_five_examples():
    frame = pl.DataFrame({"a": [k for k in range(8) for _ in range(2)], "b": [0] * 16})
    failure = _check_unique(uniqueness(["a"]), frame)
    assert failure["unexpected_count"] == 16 and failure["examples"] == [(k,) for k in range(5)]


def test_wrong_types_name_the_column_the_contract_type_and_the_frames():
    frame = pl.DataFrame({"user_id": [1.0], "category": ["a"]})
    assert _check_types(USER_CATEGORY_AFFINITY, frame) == [
        {"expectation": "expect_column_values_to_be_of_type", "columns": ["user_id"],
         "expected": {"type_": "Int64"}, "observed": "Float64", "unexpected_count": None, "examples": []}
    ]  # fmt: skip


def test_non_finite_floats_are_counted_with_examples_and_nulls_pass():
    frame = pl.DataFrame({"share_12w": [math.nan, None, -math.inf, 0.5, math.inf, math.nan, math.inf, math.nan]})
    (failure,) = _check_finite(USER_CATEGORY_AFFINITY, frame)
    assert (failure["expectation"], failure["columns"]) == ("expect_column_values_to_be_finite", ["share_12w"])
    assert failure["unexpected_count"] == 6 and len(failure["examples"]) == 5
    assert _check_finite(USER_CATEGORY_AFFINITY, pl.DataFrame({"share_12w": [None, 0.5]})) == []


def test_rows_of_other_weeks_are_counted_with_sorted_distinct_examples():
    weeks = [date(2024, 2, 26), AS_OF, date(2024, 2, 19), date(2024, 2, 26)]
    (failure,) = _check_as_of(pl.DataFrame({"as_of": weeks}), AS_OF)
    assert failure["expected"] == {"value": AS_OF} and failure["columns"] == ["as_of"]
    assert failure["unexpected_count"] == 3 and failure["examples"] == [date(2024, 2, 19), date(2024, 2, 26)]
    assert _check_as_of(pl.DataFrame({"as_of": [AS_OF]}), AS_OF) == []
    assert _check_as_of(pl.DataFrame({"x": [1]}), AS_OF) == []


# --- what a report says ----------------------------------------------------------------------


def failed_report() -> ValidationReport:
    return ValidationReport(
        table="user_features",
        as_of=AS_OF,
        success=False,
        row_count=4,
        failures=[
            {"expectation": "expect_table_row_count_to_be_between", "columns": [], "expected": {"min_value": 5},
             "observed": 4, "unexpected_count": None, "examples": [], "hint": "set RECSYS_MIN_ROWS_RATIO lower"},
            {"expectation": "expect_column_values_to_be_finite", "columns": ["a", "b"], "expected": {},
             "observed": None, "unexpected_count": 2, "examples": [math.nan, math.inf]},
        ],
        warnings=["drift of x"],
        row_count_warning="few labels",
    )  # fmt: skip


def test_a_failed_report_describes_each_failure_in_one_line():
    assert failed_report().describe_failures() == (
        "user_features as_of=2024-03-04: expect_table_row_count_to_be_between() expected min_value=5, observed 4 "
        "(set RECSYS_MIN_ROWS_RATIO lower); expect_column_values_to_be_finite(a, b) expected -, "
        "observed 2 unexpected, e.g. ['nan', 'inf']"
    )
    assert (
        str(ValidationFailed([failed_report()])) == "feature validation failed: " + failed_report().describe_failures()
    )


def test_a_failed_report_in_markdown_has_a_table_hints_and_warnings():
    assert failed_report().to_markdown().splitlines() == [
        "### ❌ user_features as_of=2024-03-04: FAILED 2 expectation(s), 4 rows, 2 warning(s)",
        "",
        "| expectation | columns | expected | observed |",
        "|---|---|---|---|",
        "| expect_table_row_count_to_be_between |  | min_value=5 | 4 |",
        "| expect_column_values_to_be_finite | a, b | - | 2 unexpected, e.g. ['nan', 'inf'] |",
        "",
        "- set RECSYS_MIN_ROWS_RATIO lower",
        "",
        "- ⚠️ drift of x",
        "- ⚠️ few labels",
    ]


def test_a_passed_report_is_one_line():
    report = ValidationReport(table="labels", as_of=AS_OF, success=True, row_count=7)
    assert report.to_markdown() == "### ✅ labels as_of=2024-03-04: passed, 7 rows, 0 warning(s)"
    assert report.all_warnings == []


def test_a_failure_without_observed_value_or_count_shows_a_dash():
    report = ValidationReport(
        table="t", as_of=AS_OF, success=False, row_count=0,
        failures=[{"expectation": "e", "columns": [], "expected": {}, "observed": None, "unexpected_count": None,
                   "examples": []}],
    )  # fmt: skip
    assert report.describe_failures() == "t as_of=2024-03-04: e() expected -, observed -"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({1: date(2024, 3, 4), "x": (1.5, math.nan)}, {"1": "2024-03-04", "x": [1.5, "nan"]}),
        ({"a"}, ["a"]),
        (-math.inf, "-inf"),
        (7, 7),
        ("s", "s"),
        (pl.Series([3]).to_numpy()[0], 3),
        (complex(1, 2), "(1+2j)"),
        ([True, None, "a"], [True, None, "a"]),
    ],
)
def test_report_values_become_plain_json(value, expected):
    assert _json_safe(value) == expected


def test_a_numpy_float_keeps_its_value_and_type():
    import numpy as np

    assert _json_safe(np.float64(0.25)) == 0.25 and type(_json_safe(np.float64(0.25))) is float
    assert _json_safe(np.float64("nan")) == "nan"


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (None, None),
        ({}, None),
        ({"raised_exception": False, "exception_message": "x"}, None),
        ({"raised_exception": True, "exception_message": "first line\nsecond"}, "first line"),
        ({"raised_exception": True, "exception_message": None}, "unknown error"),
        ({"m1": {"raised_exception": False}, "m2": {"raised_exception": True, "exception_message": "boom"}}, "boom"),
        ({"m1": "not a dict"}, None),
    ],
)
def test_the_first_raised_exception_of_a_gx_result_is_named(info, message):
    assert _exception_message(info) == message


def test_a_failure_found_by_great_expectations_counts_the_bad_rows_with_examples(caplog):
    from features.validation import validate_table

    frame = pl.DataFrame(
        {"as_of": [AS_OF] * 3, "user_id": [1, 2, 3], "category": ["a", "b", "c"], "events_12w": [1, -4, -5],
         "share_12w": [0.5, 0.5, 0.5]},
        schema=USER_CATEGORY_AFFINITY.schema,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="features.validation"):
        report = validate_table(
            USER_CATEGORY_AFFINITY, frame, as_of=AS_OF, previous=None, min_rows_ratio=0.5, drift_threshold=0.25,
            drift_blocks=False,
        )  # fmt: skip
    # One log line for the step: its summary and duration.
    messages = [record.getMessage() for record in caplog.records if record.name == "features.validation"]
    assert re.fullmatch(rf"validated {re.escape(report.summary_line())} in \d+\.\d\ds", messages[-1])
    (failure,) = report.failures
    assert (failure["expectation"], failure["columns"]) == ("expect_column_values_to_be_between", ["events_12w"])
    assert failure["expected"] == {"min_value": 0}
    assert failure["unexpected_count"] == 2 and sorted(failure["examples"]) == [-5, -4]


def test_validating_several_tables_gives_each_its_own_week_history_and_the_drift_rule():
    from features.validation import validate_tables
    from tests.unit.test_validation import build_good_frame

    users = build_good_frame(USER_FEATURES, rows=4)
    labels = build_good_frame(LABELS, rows=4).with_columns(as_of=pl.lit(date(2024, 2, 26)))
    drifted_from = profile_table(USER_FEATURES, users.with_columns(pl.col("events_4w") * 10))
    options = dict(
        as_ofs={"user_features": AS_OF, "labels": date(2024, 2, 26)}, previous={"user_features": [drifted_from]},
        min_rows_ratio=0.5, drift_threshold=0.25,
    )  # fmt: skip

    blocked = validate_tables({"user_features": users, "labels": labels}, drift_blocks=True, **options)
    warned = validate_tables({"user_features": users, "labels": labels}, drift_blocks=False, **options)

    assert {name: (r.table, r.as_of, r.success) for name, r in blocked.items()} == {
        "user_features": ("user_features", AS_OF, False), "labels": ("labels", date(2024, 2, 26), True)
    }  # fmt: skip
    drift = blocked["user_features"].failures
    assert drift and all((f["expectation"], f["expected"]) == ("expect_no_drift", {"threshold": 0.25}) for f in drift)
    assert warned["user_features"].success and any("events_4w" in w for w in warned["user_features"].warnings)
    assert warned["labels"].warnings == []


def test_a_column_set_failure_names_the_missing_and_the_unexpected_columns():
    from tests.unit.test_validation import build_good_frame, validate

    frame = build_good_frame(USER_CATEGORY_AFFINITY).drop("share_12w").with_columns(debug=pl.lit(1))
    report = validate(USER_CATEGORY_AFFINITY, frame)
    (column_set,) = [f for f in report.failures if f["expectation"] == "expect_table_columns_to_match_set"]
    assert column_set["observed"] == {"unexpected": ["debug"], "missing": ["share_12w"]}


def test_validation_never_uses_or_changes_a_gx_project_in_the_working_directory(tmp_path, monkeypatch):
    import great_expectations as gx

    from tests.unit.test_validation import build_good_frame, validate

    gx.get_context(mode="file", project_root_dir=tmp_path)  # someone's GX project where the job runs
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    monkeypatch.chdir(tmp_path)

    assert validate(USER_CATEGORY_AFFINITY, build_good_frame(USER_CATEGORY_AFFINITY)).success

    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
