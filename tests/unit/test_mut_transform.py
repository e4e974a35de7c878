"""Point-in-time features and labels: edges that kill mutmut's survivors in `features/transform.py` (issue #17)."""

from datetime import timedelta

import polars as pl

from features import transform
from tests.unit.test_transform import AS_OF, ITEMS, START, build_events, build_items, build_tables, days_before, row_of


def test_an_item_played_before_its_recorded_release_is_zero_days_old_not_negative():
    # Metadata can be wrong: a release date after as_of for an item already played.
    items = pl.concat([ITEMS, build_items((21, "pop", "artist_c", START + timedelta(days=3)))])
    events = build_events((1, 21, days_before(2), 1.0))

    features = row_of(build_tables(events, items)["item_features"], item_id=21)

    assert features["days_since_release"] == 0.0
    assert features["days_since_first_event"] == 2.0


def test_a_category_consumed_only_before_the_last_12_weeks_has_no_affinity_row():
    events = build_events((1, 10, days_before(1), 1.0), (1, 11, days_before(100), 1.0))  # rock recent, jazz old

    affinity = build_tables(events, ITEMS)["user_category_affinity"]

    assert affinity.select("user_id", "category", "events_12w", "share_12w").rows() == [(1, "rock", 1, 1.0)]


def test_a_pair_first_played_at_the_very_start_of_the_week_is_a_new_label():
    events = build_events((1, 10, START, 1.0), (1, 11, START, 1.0), (1, 11, days_before(3), 1.0))

    labels = transform.build_labels(events, AS_OF)

    assert labels.select("user_id", "item_id", "is_new").rows() == [(1, 10, True), (1, 11, False)]
