import math

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking.metrics import combine_weeks, evaluation_truth, per_user_ndcg, rank_metrics

METRICS = ("recall@3", "ndcg@3", "hitrate@3", "map@3")


def recs_of(lists: dict[int, list[int]]) -> pl.DataFrame:
    rows = [(u, item, r) for u, items in lists.items() for r, item in enumerate(items, start=1)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "rank"], orient="row")


def truth_of(sets: dict[int, list[int]]) -> pl.DataFrame:
    rows = [(u, item) for u, items in sets.items() for item in items]
    return pl.DataFrame(rows, schema=["user_id", "item_id"], orient="row")


def test_perfect_ranking_scores_one_on_every_metric():
    truth = {1: [10, 11], 2: [20], 3: [30, 31, 32]}
    result = rank_metrics(recs_of(truth), truth_of(truth), k=3, n_catalogue=6)
    assert {m: result[m] for m in METRICS} == pytest.approx(dict.fromkeys(METRICS, 1.0))
    assert result["coverage@3"] == pytest.approx(1.0)
    assert result["users"] == 3


def test_no_hits_scores_zero_on_every_ranking_metric():
    result = rank_metrics(recs_of({1: [1, 2, 3]}), truth_of({1: [9]}), k=3, n_catalogue=10)
    assert {m: result[m] for m in METRICS} == dict.fromkeys(METRICS, 0.0)
    assert result["coverage@3"] == pytest.approx(0.3)


def test_recall_divides_hits_by_all_truth_items_even_beyond_k():
    result = rank_metrics(recs_of({1: [1, 2]}), truth_of({1: [1, 2, 3, 4]}), k=2, n_catalogue=9)
    assert result["recall@2"] == pytest.approx(2 / 4)
    # NDCG and MAP normalise by the best achievable with k slots, so this list is ideal.
    assert result["ndcg@2"] == pytest.approx(1.0)
    assert result["map@2"] == pytest.approx(1.0)


def test_ndcg_discounts_a_hit_at_position_two():
    result = rank_metrics(recs_of({1: [5, 6, 7]}), truth_of({1: [6]}), k=3, n_catalogue=9)
    assert result["ndcg@3"] == pytest.approx(1 / math.log2(3))


def test_ndcg_ideal_dcg_counts_min_of_truth_and_k():
    result = rank_metrics(recs_of({1: [5, 6, 7]}), truth_of({1: [5, 8]}), k=3, n_catalogue=9)
    assert result["ndcg@3"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_map_averages_precision_at_each_hit_over_min_of_truth_and_k():
    result = rank_metrics(recs_of({1: [5, 6, 7]}), truth_of({1: [5, 7, 8]}), k=3, n_catalogue=9)
    assert result["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 3)


def test_hitrate_is_the_share_of_users_with_any_hit():
    recs = recs_of({1: [1, 2, 3], 2: [1, 2, 3]})
    result = rank_metrics(recs, truth_of({1: [3], 2: [4]}), k=3, n_catalogue=9)
    assert result["hitrate@3"] == pytest.approx(0.5)


def test_items_ranked_below_k_do_not_count():
    result = rank_metrics(recs_of({1: [1, 2, 3, 4]}), truth_of({1: [4]}), k=3, n_catalogue=9)
    assert result["recall@3"] == 0.0
    assert result["coverage@3"] == pytest.approx(3 / 9)


def test_user_in_truth_without_recs_scores_zero_in_the_average():
    result = rank_metrics(recs_of({1: [1]}), truth_of({1: [1], 2: [2]}), k=3, n_catalogue=9)
    assert result["recall@3"] == pytest.approx(0.5)
    assert result["users"] == 2


def test_recs_for_users_outside_truth_are_ignored_including_coverage():
    recs = recs_of({1: [1], 7: [2, 3, 4]})
    result = rank_metrics(recs, truth_of({1: [1]}), k=3, n_catalogue=10)
    assert result["recall@3"] == 1.0
    assert result["coverage@3"] == pytest.approx(0.1)
    assert result["users"] == 1


def test_top_k_is_the_rows_ranked_at_most_k_even_with_gaps_in_ranks():
    recs = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [5, 6, 7], "rank": [1, 5, 20]})
    result = rank_metrics(recs, truth_of({1: [7]}), k=10, n_catalogue=10)
    assert result["recall@10"] == 0.0
    assert result["coverage@10"] == pytest.approx(0.2)


def test_tied_ranks_are_broken_by_item_id():
    recs = pl.DataFrame({"user_id": [1, 1], "item_id": [9, 4], "rank": [1, 1]})
    result = rank_metrics(recs, truth_of({1: [9]}), k=1, n_catalogue=10)
    assert result["hitrate@1"] == 0.0


def test_a_repeated_item_counts_once_at_its_best_rank():
    recs = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [5, 5, 6], "rank": [1, 3, 2]})
    result = rank_metrics(recs, truth_of({1: [5, 6]}), k=2, n_catalogue=10)
    assert result["recall@2"] == 1.0
    assert result["ndcg@2"] == pytest.approx(1.0)


def test_empty_recs_score_zero_for_every_evaluated_user():
    result = rank_metrics(recs_of({}), truth_of({1: [1], 2: [2]}), k=3, n_catalogue=10)
    assert {m: result[m] for m in METRICS} == dict.fromkeys(METRICS, 0.0)
    assert result["coverage@3"] == 0.0
    assert result["users"] == 2


