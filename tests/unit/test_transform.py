"""Feature and label computation on tiny hand-built logs: values, windows, edges, point-in-time."""

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features import collaborative, contracts, transform
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import conform_items

AS_OF = date(2024, 3, 4)  # a Monday
START = datetime(2024, 3, 4, tzinfo=UTC)


def days_before(days: float) -> datetime:
    return START - timedelta(days=days)


def build_events(*rows: tuple[int, int, datetime, float]) -> pl.DataFrame:
    """Events from (user_id, item_id, ts, weight) rows."""
    return pl.DataFrame(rows, schema=RAW_EVENTS_SCHEMA, orient="row")


def build_items(*rows: tuple[int, str, str, datetime | None]) -> pl.DataFrame:
    """Item metadata from (item_id, category, creator, release_ts) rows."""
    return pl.DataFrame(rows, schema=RAW_ITEMS_SCHEMA, orient="row")


def build_tables(events: pl.DataFrame, items: pl.DataFrame, **sizes: int) -> dict[str, pl.DataFrame]:
    options = {"recent_items": 20, "neighbours": 50} | sizes
    return transform.build_feature_tables(events, items, AS_OF, **options)


def row_of(frame: pl.DataFrame, **key: int) -> dict:
    rows = frame.filter(**key).to_dicts()
    assert len(rows) == 1, f"expected one row for {key}, got {rows}"
    return rows[0]


ITEMS = build_items(
    (10, "rock", "artist_a", days_before(400)),
    (11, "jazz", "artist_b", days_before(300)),
    (12, "rock", "artist_b", days_before(200)),
)

# One user's history, spread over every window: 1 day, 10, 20, 50 and 100 days ago.
HISTORY = build_events(
    (1, 10, days_before(1), 2.0),
    (1, 10, days_before(10), 1.0),
    (1, 11, days_before(20), 3.0),
    (1, 12, days_before(50), 1.0),
    (1, 10, days_before(100), 1.0),
)


def test_user_activity_counts_events_items_and_weight_per_window():
    features = build_tables(HISTORY, ITEMS)["user_features"]

    assert features.to_dicts() == [
        {
            "as_of": AS_OF,
            "user_id": 1,
            "events_1w": 1,
            "events_4w": 3,
            "events_12w": 4,
            "events_total": 5,
            "distinct_items_1w": 1,
            "distinct_items_4w": 2,
            "distinct_items_12w": 3,
            "distinct_items_total": 3,
            "weight_1w": 2.0,
            "weight_4w": 6.0,
            "weight_12w": 7.0,
            "days_since_first_event": 100.0,
            "days_since_last_event": 1.0,
            "distinct_categories_12w": 2,
        }
    ]


def test_window_includes_an_event_exactly_its_length_before_as_of():
    events = build_events((1, 10, days_before(7), 1.0), (1, 10, days_before(7.001), 1.0))

    features = row_of(build_tables(events, ITEMS)["user_features"], user_id=1)

    assert (features["events_1w"], features["events_4w"]) == (1, 2)


def test_users_are_computed_independently():
    other = build_events((2, 11, days_before(3), 5.0))

    features = build_tables(pl.concat([HISTORY, other]), ITEMS)["user_features"]

    assert features["user_id"].to_list() == [1, 2]
    assert row_of(features, user_id=2) | {"as_of": None} == {
        "as_of": None,
        "user_id": 2,
        "events_1w": 1,
        "events_4w": 1,
        "events_12w": 1,
        "events_total": 1,
        "distinct_items_1w": 1,
        "distinct_items_4w": 1,
        "distinct_items_12w": 1,
        "distinct_items_total": 1,
        "weight_1w": 5.0,
        "weight_4w": 5.0,
        "weight_12w": 5.0,
        "days_since_first_event": 3.0,
        "days_since_last_event": 3.0,
        "distinct_categories_12w": 1,
    }
    assert row_of(features, user_id=1)["events_total"] == 5


