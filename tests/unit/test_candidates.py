import math
from dataclasses import replace
from datetime import date

import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from features import contracts
from ranking.candidates import (
    FEATURE_NAMES,
    PRIOR_FEATURE,
    PRIOR_WEIGHT,
    SOURCES,
    CandidateConfig,
    SnapshotTables,
    build_ranking_frame,
    category_encoding,
    generate_candidates,
    neighbour_scores,
)

AS_OF = date(2024, 3, 4)
CONFIG = CandidateConfig(cooc=10, pop=3, category=10, creator=10, new=2)


def conform(contract: contracts.TableContract, columns: dict, defaults: dict | None = None) -> pl.DataFrame:
    """A contract table from the given columns; the other numeric columns get `defaults` or 0."""
    n = len(next(iter(columns.values())))
    filled = {"as_of": [AS_OF] * n}
    for column in contract.columns:
        if column.name not in columns and column.name != "as_of":
            filled[column.name] = [(defaults or {}).get(column.name, 0)] * n
    return contract.conform(pl.DataFrame(filled | columns))


# User 1: EASE ranks items 2, 7; ALS ranks items 6, 2; user 2: both rank item 3 only.
COLLABORATIVE = {
    "user_id": [1, 1, 1, 2],
    "item_id": [2, 6, 7, 3],
    "ease_score": [0.8, None, 0.3, 0.2],
    "ease_rank": [1, None, 2, 1],
    "als_score": [0.5, 0.9, None, 0.1],
    "als_rank": [2, 1, None, 1],
}
# Items 1, 4 and 5 have 90 (decayed) transitions out, item 2 has 10: shrunk by the prior of 10
# transitions, their shares count 0.9 and 0.5 times.
TRANSITIONS = {
    "item_id": [1, 1, 1, 2, 4, 5],
    "next_item_id": [2, 3, 4, 6, 5, 7],
    "score": [45.0, 27.0, 18.0, 10.0, 90.0, 90.0],
    "share": [0.5, 0.3, 0.2, 1.0, 1.0, 1.0],
    "rank": [1, 2, 3, 1, 1, 1],
}


def snapshot(
    neighbours: dict | None = None,
    history: dict | None = None,
    collaborative: dict | None = None,
    transitions: dict | None = None,
) -> SnapshotTables:
    """Eight items; user 1 consumed items 1 (yesterday) and 4, user 2 item 5; user 3 is cold."""
    plays_4w = [20, 10, 8, 15, 30, 5, 25, 1]
    items = conform(
        contracts.ITEM_FEATURES,
        {
            "item_id": list(range(1, 9)),
            "category": ["rock", "rock", "rock", "jazz", "jazz", "pop", "pop", "rock"],
            "creator": ["a", "a", "b", "c", "c", "d", "d", "b"],
            "plays_1w": [5, 1, 0, 2, 9, 0, 3, 0],
            "plays_4w": plays_4w,
            "plays_total": [3 * p for p in plays_4w],
            "days_since_release": [400.0, 300.0, 10.0, 500.0, 20.0, 5.0, 600.0, 2.0],
            "popularity_rank_4w": [3, 5, 6, 4, 1, 7, 2, 8],
        },
        {"trend_1w_vs_4w": 1.0},
    )
    return SnapshotTables(
        user_features=conform(contracts.USER_FEATURES, {"user_id": [1, 2], "events_total": [2, 1]}),
        item_features=items,
        item_neighbours=conform(
            contracts.ITEM_NEIGHBOURS,
            neighbours
            or {
                "item_id": [1, 1, 1, 4, 4, 5],
                "neighbour_id": [2, 3, 4, 3, 5, 4],
                "score": [0.9, 0.5, 0.4, 0.5, 0.3, 0.8],
                "rank": [1, 2, 3, 1, 2, 1],
            },
        ),
        user_category_affinity=conform(
            contracts.USER_CATEGORY_AFFINITY,
            {"user_id": [1, 1, 2], "category": ["rock", "jazz", "jazz"], "share_12w": [0.6, 0.4, 1.0]},
        ),
        user_creator_affinity=conform(
            contracts.USER_CREATOR_AFFINITY,
            {"user_id": [1, 1, 2], "creator": ["a", "c", "c"], "share_12w": [0.5, 0.5, 1.0]},
        ),
        user_item_history=conform(
            contracts.USER_ITEM_HISTORY,
            history or {"user_id": [1, 1, 2], "item_id": [1, 4, 5], "days_since_last_event": [1.0, 10.0, 3.0]},
            {"events": 1},
        ),
        collaborative_scores=contracts.COLLABORATIVE_SCORES.conform(
            pl.DataFrame({"as_of": [AS_OF] * len((collaborative or COLLABORATIVE)["user_id"])}).with_columns(
                pl.DataFrame(collaborative or COLLABORATIVE)
            )
        ),
        item_transitions=conform(contracts.ITEM_TRANSITIONS, transitions or TRANSITIONS, {"transitions": 1}),
    )


