from types import SimpleNamespace

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.collaborative import CollaborativeConfig
from ranking.baselines import (
    fit_collaborative,
    recommend,
    recommend_all_time_popular,
    recommend_item_knn,
    recommend_recent_popular,
)
from ranking.candidates import CandidateConfig

ITEMS = pl.DataFrame(
    {
        "item_id": [1, 2, 3, 4, 5],
        "plays_4w": [10, 50, 50, 5, 0],
        "plays_total": [100, 1, 2, 3, 4],
    }
)
# User 1 consumed items 2 and 4 (4 most recently); user 2 consumed item 1; user 3 is cold.
HISTORY = pl.DataFrame(
    {
        "user_id": [1, 1, 2],
        "item_id": [2, 4, 1],
        "events": [1, 2, 1],
        "days_since_last_event": [3.0, 1.0, 2.0],
    }
)
NEIGHBOURS = pl.DataFrame(
    {
        "item_id": [2, 2, 4, 1],
        "neighbour_id": [3, 5, 5, 2],
        "score": [0.5, 0.2, 0.4, 1.0],
        "rank": [1, 2, 1, 1],
    }
)


# What the collaborative baselines read of a snapshot (SnapshotTables' attributes).
TABLES = SimpleNamespace(user_item_history=HISTORY, item_features=ITEMS, item_neighbours=NEIGHBOURS)


def lists(recs: pl.DataFrame) -> dict[int, list[int]]:
    ordered = recs.sort("user_id", "rank")
    return {u: g["item_id"].to_list() for (u,), g in ordered.group_by("user_id", maintain_order=True)}


def test_recent_popular_orders_by_plays_4w_then_item_id_and_skips_consumed():
    recs = recommend_recent_popular(ITEMS, HISTORY, [1, 2, 3], 3)
    assert lists(recs) == {1: [3, 1, 5], 2: [2, 3, 4], 3: [2, 3, 1]}
    assert recs.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "rank": pl.Int64})


def test_all_time_popular_orders_by_plays_total():
    recs = recommend_all_time_popular(ITEMS, HISTORY, [2, 3], 2)
    assert lists(recs) == {2: [5, 4], 3: [1, 5]}


def test_popular_keeps_consumed_items_when_exclusion_is_off():
    recs = recommend_all_time_popular(ITEMS, HISTORY, [2], 2, exclude_consumed=False)
    assert lists(recs) == {2: [1, 5]}


def test_popular_returns_fewer_than_k_when_the_catalogue_runs_out():
    recs = recommend_recent_popular(ITEMS, HISTORY, [1], 10)
    assert lists(recs) == {1: [3, 1, 5]}
    assert recs["rank"].to_list() == [1, 2, 3]


def test_popular_recommends_each_requested_user_once():
    recs = recommend_recent_popular(ITEMS, HISTORY, pl.Series([3, 3]), 2)
    assert lists(recs) == {3: [2, 3]}


def test_item_knn_sums_neighbour_scores_and_fills_from_recent_popularity():
    recs = recommend_item_knn(NEIGHBOURS, HISTORY, [1, 2, 3], 3, recent_items=20, item_features=ITEMS)
    # User 1: item 5 scores 0.2 + 0.4, item 3 scores 0.5; then popular item 1.
    # User 2: neighbour 2 of item 1, then popular 3 and 4 (1 and 2 already used).
    # User 3 (cold): recent popularity only.
    assert lists(recs) == {1: [5, 3, 1], 2: [2, 3, 4], 3: [2, 3, 1]}


def test_item_knn_without_item_features_returns_only_neighbours():
    recs = recommend_item_knn(NEIGHBOURS, HISTORY, [1, 2, 3], 3, recent_items=20, item_features=None)
    assert lists(recs) == {1: [5, 3], 2: [2]}


def test_item_knn_uses_only_the_most_recent_items():
    recs = recommend_item_knn(NEIGHBOURS, HISTORY, [1], 3, recent_items=1, item_features=None)
    # Item 4 (1 day ago) is more recent than item 2 (3 days ago): only its neighbour 5.
    assert lists(recs) == {1: [5]}


def test_item_knn_breaks_recency_ties_by_more_events():
    history = HISTORY.with_columns(pl.lit(1.0).alias("days_since_last_event"))
    recs = recommend_item_knn(NEIGHBOURS, history, [1], 3, recent_items=1, item_features=None)
    assert lists(recs) == {1: [5]}  # item 4 has 2 events, item 2 only 1


def test_item_knn_excludes_consumed_neighbours_unless_told_not_to():
    neighbours = NEIGHBOURS.vstack(pl.DataFrame({"item_id": [4], "neighbour_id": [2], "score": [9.0], "rank": [2]}))
    assert lists(recommend_item_knn(neighbours, HISTORY, [1], 3, recent_items=20, item_features=None)) == {1: [5, 3]}
    kept = recommend_item_knn(neighbours, HISTORY, [1], 3, recent_items=20, item_features=None, exclude_consumed=False)
    assert lists(kept) == {1: [2, 5, 3]}


def test_item_knn_breaks_score_ties_by_item_id():
    neighbours = pl.DataFrame({"item_id": [4, 4], "neighbour_id": [9, 7], "score": [0.3, 0.3], "rank": [1, 2]})
    assert lists(recommend_item_knn(neighbours, HISTORY, [1], 2, recent_items=20, item_features=None)) == {1: [7, 9]}


