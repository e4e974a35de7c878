"""Validation of feature tables against their contracts (great-expectations + polars checks)."""

import json
import math
from datetime import date

import polars as pl
import pytest

from features.contracts import (
    ALL_TABLES,
    COLLABORATIVE_SCORES,
    ITEM_TRANSITIONS,
    LABELS,
    USER_CATEGORY_AFFINITY,
    USER_FEATURES,
    USER_ITEM_HISTORY,
    Column,
    TableContract,
)
from features.validation import (
    ValidationFailed,
    build_expectation_suite,
    build_reference_profile,
    check_not_empty,
    check_row_count,
    detect_drift,
    profile_table,
    validate_table,
)

AS_OF = date(2024, 3, 4)


def build_good_frame(contract: TableContract, rows: int = 3) -> pl.DataFrame:
    """A tiny frame satisfying the contract: distinct keys, values inside every range."""
    values = {}
    for column in contract.columns:
        if column.name == "as_of":
            values[column.name] = [AS_OF] * rows
        elif column.dtype == pl.Utf8:
            values[column.name] = [f"c{i}" for i in range(rows)]
        elif column.dtype == pl.Boolean:
            values[column.name] = [i % 2 == 0 for i in range(rows)]
        elif column.dtype == pl.Float64:
            values[column.name] = [0.25 * (i + 1) for i in range(rows)]
        elif contract.distinct_columns and column.name == contract.distinct_columns[1]:
            values[column.name] = [rows + i + 1 for i in range(rows)]  # never equal to the first column's
        else:
            values[column.name] = [i + 1 for i in range(rows)]
    return pl.DataFrame(values, schema=contract.schema)


def validate(contract: TableContract, frame: pl.DataFrame, **overrides):
    options = dict(as_of=AS_OF, previous=None, min_rows_ratio=0.5, drift_threshold=0.25, drift_blocks=False)
    return validate_table(contract, frame, **(options | overrides))


def failed_checks(report) -> set[tuple[str, tuple[str, ...]]]:
    return {(f["expectation"], tuple(f["columns"])) for f in report.failures}


@pytest.mark.parametrize("contract", ALL_TABLES, ids=lambda c: c.name)
def test_good_frame_passes_the_suite_of_every_table(contract):
    report = validate(contract, build_good_frame(contract))

    assert report.success, report.failures
    assert report.failures == []
    assert report.row_count == 3


def with_column(frame: pl.DataFrame, name: str, values: list) -> pl.DataFrame:
    return frame.with_columns(pl.Series(name, values, dtype=frame.schema[name]))


AFFINITY = build_good_frame(USER_CATEGORY_AFFINITY)
VIOLATIONS = {
    "null key": (
        with_column(AFFINITY, "user_id", [1, None, 3]),
        ("expect_column_values_to_not_be_null", ("user_id",)),
    ),
    "duplicate key": (
        with_column(AFFINITY, "category", ["c0", "c0", "c0"]).with_columns(user_id=pl.lit(7)),
        ("expect_compound_columns_to_be_unique", ("as_of", "user_id", "category")),
    ),
    "negative count": (
        with_column(AFFINITY, "events_12w", [1, -1, 3]),
        ("expect_column_values_to_be_between", ("events_12w",)),
    ),
    "share above one": (
        with_column(AFFINITY, "share_12w", [0.5, 1.5, 0.5]),
        ("expect_column_values_to_be_between", ("share_12w",)),
    ),
    "NaN share": (
        with_column(AFFINITY, "share_12w", [0.5, math.nan, 0.5]),
        ("expect_column_values_to_be_finite", ("share_12w",)),
    ),
    "missing column": (
        AFFINITY.drop("events_12w"),
        ("expect_table_columns_to_match_set", ()),
    ),
    "extra column": (
        AFFINITY.with_columns(debug=pl.lit(1)),
        ("expect_table_columns_to_match_set", ()),
    ),
    "rows of another as_of": (
        with_column(AFFINITY, "as_of", [AS_OF, date(2024, 2, 26), AS_OF]),
        ("expect_column_values_to_equal_snapshot_as_of", ("as_of",)),
    ),
}


@pytest.mark.parametrize("case", VIOLATIONS, ids=str)
def test_each_violation_fails_and_is_named_in_report_and_exception(case):
    frame, (expectation, columns) = VIOLATIONS[case]

    report = validate(USER_CATEGORY_AFFINITY, frame)

    assert not report.success
    assert (expectation, columns) in failed_checks(report)
    message = str(ValidationFailed([report]))
    assert "user_category_affinity" in message
    assert expectation in message
    assert expectation in report.to_markdown()