def test_item_popularity_trend_and_age():
    events = build_events(
        (1, 10, days_before(1), 1.0),
        (2, 10, days_before(2), 1.0),
        (1, 10, days_before(20), 1.0),
        (3, 10, days_before(60), 1.0),
        (1, 11, days_before(15), 1.0),
    )

    features = build_tables(events, ITEMS)["item_features"]

    assert features["item_id"].to_list() == [10, 11, 12]
    assert row_of(features, item_id=10) == {
        "as_of": AS_OF,
        "item_id": 10,
        "category": "rock",
        "creator": "artist_a",
        "plays_1w": 2,
        "plays_4w": 3,
        "plays_12w": 4,
        "plays_total": 4,
        "users_4w": 2,
        "users_total": 3,
        "trend_1w_vs_4w": (2 + 1) / (3 / 4 + 1),
        "days_since_release": 400.0,
        "days_since_first_event": 60.0,
        "popularity_rank_4w": 1,
    }
    # Released but never played: listed with zero popularity, as old as its release.
    unplayed = row_of(features, item_id=12)
    assert (unplayed["plays_total"], unplayed["trend_1w_vs_4w"]) == (0, 1.0)
    assert unplayed["days_since_first_event"] == unplayed["days_since_release"] == 200.0
    assert unplayed["popularity_rank_4w"] == 3


def test_item_released_at_or_after_as_of_is_excluded_until_played():
    items = pl.concat(
        [
            ITEMS,
            build_items(
                (20, "pop", "artist_c", START),
                (21, "pop", "artist_c", START + timedelta(days=3)),
            ),
        ]
    )

    features = build_tables(HISTORY, items)["item_features"]

    assert features["item_id"].to_list() == [10, 11, 12]


def test_item_without_metadata_is_as_old_as_its_first_play():
    events = build_events((1, 99, days_before(5), 1.0), (2, 99, days_before(2), 1.0))

    features = row_of(build_tables(events, ITEMS)["item_features"], item_id=99)

    assert (features["category"], features["creator"]) == ("unknown", "unknown")
    assert features["days_since_release"] == features["days_since_first_event"] == 5.0


def test_popularity_rank_breaks_ties_by_total_plays_then_item_id():
    events = build_events(
        (1, 12, days_before(1), 1.0),
        (1, 11, days_before(1), 1.0),
        (1, 10, days_before(2), 1.0),
        (1, 10, days_before(60), 1.0),
    )

    features = build_tables(events, ITEMS)["item_features"]

    ranks = dict(zip(features["item_id"], features["popularity_rank_4w"], strict=True))
    assert ranks == {10: 1, 11: 2, 12: 3}


# Baskets: user 1 {A, B}, user 2 {A, B, C}, user 3 {A}; A=10, B=11, C=12.
BASKETS = build_events(
    (1, 10, days_before(1), 1.0),
    (1, 11, days_before(2), 1.0),
    (2, 10, days_before(1), 1.0),
    (2, 11, days_before(2), 1.0),
    (2, 12, days_before(3), 1.0),
    (3, 10, days_before(1), 1.0),
)


def scores_of(neighbours: pl.DataFrame) -> dict[tuple[int, int], float]:
    return {(r["item_id"], r["neighbour_id"]): r["score"] for r in neighbours.to_dicts()}


def test_neighbour_scores_are_cosine_of_shared_users():
    neighbours = build_tables(BASKETS, ITEMS, recent_items=20, neighbours=50)["item_neighbours"]

    assert scores_of(neighbours) == pytest.approx(
        {
            (10, 11): 2 / 6**0.5,
            (10, 12): 1 / 3**0.5,
            (11, 10): 2 / 6**0.5,
            (11, 12): 1 / 2**0.5,
            (12, 11): 1 / 2**0.5,
            (12, 10): 1 / 3**0.5,
        }
    )
    assert neighbours.filter(item_id=10)["rank"].to_list() == [1, 2]
    assert neighbours["neighbour_id"].to_list()[:2] == [11, 12]


def test_neighbour_scores_are_symmetric_and_within_unit_interval():
    many = pl.concat(
        [
            BASKETS,
            build_events(*[(u, 10 + (u * k) % 7, days_before(k + 1), 1.0) for u in range(4, 30) for k in range(5)]),
        ]
    )

    scores = scores_of(build_tables(many, ITEMS, recent_items=20, neighbours=50)["item_neighbours"])

    assert all(0 < s <= 1 for s in scores.values())
    assert all(scores[(b, a)] == pytest.approx(s) for (a, b), s in scores.items())


