"""Candidate counts per source allocated by measured recall (training.allocation)."""

import json
from dataclasses import asdict
from datetime import date

import polars as pl
import pytest

from ranking.candidates import SOURCES, CandidateConfig, generate_candidates, keep_band_counts, with_stored_counts
from tests.unit.test_candidates import snapshot
from training.allocation import SourceRanks, allocate, band_edges, counts_text, single_source_recall
from training.report import allocation_sentence

WEEK = date(2026, 1, 5)


def week_of(
    lists: dict[str, dict[int, list[int]]],
    truth: dict[int, list[int]],
    extra_truth: int = 0,
    events: dict[int, int] | None = None,
) -> SourceRanks:
    """A measured week from each source's ranked items per user (rank = position + 1) and each user's
    truth items; `extra_truth` truth pairs no source proposes (the first user's); `events`: each user's
    history length (default 1)."""
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
    ids = sorted({u for per_user in lists.values() for u in per_user} | set(truth))
    users = pl.DataFrame(
        {
            "user_id": ids,
            "events": [(events or {}).get(u, 1) for u in ids],
            "truth_items": [len(truth.get(u, [])) + (extra_truth if u == ids[0] else 0) for u in ids],
        },
        schema={"user_id": pl.Int64, "events": pl.Int64, "truth_items": pl.Int64},
    )
    return SourceRanks(WEEK, frame, users)


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


# History bands: users 1 and 2 have a short history (5 events) and find next week's items in pop's list;
# users 3 and 4 a long one (50) and find theirs in cf's. One allocation for all has to pick one source.
BANDED = {
    "lists": {
        "pop": {u: [10, 11, 12, 13] for u in (1, 2, 3, 4)},
        "cf": {u: [20, 21, 22, 23] for u in (1, 2, 3, 4)},
    },
    "truth": {1: [10, 11], 2: [10, 13], 3: [20, 21], 4: [20, 21]},
    "events": {1: 5, 2: 5, 3: 50, 4: 50},
}


def test_each_history_band_gets_the_counts_that_hold_its_own_users_next_items():
    week = week_of(**BANDED)

    one = allocate([week], budget=2, step=2)
    banded = allocate([week], budget=2, step=2, bands=2)

    assert one.band_edges == () and one.band_counts == [one.counts]
    # pop's first 2 hold 3 truth pairs, cf's 4: cf's 2 for everyone, users 3 and 4's 4 of the 8 truth pairs.
    assert one.counts == dict.fromkeys(SOURCES, 0) | {"cf": 2} and one.recall == pytest.approx(4 / 8)
    assert banded.band_edges == (50,) and banded.band_units == [2, 2]
    assert banded.band_counts == [dict.fromkeys(SOURCES, 0) | {"pop": 2}, dict.fromkeys(SOURCES, 0) | {"cf": 2}]
    assert banded.counts == dict.fromkeys(SOURCES, 0) | {"pop": 2, "cf": 2}  # how deep each source is generated
    assert banded.recall == pytest.approx(7 / 8) and banded.candidates_per_user == 2  # the budget holds per band


def test_the_budget_holds_in_every_band_not_only_on_average():
    # The short-history band could use 4 of pop's items, but never more than the budget of 2 per user.
    week = week_of(**BANDED)

    banded = allocate([week], budget=2, step=1, bands=2)

    for counts in banded.band_counts:
        assert sum(counts.values()) <= 2


def test_band_edges_split_the_units_into_bands_of_about_as_many_units_by_history_length():
    week = week_of({"pop": {u: [10] for u in range(1, 9)}}, {}, events={u: 10 * u for u in range(1, 9)})

    assert band_edges([week], 1) == ()
    assert band_edges([week], 2) == (50,)  # 10..40 below, 50..80 from it
    assert band_edges([week], 4) == (30, 50, 70)
    # Weeks pool: the same user in two weeks is two units.
    assert band_edges([week, week], 2) == (50,)
    with pytest.raises(ValueError, match="history bands must be at least 1, got 0"):
        band_edges([week], 0)


def test_band_edges_at_one_shared_length_are_dropped_fewer_bands_rather_than_empty_ones():
    week = week_of({"pop": {u: [10] for u in range(1, 7)}}, {}, events={1: 3, 2: 3, 3: 3, 4: 3, 5: 9, 6: 12})

    # Units 2 and 4 (of 0..5, ascending) both have the shortest length, 3: no band below it.
    assert band_edges([week], 3) == (9,)
    chosen = allocate([week], budget=1, step=1, bands=3)
    assert chosen.band_units == [4, 2] and len(chosen.band_counts) == 2