TRANSITIONS = build_good_frame(ITEM_TRANSITIONS)
TRANSITION_VIOLATIONS = {
    "an item as its own next item": (
        with_column(TRANSITIONS, "next_item_id", [4, 2, 6]),
        ("expect_column_pair_values_to_differ", ("item_id", "next_item_id")),
    ),
    "share above one": (
        with_column(TRANSITIONS, "share", [0.5, 1.25, 0.5]),
        ("expect_column_values_to_be_between", ("share",)),
    ),
    "zero transitions": (
        with_column(TRANSITIONS, "transitions", [1, 0, 2]),
        ("expect_column_values_to_be_between", ("transitions",)),
    ),
    "duplicate pair": (
        with_column(TRANSITIONS, "next_item_id", [5, 5, 5]).with_columns(item_id=pl.lit(1, pl.Int64)),
        ("expect_compound_columns_to_be_unique", ("as_of", "item_id", "next_item_id")),
    ),
    "null next item": (
        with_column(TRANSITIONS, "next_item_id", [4, None, 6]),
        ("expect_column_values_to_not_be_null", ("next_item_id",)),
    ),
}


@pytest.mark.parametrize("case", TRANSITION_VIOLATIONS, ids=str)
def test_each_transitions_violation_fails_and_is_named(case):
    frame, (expectation, columns) = TRANSITION_VIOLATIONS[case]

    report = validate(ITEM_TRANSITIONS, frame)

    assert not report.success
    assert (expectation, columns) in failed_checks(report)
    assert "item_transitions" in str(ValidationFailed([report]))


def test_positive_infinity_fails_a_column_bounded_only_below():
    # weight has min=0 and no max: GX's range check alone lets +inf through.
    frame = with_column(build_good_frame(USER_ITEM_HISTORY), "weight", [1.0, math.inf, 2.0])

    report = validate(USER_ITEM_HISTORY, frame)

    assert ("expect_column_values_to_be_finite", ("weight",)) in failed_checks(report)
    failure = next(f for f in report.failures if f["columns"] == ["weight"])
    assert failure["unexpected_count"] == 1
    assert failure["examples"] == [math.inf]


def test_nan_fails_a_nullable_float_column_while_null_passes():
    contract = TableContract(
        name="scores",
        key=("as_of", "user_id"),
        columns=(
            Column("as_of", pl.Date()),
            Column("user_id", pl.Int64()),
            Column("score", pl.Float64(), nullable=True),
        ),
    )
    base = pl.DataFrame({"as_of": [AS_OF] * 2, "user_id": [1, 2], "score": [None, 0.5]}, schema=contract.schema)

    assert validate(contract, base).success
    with_nan = with_column(base, "score", [math.nan, 0.5])
    assert ("expect_column_values_to_be_finite", ("score",)) in failed_checks(validate(contract, with_nan))


def test_row_count_may_not_collapse_below_ratio_of_previous_snapshot():
    previous = {"row_count": 10, "columns": {}}
    frame = build_good_frame(USER_FEATURES, rows=4)

    collapsed = validate(USER_FEATURES, frame, previous=[previous], min_rows_ratio=0.5)
    enough = validate(USER_FEATURES, build_good_frame(USER_FEATURES, rows=5), previous=[previous])

    failure = next(f for f in collapsed.failures if f["expectation"] == "expect_table_row_count_to_be_between")
    assert failure["expected"]["min_value"] == 5
    assert failure["observed"] == 4
    assert "observed 4" in str(ValidationFailed([collapsed]))
    assert enough.success


def rows(*counts: int) -> list[dict]:
    """Profiles of earlier snapshots with these row counts, newest first."""
    return [{"row_count": n, "columns": {"events_4w": {"mean": float(n)}}} for n in counts]


def test_reference_is_the_median_of_the_last_snapshots():
    reference = build_reference_profile(rows(30, 10, 12, 9))

    assert reference["row_count"] == 11
    assert reference["snapshots"] == 4
    assert reference["columns"]["events_4w"]["mean"] == 11
    assert reference["columns"]["events_4w"]["p50"] is None


def test_reference_with_fewer_earlier_snapshots_uses_those_there_are():
    assert build_reference_profile(rows(10))["row_count"] == 10
    assert build_reference_profile(rows(10, 20))["row_count"] == 15


def test_without_an_earlier_snapshot_there_is_no_reference_and_no_row_count_bar():
    assert build_reference_profile([]) is None
    assert build_reference_profile(None) is None
    assert check_row_count(USER_FEATURES, 1, None, 0.5) == (None, None)
    assert validate(USER_FEATURES, build_good_frame(USER_FEATURES, rows=1), previous=[]).success