def test_neighbours_keep_top_k_and_break_score_ties_by_id():
    # 11 and 12 share exactly one user with 10 each: equal scores, the lower id wins.
    events = build_events(
        (1, 10, days_before(1), 1.0),
        (1, 11, days_before(2), 1.0),
        (2, 10, days_before(1), 1.0),
        (2, 12, days_before(2), 1.0),
    )

    neighbours = build_tables(events, ITEMS, recent_items=20, neighbours=1)["item_neighbours"]

    assert neighbours.filter(item_id=10).select("neighbour_id", "rank").rows() == [(11, 1)]
    assert neighbours.group_by("item_id").len()["len"].max() == 1


def test_neighbours_use_only_each_users_recent_items_of_the_last_12_weeks():
    events = build_events(
        (1, 10, days_before(1), 1.0),
        (1, 11, days_before(2), 1.0),
        (1, 12, days_before(3), 1.0),  # beyond the 2 most recent items
        (1, 13, days_before(90), 1.0),  # beyond 12 weeks
    )

    neighbours = build_tables(events, ITEMS, recent_items=2, neighbours=50)["item_neighbours"]

    assert set(scores_of(neighbours)) == {(10, 11), (11, 10)}


def test_category_shares_of_each_user_sum_to_one():
    affinity = build_tables(HISTORY, ITEMS)["user_category_affinity"]

    assert affinity.select("user_id", "category", "events_12w", "share_12w").rows() == [
        (1, "jazz", 1, 0.25),
        (1, "rock", 3, 0.75),
    ]
    assert affinity.group_by("user_id").agg(pl.col("share_12w").sum())["share_12w"].to_list() == [1.0]


def test_creator_affinity_keeps_each_users_20_favourite_creators():
    items = build_items(*[(i, "pop", f"artist_{i:02d}", days_before(100)) for i in range(25)])
    # Creator i gets i + 1 plays, so the 5 least played creators drop out.
    events = build_events(*[(1, i, days_before(1 + k), 1.0) for i in range(25) for k in range(i + 1)])

    affinity = build_tables(events, items)["user_creator_affinity"]

    assert affinity.height == 20
    assert affinity.sort("events_12w", descending=True)["creator"][0] == "artist_24"
    assert "artist_04" not in affinity["creator"].to_list()
    assert 0 < affinity["share_12w"].sum() < 1


def test_affinity_ties_and_unknown_metadata():
    events = build_events((1, 10, days_before(1), 1.0), (1, 11, days_before(1), 1.0), (1, 77, days_before(1), 1.0))

    affinity = build_tables(events, ITEMS)["user_category_affinity"]

    assert affinity.select("category", "share_12w").rows() == [("jazz", 1 / 3), ("rock", 1 / 3), ("unknown", 1 / 3)]


def test_user_item_history_sums_events_and_weight_per_pair():
    history = build_tables(HISTORY, ITEMS)["user_item_history"]

    assert history.select("user_id", "item_id", "events", "weight", "days_since_last_event").rows() == [
        (1, 10, 3, 4.0, 1.0),
        (1, 11, 1, 3.0, 20.0),
        (1, 12, 1, 1.0, 50.0),
    ]


def test_labels_are_the_weeks_pairs_marked_new_when_never_consumed_before():
    week = build_events(
        (1, 10, START, 2.0),  # consumed before: not new
        (1, 10, START + timedelta(days=1), 1.0),
        (1, 13, START + timedelta(days=6, hours=23), 1.0),
        (2, 10, START + timedelta(days=2), 1.0),
        (2, 11, START + timedelta(days=7), 1.0),  # the next week
    )

    labels = transform.build_labels(pl.concat([HISTORY, week]), AS_OF)

    assert labels.select("user_id", "item_id", "events", "weight", "is_new").rows() == [
        (1, 10, 2, 3.0, False),
        (1, 13, 1, 1.0, True),
        (2, 10, 1, 1.0, True),
    ]
    assert labels["as_of"].unique().to_list() == [AS_OF]