def test_a_banded_allocation_round_trips_through_the_registrys_json_to_the_same_candidates():
    chosen = allocate([week_of(**BANDED)], budget=2, step=2, bands=2)
    config = chosen.config(CandidateConfig())

    assert config.band_edges == (50,)
    assert config.band_counts == (
        tuple(2 if s == "pop" else 0 for s in SOURCES),
        tuple(2 if s == "cf" else 0 for s in SOURCES),
    )
    stored = json.loads(json.dumps({"candidates": asdict(config), "allocation": chosen.record()}))
    assert with_stored_counts(CandidateConfig(), stored) == config
    assert stored["allocation"]["band_edges"] == [50] and stored["allocation"]["band_counts"] == chosen.band_counts


def test_a_model_stored_before_the_bands_is_served_with_one_count_per_source_for_every_user():
    banded_run = CandidateConfig(pop=5, band_edges=(10,), band_counts=((0,) * len(SOURCES), (1,) * len(SOURCES)))
    old = {"candidates": {s: 7 for s in SOURCES} | {"recent_items": 3, "exclude_consumed": True}}

    served = with_stored_counts(banded_run, old)

    assert served.band_edges == () and served.band_counts == () and served.pop == 7


def test_one_band_configures_exactly_the_plain_counts():
    chosen = allocate([week_of(**BANDED)], budget=2, step=2)
    assert chosen.config(CandidateConfig()) == CandidateConfig(**chosen.counts)


def test_the_counts_and_report_sentence_name_each_band():
    banded = allocate([week_of(**BANDED)], budget=2, step=2, bands=2).record()
    assert counts_text(banded) == "< 50 events: pop 2; ≥ 50 events: cf 2"
    assert "allocated by measured recall by history length" in allocation_sentence(banded)
    three = banded | {"band_edges": [5, 50], "band_counts": [{"pop": 1}, {"cf": 2}, {}]}
    assert counts_text(three) == "< 5 events: pop 1; 5–49 events: cf 2; ≥ 50 events: none"
    # A record stored before the bands.
    old = {k: v for k, v in banded.items() if not k.startswith("band_")}
    assert counts_text(old) == "pop 2, cf 2"
    assert "by history length" not in allocation_sentence(old)


def test_candidate_generation_keeps_each_users_band_counts():
    # snapshot(): user 1 has 2 events, user 2 has 1, user 3 none (cold). Band edges (2,): users 2 and 3 in
    # the first band (pop 1, new 0), user 1 in the second (pop 3, new 2); generated 3 and 2 deep.
    pop, new = SOURCES.index("pop"), SOURCES.index("new")
    first = tuple(1 if j == pop else 0 for j in range(len(SOURCES)))
    second = tuple({pop: 3, new: 2}.get(j, 0) for j in range(len(SOURCES)))
    config = CandidateConfig(
        cooc=0, pop=3, category=0, creator=0, new=2, cf=0, seq=0, band_edges=(2,), band_counts=(first, second)
    )

    candidates = generate_candidates(snapshot(), pl.Series([1, 2, 3]), config)

    def proposed(user: int, source: str) -> list[int]:
        rows = candidates.filter(pl.col("user_id") == user, pl.col(f"{source}_rank").is_not_null())
        return rows.sort(f"{source}_rank")["item_id"].to_list()

    assert proposed(1, "pop") == [5, 7, 2] and proposed(1, "new") == [5, 3]
    assert proposed(2, "pop") == [7] and proposed(2, "new") == []
    assert proposed(3, "pop") == [5] and proposed(3, "new") == []  # cold: no row in user_features, first band
    plain = generate_candidates(
        snapshot(), pl.Series([1, 2, 3]), CandidateConfig(**{s: 0 for s in SOURCES} | {"pop": 3, "new": 2})
    )
    assert plain.filter(user_id=2).height > candidates.filter(user_id=2).height


def test_without_bands_the_lists_are_kept_as_generated():
    lists = {"pop": pl.DataFrame({"user_id": [1, 1], "item_id": [5, 7], "pop_rank": [1, 2]})}
    assert keep_band_counts(lists, pl.DataFrame({"user_id": [1], "events_total": [9]}), CandidateConfig()) is lists


@pytest.mark.parametrize(
    ("edges", "counts", "message"),
    [
        ((5, 5), ((0,) * 7,) * 3, "strictly ascending"),
        ((5,), ((0,) * 7,) * 3, "1 band edges need 2 bands of counts, got 3"),
        ((5,), (), "without band_counts"),
        ((5,), ((0,) * 7, (0,) * 6), "one count per source"),
    ],
)
def test_inconsistent_bands_are_refused_by_name(edges, counts, message):
    with pytest.raises(ValueError, match=message):
        CandidateConfig(band_edges=edges, band_counts=counts)