def test_one_busy_week_does_not_raise_the_bar_for_the_next():
    # The last snapshot alone (30 rows) would ask for 15; the median of four asks for 5.
    report = validate(USER_FEATURES, build_good_frame(USER_FEATURES, rows=8), previous=rows(30, 10, 10, 10))

    assert report.success, report.failures


def test_a_feature_table_that_collapses_fails_naming_the_setting_that_relaxes_it():
    report = validate(USER_FEATURES, build_good_frame(USER_FEATURES, rows=1), previous=rows(10, 10, 10, 10))

    assert not report.success
    failure = next(f for f in report.failures if f["expectation"] == "expect_table_row_count_to_be_between")
    assert failure["expected"]["min_value"] == 5
    message = str(ValidationFailed([report]))
    assert "set RECSYS_MIN_ROWS_RATIO lower (now 0.5) to accept it" in message
    assert "median 10 rows of the last 4 passed snapshot(s)" in message


def test_labels_that_drop_only_warn_as_they_are_not_served():
    report = validate(LABELS, build_good_frame(LABELS, rows=1), previous=rows(10, 10, 10, 10))

    assert report.success, report.failures
    assert "labels row count 1 is below 5" in report.row_count_warning
    assert report.row_count_warning in report.to_markdown()
    assert report.to_dict()["row_count_warning"] == report.row_count_warning


def test_drift_in_a_table_that_is_not_served_never_blocks():
    contract = TableContract(
        name="unserved", key=("id",), columns=(Column("id", pl.Int64()), Column("score", pl.Float64())),
        drift_columns=("score",), served=False,
    )  # fmt: skip
    frame = pl.DataFrame({"id": [1, 2], "score": [1.0, 1.0]}, schema=contract.schema)
    previous = [profile_table(contract, frame.with_columns(pl.col("score") * 10))]

    report = validate(contract, frame, previous=previous, drift_blocks=True)

    assert report.success
    assert any("unserved.score mean moved" in w for w in report.warnings)


def test_empty_frame_fails_even_without_previous_snapshot():
    report = validate(USER_FEATURES, build_good_frame(USER_FEATURES).clear())

    assert ("expect_table_row_count_to_be_between", ()) in failed_checks(report)


def test_a_merged_table_is_checked_for_rows_unless_its_contract_allows_none():
    # A table whose rows were checked in partitions gets its row count checked on the merged table.
    empty_features = build_good_frame(USER_FEATURES).clear()
    assert [f["expectation"] for f in check_not_empty(USER_FEATURES, empty_features)] == [
        "expect_table_row_count_to_be_between"
    ]
    assert check_not_empty(USER_FEATURES, build_good_frame(USER_FEATURES)) == []
    # EASE's lists are empty when the catalogue is above EASE's bound: no failure, as in the suite.
    assert COLLABORATIVE_SCORES.may_be_empty
    assert check_not_empty(COLLABORATIVE_SCORES, build_good_frame(COLLABORATIVE_SCORES).clear()) == []


def test_suite_uses_single_column_uniqueness_for_a_one_column_key():
    contract = TableContract(name="one", key=("id",), columns=(Column("id", pl.Int64()),))

    suite = build_expectation_suite(contract)

    types = {e.expectation_type for e in suite.expectations}
    assert "expect_column_values_to_be_unique" in types
    assert "expect_compound_columns_to_be_unique" not in types


def test_profile_holds_row_count_and_stats_of_numeric_non_key_columns():
    frame = pl.DataFrame(
        {
            "as_of": [AS_OF] * 4,
            "user_id": [1, 2, 3, 4],
            "category": ["a", "b", "c", "d"],
            "events_12w": [0, 10, 20, 30],
            "share_12w": [0.0, 0.5, 0.5, 1.0],
        },
        schema=USER_CATEGORY_AFFINITY.schema,
    )

    profile = profile_table(USER_CATEGORY_AFFINITY, frame)

    assert profile["row_count"] == 4
    assert set(profile["columns"]) == {"events_12w", "share_12w"}
    assert profile["columns"]["events_12w"] == {
        "mean": 15.0,
        "p50": 15.0,
        "p90": 27.0,
        "min": 0.0,
        "max": 30.0,
    }


def profile_with(column: str, mean: float, p50: float, p90: float) -> dict:
    stats = {"mean": mean, "p50": p50, "p90": p90, "min": 0.0, "max": 100.0}
    return {"row_count": 100, "columns": {column: stats}}