def test_empty_truth_gives_zeros_and_no_users():
    result = rank_metrics(recs_of({1: [1]}), truth_of({}), k=3, n_catalogue=10)
    assert result == {**dict.fromkeys(METRICS, 0.0), "coverage@3": 0.0, "users": 0}


@pytest.mark.parametrize(("k", "n_catalogue"), [(0, 10), (3, 0)])
def test_rank_metrics_refuses_nonpositive_k_or_catalogue(k, n_catalogue):
    with pytest.raises(ValueError, match="must be >= 1"):
        rank_metrics(recs_of({1: [1]}), truth_of({1: [1]}), k=k, n_catalogue=n_catalogue)


def test_rank_metrics_names_missing_columns():
    with pytest.raises(ValueError, match=r"recs: missing columns \['rank'\]"):
        rank_metrics(truth_of({1: [1]}), truth_of({1: [1]}), k=3, n_catalogue=10)


def reference_metrics(recs: dict[int, list[int]], truth: dict[int, set[int]], k: int) -> dict:
    """Per-user loop straight from the textbook definitions."""
    totals = dict.fromkeys(("recall", "ndcg", "hitrate", "map"), 0.0)
    for user, relevant in truth.items():
        top = list(dict.fromkeys(recs.get(user, [])))[:k]
        hits = [i for i, item in enumerate(top, start=1) if item in relevant]
        best = min(len(relevant), k)
        totals["recall"] += len(hits) / len(relevant)
        totals["hitrate"] += 1.0 if hits else 0.0
        totals["ndcg"] += sum(1 / math.log2(p + 1) for p in hits) / sum(
            1 / math.log2(p + 1) for p in range(1, best + 1)
        )
        totals["map"] += sum(n / p for n, p in enumerate(hits, start=1)) / best
    return {f"{m}@{k}": v / len(truth) for m, v in totals.items()}


@settings(max_examples=40, deadline=None)
@given(
    recs=st.dictionaries(st.integers(0, 4), st.lists(st.integers(0, 9), max_size=6, unique=True)),
    truth=st.dictionaries(st.integers(0, 4), st.sets(st.integers(0, 9), min_size=1, max_size=5), min_size=1),
    k=st.integers(1, 5),
)
def test_rank_metrics_match_a_per_user_reference(recs, truth, k):
    result = rank_metrics(recs_of(recs), truth_of({u: sorted(s) for u, s in truth.items()}), k=k, n_catalogue=10)
    expected = reference_metrics(recs, truth, k)
    assert {m: result[m] for m in expected} == pytest.approx(expected)


def test_evaluation_truth_keeps_new_items_of_users_with_earlier_events():
    labels = pl.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "item_id": [10, 11, 20, 30],
            "events": [1, 1, 1, 1],
            "weight": [1.0] * 4,
            "is_new": [True, False, True, True],
        }
    )
    truth = evaluation_truth(labels, pl.Series("user_id", [1, 3, 9]))
    assert truth.rows() == [(1, 10), (3, 30)]
    assert evaluation_truth(labels, pl.DataFrame({"user_id": [2]})).rows() == [(2, 20)]


def test_combine_weeks_weights_each_week_by_its_users():
    weeks = [
        {"recall@10": 1.0, "coverage@10": 0.2, "users": 1},
        {"recall@10": 0.0, "coverage@10": 0.6, "users": 3},
        {"recall@10": 0.0, "coverage@10": 0.0, "users": 0},
    ]
    assert combine_weeks(weeks) == pytest.approx({"recall@10": 0.25, "coverage@10": 0.5, "users": 4})


def test_combine_weeks_without_users_gives_zeros():
    assert combine_weeks([{"recall@10": 0.0, "users": 0}]) == {"recall@10": 0.0, "users": 0}


def test_combine_weeks_refuses_no_weeks_and_mismatched_keys():
    with pytest.raises(ValueError, match="no weekly results"):
        combine_weeks([])
    with pytest.raises(ValueError, match="same metric keys"):
        combine_weeks([{"recall@10": 1.0, "users": 1}, {"ndcg@10": 1.0, "users": 1}])


def test_per_user_ndcg_averages_to_rank_metrics_ndcg():
    recs = recs_of({1: [5, 6, 7, 6], 2: [1, 2, 3], 3: [9, 8], 9: [1]})
    truth = truth_of({1: [6, 8], 2: [3], 3: [4], 4: [1]})
    per_user = per_user_ndcg(recs, truth, 3)
    assert per_user["user_id"].to_list() == [1, 2, 3, 4]
    assert per_user["ndcg"].mean() == pytest.approx(rank_metrics(recs, truth, k=3, n_catalogue=10)["ndcg@3"])


def test_per_user_ndcg_scores_a_perfect_list_one_and_a_user_without_recommendations_zero():
    per_user = per_user_ndcg(recs_of({1: [4, 5]}), truth_of({1: [5, 4], 2: [7]}), 10)
    assert per_user["user_id"].to_list() == [1, 2]
    assert per_user["ndcg"].to_list() == pytest.approx([1.0, 0.0])


def test_per_user_ndcg_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be >= 1"):
        per_user_ndcg(recs_of({1: [1]}), truth_of({1: [1]}), 0)
