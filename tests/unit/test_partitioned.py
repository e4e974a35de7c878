"""A snapshot computed in user partitions equals the whole-log snapshot, table for table and digest for digest."""

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from unittest import mock

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features import contracts, partitioned, store, transform, validation
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import conform_items
from recsys.partitions import all_partitions, in_partition, partition_of

WEEK = date(2024, 3, 4)  # a Monday
START = datetime(2024, 3, 4, tzinfo=UTC)


def build_events(rows: list[tuple[int, int, int, float]]) -> pl.DataFrame:
    """Events from (user_id, item_id, seconds relative to WEEK, weight) rows, sorted as a read delivers them."""
    frame = pl.DataFrame(
        [(u, i, START + timedelta(seconds=s), w) for u, i, s, w in rows], schema=RAW_EVENTS_SCHEMA, orient="row"
    )
    return frame.sort("ts", "user_id", "item_id", "weight").unique(["user_id", "item_id", "ts"], maintain_order=True)


def build_items(releases: list[int | None]) -> pl.DataFrame:
    """Metadata for items 1..len(releases) (release in days relative to WEEK); higher item ids have none."""
    rows = [
        (i, f"c{i % 3}", f"a{i % 2}", None if d is None else START + timedelta(days=d))
        for i, d in enumerate(releases, start=1)
    ]
    return pl.DataFrame(rows, schema=RAW_ITEMS_SCHEMA, orient="row")


def split_and_merge(
    events: pl.DataFrame, metadata: pl.DataFrame, count: int, spill: Path | None = None
) -> dict[str, pl.DataFrame]:
    """As the feature flow does: each partition reads (and conforms items against) its own events only; with
    `spill`, each partition's shares wait for the merge in Parquet files there, as on the thread runner."""
    parts = []
    for partition in all_partitions(count):
        own = events.filter(in_partition("user_id", partition))
        items = conform_items(metadata, own, source="t")
        part = partitioned.build_partition_tables(own, items, WEEK, recent_items=3)
        parts.append(part if spill is None else partitioned.spill_partition_tables(part, spill / str(partition.index)))
    return partitioned.merge_partition_tables(parts, WEEK, neighbours=2)