def ranked(candidates: pl.DataFrame, user: int, source: str) -> list[int]:
    """The user's items proposed by `source`, best rank first."""
    column = f"{source}_rank"
    rows = candidates.filter(pl.col("user_id") == user, pl.col(column).is_not_null()).sort(column)
    assert rows[column].to_list() == list(range(1, rows.height + 1)), "ranks must be 1..n without gaps"
    return rows["item_id"].to_list()


def test_cooc_sums_neighbour_scores_of_recent_items_and_counts_them():
    candidates = generate_candidates(snapshot(), pl.Series([1]), CONFIG)
    # Item 3 neighbours both recent items (0.5 + 0.5); item 4 is a neighbour but consumed.
    assert ranked(candidates, 1, "cooc") == [3, 2, 5]
    row = candidates.filter(item_id=3).row(0, named=True)
    assert row["cooc_score"] == pytest.approx(1.0) and row["cooc_count"] == 2


def test_every_candidate_gets_its_cooc_scores_beyond_the_cooc_sources_cut():
    # cooc gives one candidate (item 3); items 2 and 5 are neighbours too and come from other sources.
    candidates = generate_candidates(snapshot(), pl.Series([1]), replace(CONFIG, cooc=1))
    assert ranked(candidates, 1, "cooc") == [3]
    beyond = candidates.filter(pl.col("item_id").is_in([2, 5]))
    assert beyond.height == 2 and beyond["cooc_rank"].is_null().all()
    assert (beyond["cooc_score"] > 0).all() and (beyond["cooc_count"] >= 1).all()
    assert candidates.filter(item_id=7)["cooc_score"].is_null().all()  # no neighbour of a recent item


def test_pop_takes_the_most_popular_items_the_user_has_not_consumed():
    candidates = generate_candidates(snapshot(), pl.Series([1, 2]), CONFIG)
    assert ranked(candidates, 1, "pop") == [5, 7, 2]
    assert ranked(candidates, 2, "pop") == [7, 1, 4]


def test_new_takes_recent_releases_by_last_week_plays_ties_by_item_id():
    candidates = generate_candidates(snapshot(), pl.Series([1, 2]), CONFIG)
    assert ranked(candidates, 1, "new") == [5, 3]
    assert ranked(candidates, 2, "new") == [3, 6]


def test_category_and_creator_weigh_popular_items_by_the_users_share():
    candidates = generate_candidates(snapshot(), pl.Series([1]), CONFIG)
    # rock 0.6 × ln(plays_4w + 1) for items 2, 3, 8; jazz 0.4 × ln(31) for item 5.
    assert ranked(candidates, 1, "category") == [2, 5, 3, 8]
    assert ranked(candidates, 1, "creator") == [5, 2]


def test_consumed_items_are_never_candidates_unless_exclusion_is_off():
    tables = snapshot()
    candidates = generate_candidates(tables, pl.Series([1, 2]), CONFIG)
    consumed = tables.user_item_history.select("user_id", "item_id")
    assert candidates.join(consumed, on=["user_id", "item_id"]).is_empty()

    kept = generate_candidates(tables, pl.Series([1]), CandidateConfig(pop=3, exclude_consumed=False))
    assert ranked(kept, 1, "pop") == [5, 7, 1]


def test_a_cold_user_gets_only_global_candidates_and_null_user_features():
    tables = snapshot()
    candidates = generate_candidates(tables, pl.Series([3]), CONFIG)
    assert ranked(candidates, 3, "pop") == [5, 7, 1] and ranked(candidates, 3, "new") == [5, 3]
    assert candidates.select(pl.col("cooc_rank", "category_rank", "creator_rank").is_null().all()).row(0) == (
        True,
        True,
        True,
    )
    frame = build_ranking_frame(tables, pl.Series([3]), CONFIG, category_encoding(tables.item_features))
    assert frame.height == candidates.height and frame["user_events_total"].is_null().all()


