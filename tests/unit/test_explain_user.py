"""Explaining one user on a tiny hand-built snapshot with a tiny LightGBM model."""

from datetime import date

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from features import contracts
from inference.explain import explain_user
from ranking.candidates import (
    FEATURE_NAMES,
    SOURCES,
    CandidateConfig,
    SnapshotTables,
    build_ranking_frame,
    generate_candidates,
)
from ranking.scoring import ScoringModel, score, top_n

AS_OF = date(2024, 3, 4)
CONFIG = CandidateConfig(cooc=10, pop=3, category=10, creator=10, new=2)
CATEGORIES = ["jazz", "pop", "rock"]


def conform(contract: contracts.TableContract, columns: dict, defaults: dict | None = None) -> pl.DataFrame:
    """A contract table from the given columns; the other columns get `defaults` or 0."""
    n = len(next(iter(columns.values())))
    filled = {"as_of": [AS_OF] * n}
    for column in contract.columns:
        if column.name not in columns and column.name != "as_of":
            filled[column.name] = [(defaults or {}).get(column.name, 0)] * n
    return contract.conform(pl.DataFrame(filled | columns))


def snapshot() -> SnapshotTables:
    """Eight items; user 1 consumed items 1 (yesterday) and 4, user 2 item 5; user 4 has
    features but no history; user 3 is in no table (cold)."""
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
        user_features=conform(contracts.USER_FEATURES, {"user_id": [1, 2, 4], "events_total": [2, 1, 0]}),
        item_features=items,
        item_neighbours=conform(
            contracts.ITEM_NEIGHBOURS,
            {
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
            {
                "user_id": [1, 1, 2],
                "item_id": [1, 4, 5],
                "days_since_last_event": [1.0, 10.0, 3.0],
                "events": [3, 1, 2],
            },
        ),
        collaborative_scores=pl.DataFrame(schema=contracts.COLLABORATIVE_SCORES.schema),  # no cf candidates here
        item_transitions=pl.DataFrame(schema=contracts.ITEM_TRANSITIONS.schema),  # no sequence signal here
    )


@pytest.fixture(scope="module")
def model() -> ScoringModel:
    """A small regression model over every feature (the prior included), trained on random rows."""
    rng = np.random.default_rng(7)
    x = rng.random((200, len(FEATURE_NAMES)))
    y = x[:, FEATURE_NAMES.index("item_plays_total")] + 0.5 * x[:, FEATURE_NAMES.index("pop_rank")]
    params = {"objective": "regression", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params | {"deterministic": True, "seed": 1}, lgb.Dataset(x, y, feature_name=FEATURE_NAMES), 10)
    return ScoringModel(booster, list(FEATURE_NAMES), CATEGORIES)


def labels(rows: list[tuple[int, int, bool]]) -> pl.DataFrame:
    """The week's (user, item, is_new) pairs, each consumed twice."""
    user_ids, item_ids, new = zip(*rows, strict=True)
    return conform(
        contracts.LABELS,
        {"user_id": list(user_ids), "item_id": list(item_ids), "is_new": list(new)},
        {"events": 2, "weight": 2.0},
    )


def test_candidates_carry_the_sources_and_ranks_they_were_generated_with(model):
    built = generate_candidates(snapshot(), pl.Series([1]), CONFIG)

    explained = explain_user(snapshot(), 1, model, CONFIG, n=3)

    expected = {
        row["item_id"]: {s: row[f"{s}_rank"] for s in SOURCES if row[f"{s}_rank"] is not None}
        for row in built.iter_rows(named=True)
    }
    assert {c["item_id"]: c["sources"] for c in explained["candidates"]} == expected
    assert expected[3] == {"cooc": 1, "new": 2, "category": 3}  # as tests/unit/test_candidates.py pins them
    assert [c["rank"] for c in explained["candidates"]] == list(range(1, len(expected) + 1))


def test_prior_bias_and_contributions_add_up_to_the_score_inference_ranks_by(model):
    frame = build_ranking_frame(snapshot(), pl.Series([1]), CONFIG, CATEGORIES)
    scored = score(model.booster, frame, FEATURE_NAMES)

    explained = explain_user(snapshot(), 1, model, CONFIG, n=3, top_features=3)

    scores = dict(scored.select("item_id", "score").iter_rows())
    for candidate in explained["candidates"]:
        listed = sum(c["contribution"] for c in candidate["contributions"])
        parts = candidate["prior"] + candidate["bias"] + listed + candidate["other_contributions"]
        assert parts == pytest.approx(candidate["score"], abs=1e-9)
        assert candidate["score"] == pytest.approx(scores[candidate["item_id"]], abs=1e-12)
        assert candidate["prior"] > 0  # the popularity prior: 2 ln(1 + plays_4w)
    assert [r["item_id"] for r in explained["recommended"]] == top_n(scored, 3)["item_id"].to_list()


