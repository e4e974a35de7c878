"""Candidate counts per source allocated by measured recall (training.allocation)."""

from datetime import date

import polars as pl
import pytest

from ranking.candidates import SOURCES, CandidateConfig, with_stored_counts
from training.allocation import SourceRanks, allocate, single_source_recall

WEEK = date(2026, 1, 5)


def week_of(lists: dict[str, dict[int, list[int]]], truth: dict[int, list[int]], extra_truth: int = 0) -> SourceRanks:
    """A measured week from each source's ranked items per user (rank = position + 1) and each user's
    truth items; `extra_truth` truth pairs no source proposes."""
    rows: dict[tuple[int, int], dict] = {}
    for source, per_user in lists.items():
        for user, items in per_user.items():
            for rank, item in enumerate(items, 1):
                rows.setdefault((user, item), {"user_id": user, "item_id": item})[f"{source}_rank"] = rank
    schema = {"user_id": pl.Int64, "item_id": pl.Int64} | {f"{s}_rank": pl.Int64 for s in SOURCES}
    frame = pl.DataFrame(list(rows.values()), schema=schema).with_columns(
        pl.struct("user_id", "item_id")
        .map_elements(lambda r: r["item_id"] in truth.get(r["user_id"], []), return_dtype=pl.Boolean)
        .alias("truth")
    )
    users = len({u for per_user in lists.values() for u in per_user})
    return SourceRanks(WEEK, frame, users, sum(len(t) for t in truth.values()) + extra_truth)


def test_the_source_whose_next_items_hold_more_truth_gets_the_budget():
    # pop's first 2 items hold 1 truth item, cf's first 2 hold 2: with room for 2, cf takes it all.
    week = week_of({"pop": {1: [10, 11, 12, 13]}, "cf": {1: [20, 21, 22, 23]}}, {1: [10, 20, 21]})

    chosen = allocate([week], budget=2, step=2)

    assert chosen.counts == dict.fromkeys(SOURCES, 0) | {"cf": 2}
    assert chosen.candidates_per_user == 2 and chosen.recall == pytest.approx(2 / 3)


def test_the_budget_is_filled_step_by_step_and_never_exceeded():
    week = week_of({"pop": {1: [10, 11, 12, 13], 2: [10, 11, 12, 13]}, "cf": {1: [20, 21], 2: [20, 21]}}, {1: [21]})

    chosen = allocate([week], budget=5, step=2)

    # cf first (its 2 items hold the truth), then pop's first 2; pop's next 2 would make 6 per user.
    assert chosen.counts == dict.fromkeys(SOURCES, 0) | {"cf": 2, "pop": 2}
    assert chosen.candidates_per_user == 4 <= 5


def test_items_another_source_already_proposed_cost_nothing_and_count_once():
    # cf repeats pop's items: after pop's first 2, cf's first 2 add no candidate, so seq's new one is taken.
    week = week_of({"pop": {1: [10, 11]}, "cf": {1: [10, 11]}, "seq": {1: [30]}}, {1: [10, 30]})

    chosen = allocate([week], budget=3, step=2)

    assert chosen.counts["pop"] == 2 and chosen.counts["cf"] == 0 and chosen.counts["seq"] == 2
    assert chosen.candidates_per_user == 3 and chosen.recall == 1.0


def test_ties_go_to_the_source_listed_first():
    week = week_of({"cf": {1: [20]}, "pop": {1: [10]}}, {1: [10, 20]})

    assert allocate([week], budget=1, step=1).counts == dict.fromkeys(SOURCES, 0) | {"pop": 1}


def test_weeks_pool_as_user_week_units_and_unreachable_truth_counts_against_the_recall():
    first = week_of({"pop": {1: [10, 11]}}, {1: [10]}, extra_truth=1)
    second = week_of({"cf": {1: [20, 21]}}, {1: [21]})

    chosen = allocate([first, second], budget=2, step=2)

    assert chosen.users == 2 and chosen.truth_items == 3
    assert chosen.counts["pop"] == 2 and chosen.counts["cf"] == 2  # 2 candidates in each (user, week)
    assert chosen.candidates_per_user == 2 and chosen.recall == pytest.approx(2 / 3)


def test_each_source_alone_is_cut_at_the_allocations_candidates_per_user():
    week = week_of({"pop": {1: [10, 11, 12]}, "cf": {1: [20, 21, 22]}}, {1: [12, 20]})

    assert single_source_recall([week], 2) == dict.fromkeys(SOURCES, 0.0) | {"cf": 0.5}
    assert single_source_recall([week], 3) == dict.fromkeys(SOURCES, 0.0) | {"pop": 0.5, "cf": 0.5}
    chosen = allocate([week], budget=2, step=1)
    assert chosen.record()["best_single_source"] == "cf"
    assert chosen.record()["gain_over_best_single_source"] == pytest.approx(chosen.recall - 0.5)


def test_a_budget_or_step_below_one_is_refused_by_name():
    week = week_of({"pop": {1: [10]}}, {1: [10]})
    with pytest.raises(ValueError, match="candidate budget must be at least 1 per user, got 0"):
        allocate([week], budget=0)
    with pytest.raises(ValueError, match="allocation step must be at least 1, got 0"):
        allocate([week], budget=10, step=0)
    with pytest.raises(ValueError, match="no measured week"):
        allocate([], budget=10)


def test_a_models_stored_counts_replace_the_runs_and_nothing_else():
    run = CandidateConfig(recent_items=7, exclude_consumed=False)

    served = with_stored_counts(
        run, {"candidates": {"pop": 120, "cooc": 0, "recent_items": 3, "exclude_consumed": True}}
    )

    assert (served.pop, served.cooc, served.cf) == (120, 0, run.cf)
    assert (served.recent_items, served.exclude_consumed) == (7, False)  # the run's settings stay
    assert with_stored_counts(run, {}) == run  # a model stored without counts