def test_no_users_give_an_empty_frame_with_every_feature():
    tables = snapshot()
    frame = build_ranking_frame(tables, pl.Series([], dtype=pl.Int64), CONFIG, category_encoding(tables.item_features))
    assert frame.is_empty() and frame.columns == ["user_id", "item_id", *FEATURE_NAMES]


def test_each_candidate_appears_once_tagged_with_every_source_that_proposed_it():
    candidates = generate_candidates(snapshot(), pl.Series([1, 2, 3]), CONFIG)
    assert candidates.select("user_id", "item_id").is_duplicated().sum() == 0
    item5 = candidates.filter(user_id=1, item_id=5).row(0, named=True)
    assert {s for s in SOURCES if item5[f"{s}_rank"] is not None} == {
        "cooc", "pop", "category", "creator", "new", "seq"
    }  # fmt: skip
    assert item5["n_sources"] == 6
    ranks = pl.sum_horizontal(pl.col(f"{s}_rank").is_not_null() for s in SOURCES)
    assert (candidates.select(ranks == pl.col("n_sources")).to_series()).all()


def test_ties_break_by_item_id_and_input_order_does_not_matter():
    neighbours = {"item_id": [1, 1, 1], "neighbour_id": [7, 3, 6], "score": [0.5, 0.5, 0.5], "rank": [1, 2, 3]}
    tables = snapshot(neighbours=neighbours)
    first = generate_candidates(tables, pl.Series([1]), CONFIG)
    assert ranked(first, 1, "cooc") == [3, 6, 7]

    shuffled = SnapshotTables(
        **{
            name: getattr(tables, name).sample(fraction=1.0, shuffle=True, seed=3)
            for name in tables.__dataclass_fields__
            if getattr(tables, name) is not None
        }
    )
    assert generate_candidates(shuffled, pl.Series([1]), CONFIG).equals(first)


def test_ranking_frame_has_every_feature_and_encodes_categories_by_position():
    tables = snapshot()
    categories = ["jazz", "rock"]  # "pop" unknown to this encoding: null code
    frame = build_ranking_frame(tables, pl.Series([1]), CONFIG, categories)
    assert frame.columns == ["user_id", "item_id", *FEATURE_NAMES]
    codes = dict(zip(frame["item_id"], frame["category_code"], strict=True))
    assert codes[2] == 1 and codes[5] == 0 and codes[7] is None
    shares = dict(zip(frame["item_id"], frame["category_share_12w"], strict=True))
    assert shares[2] == pytest.approx(0.6) and shares[7] == 0.0
    best = frame.filter(pl.col("cooc_score").is_not_null())
    assert best["cooc_score_vs_best"].max() == pytest.approx(1.0)


def test_popularity_vs_user_compares_an_item_with_what_the_user_consumed():
    tables = snapshot()
    frame = build_ranking_frame(tables, pl.Series([2]), CONFIG, category_encoding(tables.item_features))
    # User 2 consumed only item 5, the most played ever (rank 1): log(1) = 0.
    row = frame.filter(item_id=7).row(0, named=True)
    assert row["popularity_vs_user"] == pytest.approx(math.log(2))


def test_popularity_prior_orders_candidates_like_recent_popularity():
    tables = snapshot()
    frame = build_ranking_frame(tables, pl.Series([3]), CONFIG, category_encoding(tables.item_features))
    plays = dict(zip(tables.item_features["item_id"], tables.item_features["plays_4w"], strict=True))
    priors = dict(zip(frame["item_id"], frame[PRIOR_FEATURE], strict=True))
    assert all(priors[i] == pytest.approx(PRIOR_WEIGHT * math.log1p(plays[i])) for i in priors)
    by_prior = frame.sort(PRIOR_FEATURE, descending=True)["item_id"].to_list()
    assert by_prior == frame.sort("item_popularity_rank_4w")["item_id"].to_list()


def test_category_encoding_is_the_sorted_distinct_categories():
    assert category_encoding(snapshot().item_features) == ["jazz", "pop", "rock"]