def test_only_the_strongest_contributions_are_listed_strongest_first(model):
    explained = explain_user(snapshot(), 1, model, CONFIG, n=3, top_features=2)

    for candidate in explained["candidates"]:
        sizes = [abs(c["contribution"]) for c in candidate["contributions"]]
        assert len(sizes) == 2 and sizes == sorted(sizes, reverse=True)
        assert all(c["feature"] in FEATURE_NAMES for c in candidate["contributions"])


def test_newly_consumed_items_show_their_candidate_rank_or_not_a_candidate(model):
    week = labels([(1, 5, True), (1, 6, True), (1, 1, False), (2, 7, True)])

    explained = explain_user(snapshot(), 1, model, CONFIG, n=3, labels=week)

    rank_of_5 = next(c["rank"] for c in explained["candidates"] if c["item_id"] == 5)
    consumed = {c["item_id"]: c for c in explained["consumed"]}
    assert set(consumed) == {5, 6}  # item 1 was consumed before; item 7 is another user's
    assert consumed[5]["candidate"] and consumed[5]["rank"] == rank_of_5
    assert consumed[5]["in_top_n"] == (rank_of_5 <= 3) and consumed[5]["events"] == 2
    assert not consumed[6]["candidate"] and consumed[6]["rank"] is None and not consumed[6]["in_top_n"]


def test_without_labels_consumed_is_none(model):
    assert explain_user(snapshot(), 1, model, CONFIG, n=3)["consumed"] is None


def test_history_is_most_recent_first_with_how_often(model):
    explained = explain_user(snapshot(), 1, model, CONFIG, n=3)

    assert explained["history_items"] == 2
    assert [(h["item_id"], h["events"], h["days_ago"], h["category"]) for h in explained["history"]] == [
        (1, 3, 1.0, "rock"),
        (4, 1, 10.0, "jazz"),
    ]


def test_user_without_history_gets_no_co_occurrence_candidates(model):
    explained = explain_user(snapshot(), 4, model, CONFIG, n=3)

    assert explained["history"] == [] and explained["history_items"] == 0
    assert explained["user"]["events_total"] == 0
    assert explained["candidates"] and all("cooc" not in c["sources"] for c in explained["candidates"])
    assert not explained["notes"]


def test_cold_user_gets_item_side_candidates_and_a_note(model):
    explained = explain_user(snapshot(), 3, model, CONFIG, n=3)

    assert explained["user"] is None and explained["history"] == []
    assert {s for c in explained["candidates"] for s in c["sources"]} == {"pop", "new"}
    assert [r["item_id"] for r in explained["recommended"]] == [c["item_id"] for c in explained["candidates"][:3]]
    assert any("cold user" in note for note in explained["notes"])


def test_without_a_model_candidates_are_ranked_by_recent_popularity_without_scores():
    explained = explain_user(snapshot(), 1, None, CONFIG, n=3)

    assert all(c["score"] is None and "contributions" not in c for c in explained["candidates"])
    # Most plays in the last 4 weeks first: items 5 (30), 7 (25), 2 (10), 3 (8), 8 (1).
    assert [c["item_id"] for c in explained["candidates"]] == [5, 7, 2, 3, 8]
    assert any("no model" in note for note in explained["notes"])


def test_user_who_consumed_everything_has_no_candidates_and_a_note(model):
    tables = snapshot()
    everything = conform(contracts.USER_ITEM_HISTORY, {"user_id": [2] * 8, "item_id": list(range(1, 9))}, {"events": 1})
    tables = SnapshotTables(**(vars(tables) | {"user_item_history": everything}))

    explained = explain_user(tables, 2, model, CONFIG, n=3)

    assert explained["candidates"] == [] and explained["recommended"] == []
    assert any("fallback" in note for note in explained["notes"])


def test_explaining_leaves_the_snapshot_tables_unchanged(model):
    tables = snapshot()
    before = {name: frame.clone() for name, frame in vars(tables).items()}

    explain_user(tables, 1, model, CONFIG, n=3, labels=labels([(1, 5, True)]))

    assert all(frame.equals(before[name]) for name, frame in vars(tables).items())