def test_drift_reports_columns_whose_stats_moved_beyond_threshold():
    before = profile_with("events_4w", 10.0, 8.0, 20.0)
    after = profile_with("events_4w", 16.0, 8.5, 20.0)

    messages = detect_drift(USER_FEATURES, after, before, threshold=0.25)

    assert len(messages) == 1
    assert "user_features.events_4w mean" in messages[0]
    assert "+60%" in messages[0]


def test_no_drift_without_previous_profile_or_within_threshold():
    before = profile_with("events_4w", 10.0, 8.0, 20.0)
    after = profile_with("events_4w", 11.0, 9.0, 21.0)

    assert detect_drift(USER_FEATURES, after, None, threshold=0.25) == []
    assert detect_drift(USER_FEATURES, after, before, threshold=0.25) == []


def test_drift_away_from_zero_is_reported():
    before = profile_with("events_4w", 0.0, 0.0, 0.0)
    after = profile_with("events_4w", 1.0, 0.0, 0.0)

    assert len(detect_drift(USER_FEATURES, after, before, threshold=0.25)) == 1


def test_drift_warns_by_default_and_fails_when_it_blocks():
    frame = build_good_frame(USER_FEATURES, rows=4)
    previous = profile_table(USER_FEATURES, frame.with_columns(pl.col("events_4w") * 10))

    warned = validate(USER_FEATURES, frame, previous=[previous])
    blocked = validate(USER_FEATURES, frame, previous=[previous], drift_blocks=True)

    assert warned.success
    assert any("events_4w" in w for w in warned.warnings)
    assert not blocked.success
    assert blocked.warnings == []
    assert {f["expectation"] for f in blocked.failures} == {"expect_no_drift"}
    assert "events_4w" in str(ValidationFailed([blocked]))


def test_report_dict_is_strict_json_even_with_nan_and_inf_examples():
    frame = with_column(AFFINITY, "share_12w", [math.nan, math.inf, 0.5])

    report = validate(USER_CATEGORY_AFFINITY, frame)

    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["table"] == "user_category_affinity"
    assert document["as_of"] == "2024-03-04"
    assert document["success"] is False
    assert report.summary_line().startswith("user_category_affinity as_of=2024-03-04: FAILED")


def test_validation_failed_names_only_the_failing_tables():
    good = validate(USER_FEATURES, build_good_frame(USER_FEATURES))
    bad = validate(USER_CATEGORY_AFFINITY, AFFINITY.drop("share_12w"))

    error = ValidationFailed([good, bad])

    assert error.reports == [bad]
    assert "user_category_affinity" in str(error)
    assert "user_features" not in str(error)


def test_blocking_drift_names_the_settings_that_relax_it():
    frame = build_good_frame(USER_FEATURES, rows=4)
    previous = [profile_table(USER_FEATURES, frame.with_columns(pl.col("events_4w") * 10))]

    blocked = validate(USER_FEATURES, frame, previous=previous, drift_blocks=True)

    assert "set RECSYS_DRIFT_THRESHOLD higher (now 0.25) or RECSYS_DRIFT_BLOCKS=false" in str(
        ValidationFailed([blocked])
    )


SCORES = build_good_frame(COLLABORATIVE_SCORES)
SCORE_VIOLATIONS = {
    "NaN EASE score": (with_column(SCORES, "ease_score", [0.5, math.nan, 0.2]), ("ease_score",)),
    "infinite ALS score": (with_column(SCORES, "als_score", [math.inf, 0.5, 0.2]), ("als_score",)),
    "duplicate (user, item)": (
        with_column(SCORES, "item_id", [4, 4, 5]).with_columns(user_id=pl.lit(1, pl.Int64)),
        ("as_of", "user_id", "item_id"),
    ),
    "null user": (with_column(SCORES, "user_id", [1, None, 3]), ("user_id",)),
    "null item": (with_column(SCORES, "item_id", [None, 2, 3]), ("item_id",)),
    "rank 0": (with_column(SCORES, "ease_rank", [0, 1, 2]), ("ease_rank",)),
}


@pytest.mark.parametrize("case", SCORE_VIOLATIONS, ids=str)
def test_a_bad_collaborative_scores_table_fails_naming_the_column(case):
    frame, columns = SCORE_VIOLATIONS[case]

    report = validate(COLLABORATIVE_SCORES, frame)

    assert not report.success
    assert columns in {c for _, c in failed_checks(report)}
    assert "collaborative_scores" in str(ValidationFailed([report]))


def test_collaborative_scores_may_lack_one_models_score_and_rank():
    # A pair in ALS's top list only, and EASE left out above its catalogue bound: nulls, not failures.
    frame = with_column(with_column(SCORES, "ease_score", [None, 0.5, None]), "ease_rank", [None, 1, None])

    assert validate(COLLABORATIVE_SCORES, frame).success
