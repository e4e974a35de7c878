"""Item -> next-item transitions: what users consume right after an item, from the snapshot's past only."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import contracts, partitioned, transform
from features.contracts import RAW_EVENTS_SCHEMA
from features.synthetic import generate_sequential_log

AS_OF = date(2024, 3, 4)
T = datetime(2024, 3, 4, tzinfo=UTC)
DAY = timedelta(days=1)


def events(*rows: tuple[int, int, datetime]) -> pl.DataFrame:
    return pl.DataFrame(
        [(user, item, ts, 1.0) for user, item, ts in rows], schema=list(RAW_EVENTS_SCHEMA), orient="row"
    ).cast(RAW_EVENTS_SCHEMA)


# User 1 watches 1, 2, 2 again, then 3; user 2 watches 1 then 3; user 3 watches 2 alone.
LOG = events(
    (1, 1, T - 10 * DAY),
    (1, 2, T - 9 * DAY),
    (1, 2, T - 8 * DAY),
    (1, 3, T - 7 * DAY),
    (2, 1, T - 3 * DAY),
    (2, 3, T - 2 * DAY),
    (3, 2, T - 1 * DAY),
)


def table(log: pl.DataFrame, top_k: int = 10) -> pl.DataFrame:
    return transform.build_item_transitions(transform.count_transitions(log, AS_OF), AS_OF, top_k)


def test_transitions_follow_each_users_order_and_skip_repeats():
    counted = transform.count_transitions(LOG, AS_OF)

    assert counted.select("item_id", "next_item_id", "transitions").rows() == [(1, 2, 1), (1, 3, 1), (2, 3, 1)]


def test_scores_decay_with_age_and_shares_split_each_items_transitions():
    frame = table(LOG)
    row = {(r["item_id"], r["next_item_id"]): r for r in frame.iter_rows(named=True)}

    # The later event of 1 -> 3 is 2 days old, of 1 -> 2 9 days: weights 0.5^(2/28) and 0.5^(9/28).
    assert row[(1, 3)]["score"] == pytest.approx(0.5 ** (2 / 28), abs=1e-6)
    assert row[(1, 2)]["score"] == pytest.approx(0.5 ** (9 / 28), abs=1e-6)
    assert row[(1, 3)]["share"] + row[(1, 2)]["share"] == pytest.approx(1.0)
    assert (row[(1, 3)]["rank"], row[(1, 2)]["rank"]) == (1, 2)  # the more recent transition first
    assert row[(2, 3)]["share"] == 1.0
    assert frame.schema == pl.Schema(contracts.ITEM_TRANSITIONS.schema)
    assert frame.equals(frame.sort("item_id", "next_item_id"))


def test_top_k_keeps_each_items_best_next_items():
    assert table(LOG, top_k=1).select("item_id", "next_item_id").rows() == [(1, 3), (2, 3)]


def test_events_at_or_after_as_of_do_not_change_the_transitions():
    later = pl.concat([LOG, events((2, 2, T), (3, 1, T + DAY), (1, 1, T + 2 * DAY))])

    assert_frame_equal(table(later), table(LOG), check_exact=True)


def test_a_transition_years_old_still_weighs_one_unit_so_shares_stay_defined():
    old = events((1, 1, T - 3000 * DAY), (1, 2, T - 2999 * DAY))

    frame = table(old)

    assert frame.select("transitions", "score", "share").rows() == [(1, 1 / transform.TRANSITION_UNITS, 1.0)]


def test_same_instant_events_are_ordered_by_item_id():
    same = events((1, 5, T - DAY), (1, 4, T - DAY))

    assert transform.count_transitions(same, AS_OF).select("item_id", "next_item_id").rows() == [(4, 5)]


def test_no_events_give_an_empty_table_of_the_contract():
    frame = table(LOG.clear())

    assert frame.is_empty() and frame.schema == pl.Schema(contracts.ITEM_TRANSITIONS.schema)


@pytest.mark.parametrize("count", [2, 5])
def test_partitioned_transitions_equal_the_whole_log_table_bit_for_bit(count):
    raw = generate_sequential_log(n_users=300, n_items=120, n_events=6_000, n_weeks=6, end=T, seed=5)
    week = AS_OF - timedelta(weeks=1)
    options = {"recent_items": 20, "neighbours": 10}

    whole = transform.build_week_tables(raw.events, raw.items, week, **options)
    parts = partitioned.build_week_tables(raw.events, raw.items, week, partitions=count, **options)

    name = contracts.ITEM_TRANSITIONS.name
    assert whole[name].height > 100
    assert_frame_equal(parts[name], whole[name], check_exact=True)