def test_cf_takes_the_items_best_ranked_by_ease_or_als_ties_by_item_id():
    candidates = generate_candidates(snapshot(), pl.Series([1, 2, 3]), CONFIG)
    # Best rank of each item: 2 -> 1 (EASE), 6 -> 1 (ALS), 7 -> 2 (EASE).
    assert ranked(candidates, 1, "cf") == [2, 6, 7]
    assert ranked(candidates, 2, "cf") == [3]
    assert ranked(candidates, 3, "cf") == []
    assert ranked(generate_candidates(snapshot(), pl.Series([1]), replace(CONFIG, cf=2)), 1, "cf") == [2, 6]


def test_cf_never_proposes_a_consumed_item():
    # A table built with repeats allowed could hold a consumed item: user 1 consumed item 4.
    scores = {k: [*v, v[0]] for k, v in COLLABORATIVE.items()} | {"item_id": [2, 6, 7, 3, 4]}
    candidates = generate_candidates(snapshot(collaborative=scores), pl.Series([1]), CONFIG)
    assert 4 not in ranked(candidates, 1, "cf")


def test_collaborative_features_are_scores_and_ranks_within_the_candidates_null_when_unscored():
    tables = snapshot()
    frame = build_ranking_frame(tables, pl.Series([1, 2]), CONFIG, category_encoding(tables.item_features))
    rows = {(r["user_id"], r["item_id"]): r for r in frame.iter_rows(named=True)}
    columns = ("ease_score", "ease_candidate_rank", "als_score", "als_candidate_rank")
    assert [rows[1, i][c] for i in (2, 6, 7) for c in columns] == [
        0.8, 1, 0.5, 2,
        None, None, 0.9, 1,
        0.3, 2, None, None,
    ]  # fmt: skip
    assert [rows[2, 3][c] for c in columns] == [0.2, 1, 0.1, 1]
    # Relative to the user's best-scored candidate of that model.
    assert [rows[1, i]["ease_score_vs_best"] for i in (2, 6, 7)] == [1.0, None, pytest.approx(0.3 / 0.8)]
    assert [rows[1, i]["als_score_vs_best"] for i in (2, 6, 7)] == [pytest.approx(0.5 / 0.9), 1.0, None]
    columns += ("ease_score_vs_best", "als_score_vs_best")
    # Every other candidate is unscored by both models: null, not 0 (LightGBM reads it as missing).
    scored = tables.collaborative_scores.select("user_id", "item_id")
    unscored = frame.join(scored, on=["user_id", "item_id"], how="anti")
    assert unscored.height > 0
    assert unscored.select(pl.col(*columns).is_null().all()).row(0) == (True,) * 6


def test_score_vs_best_is_null_when_a_users_best_score_is_not_positive():
    scores = COLLABORATIVE | {"als_score": [-0.5, -0.1, None, 0.0]}
    tables = snapshot(collaborative=scores)
    frame = build_ranking_frame(tables, pl.Series([1, 2]), CONFIG, category_encoding(tables.item_features))
    assert frame["als_score_vs_best"].is_null().all()
    assert frame["als_candidate_rank"].drop_nulls().to_list() != []  # the scores themselves still rank


def test_seq_follows_the_transitions_out_of_the_last_items_and_two_steps_from_the_last():
    candidates = generate_candidates(snapshot(), pl.Series([1]), CONFIG)
    # Last items: 1 (position 1), 4 (position 2); shrunk shares out of 1: 2 0.45, 3 0.27, 4 0.18 (consumed);
    # out of 4: 5 0.9, halved at position 2. Two steps from 1: 1 -> 2 -> 6 (0.45 x 0.5), 1 -> 4 -> 5 (0.18 x 0.9).
    assert ranked(candidates, 1, "seq") == [5, 2, 3, 6]
    scores = {r["item_id"]: r for r in candidates.iter_rows(named=True)}
    assert (scores[2]["seq_score"], scores[2]["seq_last_share"], scores[2]["seq_2step_share"]) == pytest.approx(
        (0.45, 0.45, 0.0)
    )
    assert (scores[5]["seq_score"], scores[5]["seq_last_share"], scores[5]["seq_2step_share"]) == pytest.approx(
        (0.45, 0.0, 0.162)
    )
    assert (scores[6]["seq_score"], scores[6]["seq_2step_share"]) == pytest.approx((0.0, 0.225))


def test_seq_keeps_only_paths_scoring_at_least_the_minimum():
    strict = generate_candidates(snapshot(), pl.Series([1]), CandidateConfig(seq=10, seq_min_score=0.3))
    assert ranked(strict, 1, "seq") == [5, 2]  # 3 (0.27) and 6 (0.225) are too weak