def test_a_weeks_snapshot_holds_its_features_and_the_labels_of_the_week_that_closed():
    # User 2 leaves items unconsumed: every table, collaborative scores included, has rows.
    last_week = build_events((1, 11, START - timedelta(days=3), 1.0), (2, 10, START - timedelta(days=3), 1.0))

    tables = transform.build_week_tables(pl.concat([HISTORY, last_week]), ITEMS, AS_OF, recent_items=20, neighbours=50)

    assert set(tables) == {*(c.name for c in contracts.FEATURE_TABLES), "labels"}
    assert tables["labels"]["as_of"].unique().to_list() == [AS_OF - timedelta(weeks=1)]
    assert tables["user_features"]["as_of"].unique().to_list() == [AS_OF]
    assert {n: transform.assign_as_of(n, AS_OF) for n in tables} == {
        n: frame["as_of"][0] for n, frame in tables.items()
    }


def test_a_week_without_events_before_it_has_no_labels_table():
    quiet = HISTORY.filter(pl.col("ts") < START - timedelta(weeks=1))

    tables = transform.build_week_tables(quiet, ITEMS, AS_OF, recent_items=20, neighbours=50)

    assert "labels" not in tables


def test_event_exactly_at_as_of_is_a_label_not_a_feature():
    at_as_of = build_events((5, 11, START, 1.0))

    tables = build_tables(pl.concat([HISTORY, at_as_of]), ITEMS)
    labels = transform.build_labels(pl.concat([HISTORY, at_as_of]), AS_OF)

    assert 5 not in tables["user_features"]["user_id"].to_list()
    assert row_of(tables["item_features"], item_id=11)["plays_total"] == 1
    assert labels.select("user_id", "item_id").rows() == [(5, 11)]
    for name, frame in build_tables(HISTORY, ITEMS).items():
        assert_frame_equal(tables[name], frame, check_exact=True)


@pytest.mark.parametrize("contract", contracts.FEATURE_TABLES, ids=lambda c: c.name)
def test_every_table_follows_its_contract_sorted_by_key(contract):
    frame = build_tables(pl.concat([HISTORY, BASKETS]), ITEMS)[contract.name]

    assert frame.schema == pl.Schema(contract.schema)
    assert frame.height > 0
    assert frame.equals(frame.sort(list(contract.key)))
    assert frame["as_of"].unique().to_list() == [AS_OF]
    assert not frame.select(list(contract.key)).is_duplicated().any()


def test_no_events_gives_empty_tables_but_lists_released_items():
    tables = build_tables(HISTORY.clear(), ITEMS)

    assert {n: f.height for n, f in tables.items()} == {
        "user_features": 0,
        "item_features": 3,
        "item_neighbours": 0,
        "user_category_affinity": 0,
        "user_creator_affinity": 0,
        "user_item_history": 0,
        "collaborative_scores": 0,
        "als_user_factors": 0,
        "als_item_factors": 0,
        "item_transitions": 0,
    }
    assert tables["item_features"]["plays_total"].to_list() == [0, 0, 0]
    assert all(f.schema == pl.Schema(contracts.CONTRACTS[n].schema) for n, f in tables.items())
    assert transform.build_labels(HISTORY.clear(), AS_OF).is_empty()


def test_nothing_before_as_of_and_no_catalogue_gives_all_tables_empty():
    only_future = build_events((1, 10, START + timedelta(days=1), 1.0))

    tables = build_tables(only_future, ITEMS.clear())

    assert all(f.is_empty() for f in tables.values())


def test_single_user_single_event():
    tables = build_tables(build_events((1, 10, days_before(0.5), 1.0)), ITEMS)

    assert tables["user_features"].select("user_id", "events_total", "days_since_last_event").rows() == [(1, 1, 0.5)]
    assert tables["item_neighbours"].is_empty()
    assert tables["user_category_affinity"].select("category", "share_12w").rows() == [("rock", 1.0)]


def test_inputs_are_not_modified():
    events, items = HISTORY.clone(), ITEMS.clone()

    build_tables(events, items)
    transform.build_labels(events, AS_OF)

    assert_frame_equal(events, HISTORY)
    assert_frame_equal(items, ITEMS)


# Point-in-time: events at or after as_of may never change a feature table.
SECONDS_BEFORE = st.integers(min_value=1, max_value=120 * 86_400)
SECONDS_AFTER = st.integers(min_value=0, max_value=30 * 86_400)
EVENT = st.tuples(st.integers(1, 6), st.integers(1, 8), st.floats(0, 5, allow_nan=False))