USER = st.one_of(st.integers(1, 12), st.integers(-(2**40), 2**40))
# Up to 16 weeks before WEEK (every feature window) and the label week's 7 days before it.
EVENT = st.tuples(USER, st.integers(1, 9), st.integers(-16 * 7 * 86_400, 7 * 86_400), st.floats(0, 5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(EVENT, min_size=1, max_size=60),
    releases=st.lists(st.one_of(st.none(), st.integers(-200, 30)), min_size=6, max_size=6),
    count=st.integers(2, 6),
    merge_rows=st.integers(1, 12),
    spill=st.booleans(),
)
def test_partitioned_snapshot_equals_the_whole_log_snapshot_with_the_same_digests(
    rows, releases, count, merge_rows, spill
):
    events, metadata = build_events(rows), build_items(releases)
    whole = transform.build_week_tables(
        events, conform_items(metadata, events, source="t"), WEEK, recent_items=3, neighbours=2
    )

    # User tables and transitions merged a few rows at a time: many id ranges, as at a million users.
    # Shares spilled to Parquet or kept in memory.
    with (
        mock.patch.object(transform, "TRANSITION_MERGE_ROWS", merge_rows),
        mock.patch.object(partitioned, "MERGE_ROWS", merge_rows),
        tempfile.TemporaryDirectory() as folder,
    ):
        merged = split_and_merge(events, metadata, count, Path(folder) if spill else None)

    assert list(merged) == list(whole)
    for name, frame in whole.items():
        assert_frame_equal(merged[name], frame, check_exact=True)
        as_of = transform.assign_as_of(name, WEEK)
        assert store.digest_table(name, merged[name], as_of) == store.digest_table(name, frame, as_of)


def test_one_partition_is_the_whole_log_path():
    events = build_events([(1, 1, -86_400, 1.5), (2, 1, -3 * 86_400, 2.0), (2, 2, -2 * 86_400, 1.0)])
    items = conform_items(build_items([None, -10]), events, source="t")
    options = {"recent_items": 3, "neighbours": 2}

    one = partitioned.build_week_tables(events, items, WEEK, partitions=1, **options)

    whole = transform.build_week_tables(events, items, WEEK, **options)
    assert list(one) == list(whole)
    assert all(one[name].equals(whole[name]) for name in whole)


def test_partitions_without_users_still_merge_into_the_whole_snapshot():
    # One user: every other partition is empty.
    events = build_events([(7, 1, -86_400, 1.0), (7, 2, -2 * 86_400, 1.0), (7, 1, -20 * 86_400, 3.0)])
    metadata = build_items([-100, None])
    whole = transform.build_week_tables(
        events, conform_items(metadata, events, source="t"), WEEK, recent_items=3, neighbours=2
    )

    merged = split_and_merge(events, metadata, 5)

    assert list(merged) == list(whole)
    for name, frame in whole.items():
        assert_frame_equal(merged[name], frame, check_exact=True)


def test_raw_digest_from_partition_hashes_equals_the_whole_window_digest():
    events = build_events([(u, u % 3 + 1, -u * 3_600, u / 7) for u in range(1, 40)])
    before = START - timedelta(hours=10)
    parts = [store.hash_raw_window(events.filter(in_partition("user_id", p)), before) for p in all_partitions(3)]
    assert store.digest_event_hashes(parts) == store.digest_raw_window(events, before)
    assert store.digest_raw_window(events, before).startswith("29:")


# --- each partition checks its own rows; the merged table is checked for what needs it whole ---

CHECK_OPTIONS = {"min_rows_ratio": 0.5, "drift_threshold": 0.25, "drift_blocks": False}


def partition_log() -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = [
        (u, (u * 7 + k) % 9 + 1, -(u * 5 + k) * 3_600 - k * 86_400, 1.0 + k) for u in range(1, 30) for k in range(4)
    ]
    rows += [(u, u % 9 + 1, 86_400 + u, 1.0) for u in range(1, 30, 3)]  # the label week
    return build_events(rows), build_items([-200, -100, None, -50, -10, 3, -30, None, -80])


def checked_partitions(events: pl.DataFrame, metadata: pl.DataFrame, count: int, spoil=None):
    """As the feature flow's partitions do: compute each partition's share and check its rows;
    `spoil(index, tables)` may corrupt a partition's tables before its check."""
    shares, failures = [], []
    for index, partition in enumerate(all_partitions(count)):
        own = events.filter(in_partition("user_id", partition))
        share = partitioned.build_partition_tables(own, conform_items(metadata, own, source="t"), WEEK, recent_items=3)
        if spoil is not None:
            spoil(index, share.tables)
        shares.append(share)
        failures.append(partitioned.check_partition_tables(share.tables, WEEK))
    checked = {name: validation.merge_failures([f[name] for f in failures]) for name in shares[0].tables}
    return shares, checked


def test_partitions_checked_apart_give_the_reports_of_the_whole_tables():
    events, metadata = partition_log()
    whole = transform.build_week_tables(
        events, conform_items(metadata, events, source="t"), WEEK, recent_items=3, neighbours=2
    )
    shares, checked = checked_partitions(events, metadata, 3)
    merged = partitioned.merge_partition_tables(shares, WEEK, neighbours=2)
    as_ofs = {name: transform.assign_as_of(name, WEEK) for name in whole}

    expected = validation.validate_tables(whole, as_ofs=as_ofs, previous={}, **CHECK_OPTIONS)
    reports = validation.validate_tables(merged, as_ofs=as_ofs, previous={}, checked=checked, **CHECK_OPTIONS)

    assert set(checked) == {name for name in whole if name.startswith("user_") or name == "labels"}
    assert all(not share.tables for share in shares)  # the merge took every share of every user table
    assert {name: r.to_dict() for name, r in reports.items()} == {name: r.to_dict() for name, r in expected.items()}
    assert all(r.success for r in reports.values())


def test_a_bad_row_in_one_partition_fails_its_table_with_the_counts_of_the_whole_table():
    events, metadata = partition_log()

    def spoil(index, tables):
        if index == 1:  # two shares above 1 in one partition's affinities
            frame = tables["user_category_affinity"]
            bad = pl.int_range(pl.len()) < 2
            tables["user_category_affinity"] = frame.with_columns(
                pl.when(bad).then(pl.lit(1.5)).otherwise(pl.col("share_12w")).alias("share_12w")
            )

    shares, checked = checked_partitions(events, metadata, 3, spoil)
    merged = partitioned.merge_partition_tables(shares, WEEK, neighbours=2)
    as_ofs = {name: transform.assign_as_of(name, WEEK) for name in merged}
    whole_check = validation.validate_table(
        contracts.CONTRACTS["user_category_affinity"],
        merged["user_category_affinity"],
        as_of=WEEK,
        previous=None,
        **CHECK_OPTIONS,
    )

    reports = validation.validate_tables(merged, as_ofs=as_ofs, previous={}, checked=checked, **CHECK_OPTIONS)

    bad = reports["user_category_affinity"]
    assert not bad.success
    assert [(f["expectation"], f["columns"], f["unexpected_count"]) for f in bad.failures] == [
        ("expect_column_values_to_be_between", ["share_12w"], 2)
    ]
    assert bad.failures == whole_check.failures
    assert "user_category_affinity as_of=2024-03-04" in bad.describe_failures()
    assert all(r.success for name, r in reports.items() if name != "user_category_affinity")


def test_failures_of_several_partitions_merge_into_one_per_expectation():
    def failure(count, examples, observed=None):
        return {"expectation": "expect_column_values_to_not_be_null", "columns": ["x"], "expected": {},
                "observed": observed, "unexpected_count": count, "examples": examples}  # fmt: skip

    other = failure(1, [9]) | {"columns": ["y"]}

    merged = validation.merge_failures([[failure(2, [1, 2])], [], [failure(5, [2, 3, 4, 5, 6]), other]])

    assert merged == [failure(7, [1, 2, 3, 4, 5]), other]


def test_a_merged_table_without_rows_fails_its_row_count():
    frame = pl.DataFrame(schema=contracts.USER_FEATURES.schema)

    reports = validation.validate_tables(
        {"user_features": frame}, as_ofs={"user_features": WEEK}, previous={}, checked={"user_features": []},
        **CHECK_OPTIONS,
    )  # fmt: skip

    assert not reports["user_features"].success
    assert reports["user_features"].failures[0]["expectation"] == "expect_table_row_count_to_be_between"


def test_collaborative_scores_checked_one_partition_at_a_time_give_the_report_of_the_whole_table():
    events, metadata = partition_log()
    merged = partitioned.merge_partition_tables(checked_partitions(events, metadata, 3)[0], WEEK, neighbours=2)
    name = contracts.COLLABORATIVE_SCORES.name
    good = merged[name]
    # Three ranks below 1 (distinct, as examples are), of users in different partitions: the counts
    # must add up over the partitions.
    row = pl.int_range(pl.len())
    bad = good.with_columns(
        pl.when(row == 0).then(0).when(row == good.height // 2).then(-1).when(row == good.height - 1).then(-2)
        .otherwise(pl.col("als_rank")).alias("als_rank")
    )  # fmt: skip
    assert bad.filter(pl.col("als_rank") < 1).select(partition_of("user_id", 3).n_unique()).item() >= 2

    for frame, passed in ((good, True), (bad, False)):
        whole = validation.validate_table(contracts.CONTRACTS[name], frame, as_of=WEEK, previous=None, **CHECK_OPTIONS)
        checked = {name: partitioned.check_merged_rows(frame, name, WEEK, 3)}
        reports = validation.validate_tables(
            {name: frame}, as_ofs={name: WEEK}, previous={}, checked=checked, **CHECK_OPTIONS
        )
        assert reports[name].success is whole.success is passed
        assert normalise(reports[name].to_dict()) == normalise(whole.to_dict())
    assert [(f["columns"], f["unexpected_count"]) for f in reports[name].failures] == [(["als_rank"], 3)]


def normalise(report: dict) -> dict:
    """A report with each failure's examples in ascending order (partitions find them in their own order)."""
    return report | {"failures": [f | {"examples": sorted(f["examples"])} for f in report["failures"]]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(EVENT, min_size=0, max_size=80), count=st.integers(1, 5), merge_rows=st.integers(1, 30))
def test_transitions_merged_one_item_range_at_a_time_equal_the_whole_merge(rows, count, merge_rows):
    events = build_events(rows) if rows else pl.DataFrame(schema=RAW_EVENTS_SCHEMA)
    parts = [
        transform.count_transitions(events.filter(in_partition("user_id", partition)), WEEK)
        for partition in all_partitions(count)
    ]
    whole = transform.build_item_transitions(transform.merge_transitions(parts), WEEK, 2)

    ranged = transform.build_item_transitions_of_parts(parts, WEEK, 2, rows_per_range=merge_rows)

    assert_frame_equal(ranged, whole, check_exact=True)
