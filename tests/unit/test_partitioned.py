"""A snapshot computed in user partitions equals the whole-log snapshot, table for table and digest for digest."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features import partitioned, store, transform
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import conform_items
from recsys.partitions import all_partitions, in_partition

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


def split_and_merge(events: pl.DataFrame, metadata: pl.DataFrame, count: int) -> dict[str, pl.DataFrame]:
    """As the feature flow does: each partition reads (and conforms items against) its own events only."""
    parts = []
    for partition in all_partitions(count):
        own = events.filter(in_partition("user_id", partition))
        items = conform_items(metadata, own, source="t")
        parts.append(partitioned.build_partition_tables(own, items, WEEK, recent_items=3))
    return partitioned.merge_partition_tables(parts, WEEK, neighbours=2)


USER = st.one_of(st.integers(1, 12), st.integers(-(2**40), 2**40))
# Up to 16 weeks before WEEK (every feature window) and the label week's 7 days before it.
EVENT = st.tuples(USER, st.integers(1, 9), st.integers(-16 * 7 * 86_400, 7 * 86_400), st.floats(0, 5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(EVENT, min_size=1, max_size=60),
    releases=st.lists(st.one_of(st.none(), st.integers(-200, 30)), min_size=6, max_size=6),
    count=st.integers(2, 6),
)
def test_partitioned_snapshot_equals_the_whole_log_snapshot_with_the_same_digests(rows, releases, count):
    events, metadata = build_events(rows), build_items(releases)
    whole = transform.build_week_tables(
        events, conform_items(metadata, events, source="t"), WEEK, recent_items=3, neighbours=2
    )

    merged = split_and_merge(events, metadata, count)

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