def to_events(rows: list[tuple[tuple[int, int, float], int]], sign: int) -> pl.DataFrame:
    return build_events(*[(u, i, START + sign * timedelta(seconds=s), w) for (u, i, w), s in rows])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    past=st.lists(st.tuples(EVENT, SECONDS_BEFORE), max_size=30),
    future=st.lists(st.tuples(EVENT, SECONDS_AFTER), min_size=1, max_size=15),
    releases=st.lists(st.one_of(st.none(), st.integers(-200, 30)), min_size=8, max_size=8),
)
def test_events_at_or_after_as_of_never_change_a_snapshot(past, future, releases):
    # Metadata for items 1-6 only (7, 8 are unknown); some released after as_of.
    metadata = build_items(
        *[
            (i, f"c{i % 3}", f"a{i % 2}", None if d is None else START + timedelta(days=d))
            for i, d in enumerate(releases[:6], start=1)
        ]
    )
    before = to_events(past, -1)
    with_future = pl.concat([before, to_events(future, +1)])

    # As the flow does: items conformed against every event read, later ones included.
    expected = build_tables(before, conform_items(metadata, before, source="t"), recent_items=3, neighbours=2)
    actual = build_tables(with_future, conform_items(metadata, with_future, source="t"), recent_items=3, neighbours=2)

    for name, frame in expected.items():
        assert_frame_equal(actual[name], frame, check_exact=True)


def test_required_weeks_are_the_history_training_needs_and_as_of():
    as_of = date(1998, 3, 2)
    assert transform.required_weeks(as_of, 2) == [date(1998, 2, 16), date(1998, 2, 23), as_of]


def test_required_weeks_skip_weeks_whose_snapshot_would_see_no_event():
    as_of = date(1997, 10, 6)
    first_event = datetime(1997, 9, 22, tzinfo=UTC)  # a Monday: the snapshot of that Monday sees nothing
    assert transform.required_weeks(as_of, 6, first_event) == [date(1997, 9, 29), as_of]
    assert transform.required_weeks(as_of, 6, datetime(1997, 10, 6, tzinfo=UTC)) == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    baskets=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=1, max_size=60, unique=True),
    pairs_per_chunk=st.integers(1, 40),
)
def test_neighbours_counted_in_item_ranges_equal_neighbours_counted_at_once(baskets, pairs_per_chunk):
    frame = pl.DataFrame(baskets, schema={"user_id": pl.Int64, "item_id": pl.Int64}, orient="row")

    in_ranges = transform.build_item_neighbours(frame, AS_OF, 3, pairs_per_chunk=pairs_per_chunk)

    at_once = transform.build_item_neighbours(frame, AS_OF, 3, pairs_per_chunk=10**9)
    assert_frame_equal(in_ranges, at_once, check_exact=True)


# Collaborative scores: EASE and ALS fitted on the snapshot's history, each user's top unconsumed items.
# Users 1-4 share taste A (items 1-3), users 5-8 taste B (items 4-6); each user misses one item of their taste.
TASTES = build_events(
    *[
        (user, item, days_before(1 + user), 1.0)
        for user in range(1, 9)
        for item in ((1, 2, 3) if user <= 4 else (4, 5, 6))
        if item != (user - 1) % 3 + (1 if user <= 4 else 4)
    ]
)
COLLABORATIVE = collaborative.CollaborativeConfig(als_factors=2, als_iterations=3, threads=1)


def build_scores(events: pl.DataFrame, config=COLLABORATIVE, items_per_user: int = 3) -> pl.DataFrame:
    """The snapshot's collaborative_scores as readers see them: EASE's stored lists and ALS's derived ones."""
    tables = build_tables(events, ITEMS.clear(), collaborative=config, collaborative_items=items_per_user)
    names = ("collaborative_scores", "als_user_factors", "als_item_factors", "user_item_history")
    return transform.derive_collaborative_scores(*(tables[name] for name in names))


def test_collaborative_scores_rank_each_users_unconsumed_items_by_ease_and_als():
    scores = build_scores(TASTES)

    consumed = TASTES.select("user_id", "item_id").unique()
    assert scores.join(consumed, on=["user_id", "item_id"]).is_empty()
    assert scores["user_id"].unique().to_list() == list(range(1, 9))
    for model in ("ease", "als"):
        ranked = scores.drop_nulls(f"{model}_rank")
        assert (
            ranked.group_by("user_id").agg(pl.col(f"{model}_rank").sort())[f"{model}_rank"].to_list() == [[1, 2, 3]] * 8
        )
        # Best first: the rank follows the score within each user.
        assert ranked.sort("user_id", f"{model}_rank").equals(
            ranked.sort(["user_id", f"{model}_score", "item_id"], descending=[False, True, False])
        )
    # EASE's first pick is the one item of the user's own taste they have not consumed.
    best = scores.filter(pl.col("ease_rank") == 1).select("user_id", "item_id").rows()
    assert best == [(u, (u - 1) % 3 + (1 if u <= 4 else 4)) for u in range(1, 9)]