def test_an_item_with_few_transitions_weighs_less_than_one_with_many_at_the_same_share():
    few = dict(TRANSITIONS, score=[x / 30 for x in TRANSITIONS["score"]])  # 3 transitions out of 1, not 90
    candidates = generate_candidates(snapshot(transitions=few), pl.Series([1]), CONFIG)
    item2 = candidates.filter(user_id=1, item_id=2).row(0, named=True)
    assert item2["seq_last_share"] == pytest.approx(1.5 / 13)  # 0.5 x 3 / (3 + 10)


def test_candidates_of_other_sources_get_sequence_scores_zero_without_a_path():
    candidates = generate_candidates(snapshot(), pl.Series([1, 3]), CONFIG)
    # Item 7 follows item 5, which is no last item of user 1; user 3 has no history at all.
    item7 = candidates.filter(user_id=1, item_id=7).row(0, named=True)
    assert item7["seq_rank"] is None and item7["seq_score"] == 0.0 and item7["seq_2step_share"] == 0.0
    cold = candidates.filter(user_id=3)
    assert cold["seq_rank"].is_null().all() and (cold["seq_score"] == 0).all()


def test_without_a_transitions_table_there_are_no_seq_candidates_and_every_feature_is_there():
    tables = snapshot()
    without = SnapshotTables(**(vars(tables) | {"item_transitions": None}))
    frame = build_ranking_frame(without, pl.Series([1]), CONFIG, category_encoding(tables.item_features))
    assert frame.columns == ["user_id", "item_id", *FEATURE_NAMES]
    assert frame["seq_rank"].is_null().all() and (frame["seq_score"] == 0).all()


def test_last_item_features_compare_the_candidate_with_the_users_last_items():
    tables = snapshot()
    frame = build_ranking_frame(tables, pl.Series([1]), CONFIG, category_encoding(tables.item_features))
    rows = {r["item_id"]: r for r in frame.iter_rows(named=True)}
    # The last item, 1, is rock by creator a; the one before, 4, jazz by c: one of five slots each.
    assert rows[2]["same_creator_as_last"] == 1 and rows[2]["same_category_as_last"] == 1
    assert rows[5]["same_creator_as_last"] == 0 and rows[5]["same_category_as_last"] == 0
    assert rows[2]["last_items_creator_share"] == pytest.approx(0.2)
    assert rows[5]["last_items_creator_share"] == pytest.approx(0.2)
    assert rows[7]["last_items_creator_share"] == 0.0


def neighbour_scores_by_group_by(recent: pl.DataFrame, neighbours: pl.DataFrame) -> pl.DataFrame:
    """`neighbour_scores` written plainly: every (user, recent item, neighbour) triple, summed per pair."""
    return (
        recent.join(neighbours, on="item_id")
        .group_by("user_id", "neighbour_id")
        .agg(pl.col("score").sum().round(9).alias("cooc_score"), pl.len().cast(pl.Int64).alias("cooc_count"))
        .rename({"neighbour_id": "item_id"})
        .sort("user_id", "item_id")
    )


@hyp_settings(max_examples=150, deadline=None)
@given(
    recent=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 25)), max_size=40, unique=True),
    links=st.lists(st.tuples(st.integers(1, 25), st.integers(1, 25)), max_size=80, unique=True),
    scores=st.lists(st.sampled_from([0.1, 0.25, 1 / 3, 0.5, 0.9]), min_size=80, max_size=80),
)
def test_neighbour_scores_sum_every_recent_items_neighbour_as_a_plain_group_by(recent, links, scores):
    recent_frame = pl.DataFrame(recent, schema={"user_id": pl.Int64, "item_id": pl.Int64}, orient="row")
    neighbours = pl.DataFrame(
        {"item_id": [a for a, _ in links], "neighbour_id": [b for _, b in links], "score": scores[: len(links)]},
        schema={"item_id": pl.Int64, "neighbour_id": pl.Int64, "score": pl.Float64},
    )
    got = neighbour_scores(recent_frame, neighbours).sort("user_id", "item_id")
    expected = neighbour_scores_by_group_by(recent_frame, neighbours)
    assert got.select("user_id", "item_id", "cooc_count").equals(expected.select("user_id", "item_id", "cooc_count"))
    assert got.get_column("cooc_score").to_list() == pytest.approx(expected.get_column("cooc_score").to_list())