def test_baselines_do_not_depend_on_input_row_order():
    shuffled = {
        "items": ITEMS.reverse(),
        "history": HISTORY.reverse(),
        "neighbours": NEIGHBOURS.reverse(),
    }
    assert recommend_item_knn(
        shuffled["neighbours"], shuffled["history"], [3, 2, 1], 3, recent_items=20, item_features=shuffled["items"]
    ).equals(recommend_item_knn(NEIGHBOURS, HISTORY, [1, 2, 3], 3, recent_items=20, item_features=ITEMS))
    assert recommend_recent_popular(shuffled["items"], shuffled["history"], [3, 1], 4).equals(
        recommend_recent_popular(ITEMS, HISTORY, [1, 3], 4)
    )


def test_baselines_return_rows_sorted_by_user_then_rank():
    users = [3, 1, 2]
    for recs in (
        recommend_recent_popular(ITEMS, HISTORY, users, 3),
        recommend_item_knn(NEIGHBOURS, HISTORY, users, 3, recent_items=20, item_features=ITEMS),
    ):
        assert recs.equals(recs.sort("user_id", "rank"))


def test_baselines_refuse_frames_holding_several_snapshots():
    two_weeks = pl.concat(
        [
            ITEMS.with_columns(as_of=pl.date(2024, 1, 1)),
            ITEMS.with_columns(as_of=pl.date(2024, 1, 8)),
        ]
    )
    with pytest.raises(ValueError, match="item_features: holds 2 as_of snapshots"):
        recommend_recent_popular(two_weeks, HISTORY, [1], 3)


def test_baselines_refuse_nonpositive_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        recommend_all_time_popular(ITEMS, HISTORY, [1], 0)


def test_baselines_leave_their_inputs_unchanged():
    before = (ITEMS.clone(), HISTORY.clone(), NEIGHBOURS.clone())
    recommend_item_knn(NEIGHBOURS, HISTORY, [1, 2, 3], 3, recent_items=20, item_features=ITEMS)
    assert all(a.equals(b) for a, b in zip(before, (ITEMS, HISTORY, NEIGHBOURS), strict=True))


def reference_recs(items, history, neighbours, users, k, recent_items, use_knn):
    """Per-user loops straight from the definitions."""
    popular = sorted(items, key=lambda i: (-items[i], i))
    result = {}
    for user in users:
        mine = {item: stats for (u, item), stats in history.items() if u == user}
        picked = []
        if use_knn:
            recent = sorted(mine, key=lambda i: (mine[i][0], -mine[i][1], i))[:recent_items]
            scores: dict[int, float] = {}
            for item in recent:
                for (source, neighbour), score in neighbours.items():
                    if source == item:
                        scores[neighbour] = scores.get(neighbour, 0.0) + score
            allowed = [i for i in scores if i not in mine]
            picked = sorted(allowed, key=lambda i: (-round(scores[i], 9), i))[:k]
        picked += [i for i in popular if i not in mine and i not in picked]
        if picked[:k]:
            result[user] = picked[:k]
    return result


ids = st.integers(0, 7)


@settings(max_examples=40, deadline=None)
@given(
    plays=st.dictionaries(ids, st.integers(0, 3), min_size=1),
    history=st.dictionaries(st.tuples(st.integers(0, 3), ids), st.tuples(st.integers(0, 2), st.integers(1, 2))),
    neighbours=st.dictionaries(st.tuples(ids, ids), st.sampled_from([0.1, 0.25, 0.5])),
    k=st.integers(1, 4),
    recent_items=st.integers(1, 3),
    use_knn=st.booleans(),
)
def test_baselines_match_a_per_user_reference(plays, history, neighbours, k, recent_items, use_knn):
    items = pl.DataFrame(
        {"item_id": list(plays), "plays_4w": list(plays.values())},
        schema={"item_id": pl.Int64, "plays_4w": pl.Int64},
    )
    history_frame = pl.DataFrame(
        [(u, i, events, float(days)) for (u, i), (days, events) in history.items()],
        schema=["user_id", "item_id", "events", "days_since_last_event"],
        orient="row",
    )
    neighbour_frame = pl.DataFrame(
        [(i, n, score) for (i, n), score in neighbours.items()],
        schema={"item_id": pl.Int64, "neighbour_id": pl.Int64, "score": pl.Float64},
        orient="row",
    )
    users = [0, 1, 2, 3]
    if use_knn:
        recs = recommend_item_knn(neighbour_frame, history_frame, users, k, recent_items, item_features=items)
    else:
        recs = recommend_recent_popular(items, history_frame, users, k)
    expected = reference_recs(plays, history, neighbours, users, k, recent_items, use_knn)
    assert lists(recs) == expected


def test_ease_is_not_fitted_above_its_catalogue_bound_and_says_why(caplog):
    small = CollaborativeConfig(ease_max_items=2, als_factors=2, als_iterations=2)
    with caplog.at_level("WARNING"):
        fitted = fit_collaborative(HISTORY, small)
    assert set(fitted) == {"als"}
    assert "ease skipped: the history holds 3 items, above RECSYS_EASE_MAX_ITEMS=2" in caplog.text
    assert set(fit_collaborative(HISTORY, CollaborativeConfig(als_factors=2, als_iterations=2))) == {"ease", "als"}
    with pytest.raises(ValueError, match="was not fitted"):
        recommend("ease", TABLES, [1], 3, CandidateConfig(), fitted)
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        recommend("svd", TABLES, [1], 3, CandidateConfig(), fitted)


@pytest.mark.parametrize("name", ["ease", "als"])
def test_collaborative_baselines_skip_consumed_items_and_fill_cold_users_with_recent_popularity(name):
    fitted = fit_collaborative(HISTORY, CollaborativeConfig(als_factors=2, als_iterations=2))
    recs = lists(recommend(name, TABLES, [1, 2, 3], 3, CandidateConfig(), fitted))
    assert recs[3] == [2, 3, 1]  # cold: recent popularity
    assert not {2, 4} & set(recs[1]) and 1 not in recs[2]
    assert all(len(items) == 3 == len(set(items)) for items in recs.values())