def test_collaborative_scores_keep_items_per_user_from_each_model():
    scores = build_scores(TASTES, items_per_user=1)

    assert scores.group_by("user_id").agg(pl.col("ease_rank").max(), pl.col("als_rank").max()).select(
        pl.col("ease_rank", "als_rank").max()
    ).row(0) == (1, 1)
    assert scores.height <= 2 * 8


def test_collaborative_scores_leave_ease_out_above_its_catalogue_bound():
    bounded = replace(COLLABORATIVE, ease_max_items=5)  # the history holds 6 items

    scores = build_scores(TASTES, bounded)

    assert scores["ease_score"].null_count() == scores.height
    assert scores["ease_rank"].null_count() == scores.height
    assert scores["als_rank"].null_count() == 0


def test_collaborative_scores_never_see_events_at_or_after_as_of():
    later = build_events((1, 1, START, 1.0), (5, 4, START + timedelta(days=2), 1.0), (9, 2, START, 1.0))

    assert_frame_equal(build_scores(pl.concat([TASTES, later])), build_scores(TASTES), check_exact=True)
    # The same events before as_of do change them: the check above can fail.
    earlier = later.with_columns(pl.col("ts") - timedelta(days=3))
    assert not build_scores(pl.concat([TASTES, earlier])).equals(build_scores(TASTES))


def test_collaborative_tables_of_an_empty_history_are_empty_tables():
    tables = transform.build_collaborative_tables(
        pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64}), AS_OF, COLLABORATIVE, items_per_user=3
    )

    assert list(tables) == ["collaborative_scores", "als_user_factors", "als_item_factors"]
    for name, table in tables.items():
        assert table.is_empty()
        assert table.schema == pl.Schema(contracts.CONTRACTS[name].schema)


def test_als_is_stored_as_factors_and_its_lists_derived_from_them_equal_the_fitted_models():
    from features.synthetic import generate_log
    from ranking.candidates import SnapshotTables

    raw = generate_log(n_users=120, n_items=60, n_events=3_000, n_weeks=4, end=transform.week_start(AS_OF), seed=3)
    week = AS_OF - timedelta(weeks=1)
    tables = transform.build_feature_tables(raw.events, raw.items, week, recent_items=10, neighbours=10)
    history = tables["user_item_history"]

    stored = tables["collaborative_scores"]
    assert stored.height and stored["als_score"].null_count() == stored["als_rank"].null_count() == stored.height
    users, items = tables["als_user_factors"], tables["als_item_factors"]
    assert users["user_id"].to_list() == history["user_id"].unique().sort().to_list()
    assert items["item_id"].to_list() == history["item_id"].unique().sort().to_list()
    assert items["items_per_user"].unique().to_list() == [transform.default_of("collaborative_items_per_user")]

    # Read back whole, as the store gives them: EASE's and ALS's lists of the model fitted on the snapshot.
    fitted = transform.fit_collaborative(history, week, transform.DEFAULT_COLLABORATIVE)
    expected = transform.score_collaborative(fitted, history["user_id"].unique(), week, items_per_user=100)
    assert_frame_equal(SnapshotTables.from_frames(tables).collaborative_scores, expected, check_exact=True)


def test_a_snapshot_stored_before_als_was_kept_as_factors_keeps_its_stored_lists():
    stored = contracts.COLLABORATIVE_SCORES.conform(
        pl.DataFrame({"as_of": [AS_OF], "user_id": [1], "item_id": [2], "ease_score": [None], "ease_rank": [None],
                      "als_score": [0.5], "als_rank": [1]})
    )  # fmt: skip
    no_factors = transform.als_factor_tables(None, AS_OF, 100)
    derived = transform.derive_collaborative_scores(stored, *no_factors.values(), HISTORY.clear())
    assert derived.equals(stored)
