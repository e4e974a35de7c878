"""The candidate frame against a plain polars implementation of the same rules, on random worlds full of ties.

`generate_candidates` and `build_ranking_frame` take shortcuts for speed (the co-occurrence top-k and
lookups on the sparse product, the sources merged through one integer per pair); the reference below
does each step the obvious way: every (user, recent item, neighbour) triple summed, every source sorted in
full, the sources merged by a group-by and the signals joined on (user_id, item_id). Both must give the same
frame, bit for bit.
"""

from dataclasses import replace
from datetime import date

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from features import contracts
from features.raw import UNKNOWN
from ranking import candidates
from ranking.candidates import (
    _ITEM_COLUMNS,
    _USER_COLUMNS,
    FEATURE_NAMES,
    ITEM_DERIVED_COLUMNS,
    LAST_ITEMS,
    PRIOR_FEATURE,
    SEQ_SCORES,
    SOURCES,
    CandidateConfig,
    SnapshotTables,
    _user_tastes,
    _with_item_derived,
    build_ranking_frame,
    category_encoding,
    generate_candidates,
    score_transitions,
    select_last_items,
    select_recent_items,
)

AS_OF = date(2024, 3, 4)


# --- the reference: each rule written plainly ---


def ranked(frame: pl.DataFrame, score: str, source: str, limit: int, keep: tuple[str, ...] = ()) -> pl.DataFrame:
    rank = f"{source}_rank"
    return (
        frame.drop_nulls(score)  # no score (cf: neither EASE nor ALS ranked the item), no rank
        .sort(["user_id", score, "item_id"], descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias(rank))
        .filter(pl.col(rank) <= limit)
        .select("user_id", "item_id", rank, *keep)
    )


def exclude(frame: pl.DataFrame, consumed: pl.DataFrame | None) -> pl.DataFrame:
    return frame if consumed is None else frame.join(consumed, on=["user_id", "item_id"], how="anti")


def neighbour_pairs(recent: pl.DataFrame, neighbours: pl.DataFrame) -> pl.DataFrame:
    """Every (user, neighbour) pair: summed scores, added in recent item id order (one after the other, as a
    sparse product adds them), rounded; and how many recent items link to it."""
    return (
        recent.join(neighbours, on="item_id")
        .sort("user_id", "neighbour_id", "item_id")
        .group_by("user_id", "neighbour_id", maintain_order=True)
        .agg(
            pl.col("score").cum_sum().last().round(9).alias("cooc_score"),
            pl.len().cast(pl.Int64).alias("cooc_count"),
        )
        .rename({"neighbour_id": "item_id"})
    )


def transitions_reference(last_items: pl.DataFrame, transitions: pl.DataFrame | None) -> pl.DataFrame:
    """`score_transitions` as joins and group-bys: every (user, last item, next item) path summed per pair, the
    two-step paths from the last item likewise, the two joined; by user then item."""
    schema = {"user_id": pl.Int64, "item_id": pl.Int64} | SEQ_SCORES
    if transitions is None or transitions.is_empty() or last_items.is_empty():
        return pl.DataFrame(schema=schema)
    shrunk = pl.col("score") / (pl.col("score") / pl.col("share") + candidates.SEQ_PRIOR_TRANSITIONS)
    steps = transitions.select("item_id", "next_item_id", shrunk.alias("share"), "rank")
    direct = (
        last_items.join(steps, on="item_id")
        .group_by("user_id", "next_item_id")
        .agg(
            (pl.col("share") / pl.col("position")).sum().alias("seq_score"),
            pl.col("share").filter(pl.col("position") == 1).sum().alias("seq_last_share"),
        )
    )
    short = steps.filter(pl.col("rank") <= candidates.SEQ_TWO_STEP_FANOUT).select("item_id", "next_item_id", "share")
    two_step = (
        last_items.filter(pl.col("position") == 1)
        .join(short, on="item_id")
        .select("user_id", pl.col("next_item_id").alias("item_id"), pl.col("share").alias("first"))
        .join(short, on="item_id")
        .group_by("user_id", "next_item_id")
        .agg((pl.col("first") * pl.col("share")).sum().alias("seq_2step_share"))
    )
    return (
        direct.join(two_step, on=["user_id", "next_item_id"], how="full", coalesce=True)
        .rename({"next_item_id": "item_id"})
        .with_columns(pl.col(list(SEQ_SCORES)).fill_null(0.0).round(9))
        .select(*schema)
        .cast(schema)
        .sort("user_id", "item_id")
    )


def take_unconsumed(ordered: pl.DataFrame, users: pl.DataFrame, limit: int, consumed, rank: str) -> pl.DataFrame:
    every = users.join(ordered.select("item_id").with_row_index("position"), how="cross")
    return (
        exclude(every, consumed)
        .sort("user_id", "position")
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias(rank))
        .filter(pl.col(rank) <= limit)
        .select("user_id", "item_id", rank)
    )


def reference_candidates(tables: SnapshotTables, users: pl.Series, config: CandidateConfig) -> pl.DataFrame:
    user_frame = pl.DataFrame({"user_id": users.cast(pl.Int64).unique().sort()})
    history = tables.user_item_history.join(user_frame, on="user_id")
    consumed = history.select("user_id", "item_id") if config.exclude_consumed else None
    items = tables.item_features

    linked = neighbour_pairs(select_recent_items(history, config.recent_items), tables.item_neighbours)
    lists = {"cooc": ranked(exclude(linked, consumed), "cooc_score", "cooc", config.cooc)}
    lists["pop"] = take_unconsumed(items.sort("popularity_rank_4w"), user_frame, config.pop, consumed, "pop_rank")
    new_items = items.filter(pl.col("days_since_release") < config.new_release_days)
    by_plays = new_items.sort(["plays_1w", "item_id"], descending=[True, False])
    lists["new"] = take_unconsumed(by_plays, user_frame, config.new, consumed, "new_rank")
    for source, table in (("category", tables.user_category_affinity), ("creator", tables.user_creator_affinity)):
        favourite = (
            table.join(user_frame, on="user_id")
            .sort(["user_id", "share_12w", source], descending=[False, True, False])
            .group_by("user_id", maintain_order=True)
            .head(5)
        )
        limit = getattr(config, source)
        per_key = (
            items.sort(["plays_4w", "item_id"], descending=[True, False])
            .group_by(source, maintain_order=True)
            .head(limit)
        )
        scored = (
            favourite.select("user_id", source, "share_12w")
            .join(per_key.select(source, "item_id", "plays_4w"), on=source)
            .with_columns((pl.col("share_12w") * (pl.col("plays_4w") + 1).log()).alias("score"))
        )
        lists[source] = ranked(exclude(scored, consumed), "score", source, limit)
    best = tables.collaborative_scores.join(user_frame, on="user_id").select(
        "user_id", "item_id", (-pl.min_horizontal("ease_rank", "als_rank")).alias("score")
    )
    lists["cf"] = ranked(exclude(best, consumed), "score", "cf", config.cf)
    sequence = transitions_reference(select_last_items(history, LAST_ITEMS), tables.item_transitions)
    reachable = exclude(sequence, consumed).with_columns((pl.col("seq_score") + pl.col("seq_2step_share")).alias("s"))
    strong = reachable.filter(pl.col("s") >= max(config.seq_min_score, 1e-12))
    lists["seq"] = ranked(strong, "s", "seq", config.seq)

    tagged = pl.concat([lists[s].select("user_id", "item_id", f"{s}_rank") for s in SOURCES], how="diagonal")
    return (
        tagged.group_by("user_id", "item_id")
        .agg(pl.all().max())
        .with_columns(pl.sum_horizontal(pl.col(f"{s}_rank").is_not_null() for s in SOURCES).alias("n_sources"))
        .join(linked, on=["user_id", "item_id"], how="left")
        .join(sequence, on=["user_id", "item_id"], how="left")
        .with_columns(pl.col(list(SEQ_SCORES)).fill_null(0.0))
        .select(
            "user_id", "item_id", *[f"{s}_rank" for s in SOURCES], "cooc_score", "cooc_count", "n_sources", *SEQ_SCORES
        )  # fmt: skip
        .sort("user_id", "item_id")
    )


def reference_frame(tables: SnapshotTables, users: pl.Series, config: CandidateConfig, categories: list[str]):
    """`reference_candidates` with every feature joined on, one join after the other, then sorted."""
    cands = reference_candidates(tables, users, config)
    codes = pl.DataFrame(
        {"category": categories, "category_code": range(len(categories))},
        schema={"category": pl.Utf8, "category_code": pl.Int32},
    )
    items = _with_item_derived(tables.item_features).select(
        "item_id", "category", "creator", *[pl.col(c).alias(f"item_{c}") for c in _ITEM_COLUMNS],
        *ITEM_DERIVED_COLUMNS, PRIOR_FEATURE, "log_popularity_rank", "log_release_age",
    )  # fmt: skip
    history = tables.user_item_history.join(cands.select("user_id").unique(), on="user_id", how="semi")
    last = select_last_items(history, LAST_ITEMS).join(items.select("item_id", "category", "creator"), on="item_id")
    last_item = last.filter(position=1).select("user_id", last_creator="creator", last_category="category")
    creator_share = (
        last.filter(pl.col("creator") != UNKNOWN)
        .group_by("user_id", "creator")
        .agg((pl.len() / LAST_ITEMS).cast(pl.Float64).alias("last_items_creator_share"))
    )
    best = {m: pl.col(f"{m}_score").max().over("user_id") for m in ("ease", "als")}
    return (
        cands.join(tables.user_features.select("user_id", *[pl.col(c).alias(f"user_{c}") for c in _USER_COLUMNS]),
                   on="user_id", how="left")
        .join(_user_tastes(tables, items), on="user_id", how="left")
        .join(last_item, on="user_id", how="left")
        .join(items, on="item_id", how="left")
        .join(codes, on="category", how="left")
        .join(tables.user_category_affinity.select("user_id", "category", category_share_12w="share_12w"),
              on=["user_id", "category"], how="left")
        .join(tables.user_creator_affinity.select("user_id", "creator", creator_share_12w="share_12w",
                                                  creator_events_12w="events_12w"),
              on=["user_id", "creator"], how="left")
        .join(tables.collaborative_scores.select("user_id", "item_id", "ease_score", "als_score"),
              on=["user_id", "item_id"], how="left")
        .join(creator_share, on=["user_id", "creator"], how="left")
        .with_columns(
            *[pl.col(f"{m}_score").rank("min", descending=True).over("user_id").cast(pl.Int64)
              .alias(f"{m}_candidate_rank") for m in ("ease", "als")],
            *[pl.when(best[m] > 0).then(pl.col(f"{m}_score") / best[m]).alias(f"{m}_score_vs_best")
              for m in ("ease", "als")],
            pl.col("category_share_12w", "creator_share_12w", "last_items_creator_share").fill_null(0.0),
            pl.col("creator_events_12w").fill_null(0),
            *[((pl.col(c) == pl.col(f"last_{c}")) & (pl.col(c) != UNKNOWN)).fill_null(False).cast(pl.Int32)
              .alias(f"same_{c}_as_last") for c in ("creator", "category")],
            (pl.col("cooc_score") / pl.col("cooc_score").max().over("user_id")).alias("cooc_score_vs_best"),
            (pl.col("log_popularity_rank") - pl.col("user_log_popularity_rank")).alias("popularity_vs_user"),
            (pl.col("log_release_age") - pl.col("user_log_release_age")).alias("release_age_vs_user"),
        )
        .select("user_id", "item_id", *FEATURE_NAMES)
        .sort("user_id", "item_id")
    )  # fmt: skip


# --- random worlds: few distinct values, so that ties are everywhere ---


def conform(contract: contracts.TableContract, columns: dict) -> pl.DataFrame:
    n = len(next(iter(columns.values())))
    filled = {c.name: [0] * n for c in contract.columns if c.name not in columns and c.name != "as_of"}
    return contract.conform(pl.DataFrame({"as_of": [AS_OF] * n} | filled | columns))


def random_world(seed: int, big_ids: bool = False) -> tuple[SnapshotTables, pl.Series]:
    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(1, 9)), int(rng.integers(1, 30))
    # Ids far apart and beyond 2^31 where asked: nothing may assume small or dense ids.
    offset = (1 << 40) if big_ids else 0
    user_ids = np.sort(rng.choice(1000, n_users, replace=False)) + offset
    item_ids = np.sort(rng.choice(1000, n_items, replace=False)) + offset
    categories, creators = ["a", "b", "c"], ["x", "y", "unknown"]

    def pairs(left: np.ndarray, right: np.ndarray, share: float) -> tuple[list, list]:
        keep = rng.random((len(left), len(right))) < share
        rows, columns = np.nonzero(keep)
        return left[rows].tolist(), right[columns].tolist()

    def few(values: list, n: int) -> list:
        return [values[i] for i in rng.integers(0, len(values), n)]

    plays = few([0, 1, 2, 5], n_items)
    items = conform(
        contracts.ITEM_FEATURES,
        {
            "item_id": item_ids.tolist(),
            "category": few(categories, n_items),
            "creator": few(creators, n_items),
            "plays_1w": few([0, 1, 3], n_items),
            "plays_4w": plays,
            "plays_total": [3 * p + int(rng.integers(0, 2)) for p in plays],
            "days_since_release": few([2.0, 10.0, 40.0], n_items),
            "popularity_rank_4w": rng.permutation(n_items).tolist(),
            "trend_1w_vs_4w": few([0.5, 1.0], n_items),
        },
    )
    hu, hi = pairs(user_ids, item_ids, 0.25)
    history = conform(
        contracts.USER_ITEM_HISTORY,
        {"user_id": hu, "item_id": hi, "days_since_last_event": few([1.0, 2.0, 9.0], len(hu)),
         "events": few([1, 2], len(hu))},
    )  # fmt: skip
    na, nb = pairs(item_ids, item_ids, 0.3)
    neighbours = conform(
        contracts.ITEM_NEIGHBOURS,
        {"item_id": na, "neighbour_id": nb, "score": few([0.1, 0.25, 1 / 3, 0.5, 0.9], len(na)), "rank": [1] * len(na)},
    )
    ta, tb = pairs(item_ids, item_ids, 0.2)
    transitions = conform(
        contracts.ITEM_TRANSITIONS,
        {"item_id": ta, "next_item_id": tb, "score": few([1.0, 3.0, 30.0], len(ta)),
         "share": few([0.2, 0.5, 1.0], len(ta)), "rank": few([1, 2, 11], len(ta)), "transitions": [1] * len(ta)},
    )  # fmt: skip
    cu, ci = pairs(user_ids, item_ids, 0.4)
    collaborative = conform(
        contracts.COLLABORATIVE_SCORES,
        {"user_id": cu, "item_id": ci, "ease_score": few([None, 0.1, 0.4], len(cu)),
         "ease_rank": few([None, 1, 2, 3], len(cu)), "als_score": few([0.2, -0.1, None], len(cu)),
         "als_rank": few([1, 2, None], len(cu))},
    )  # fmt: skip

    def affinity(contract: contracts.TableContract, keys: list[str]) -> pl.DataFrame:
        au, ak = pairs(user_ids, np.arange(len(keys)), 0.6)
        return conform(contract, {"user_id": au, contract.key[-1]: [keys[k] for k in ak],
                                  "share_12w": few([0.2, 0.5], len(au))})  # fmt: skip

    tables = SnapshotTables(
        user_features=conform(contracts.USER_FEATURES, {"user_id": user_ids[: max(1, n_users - 1)].tolist()}),
        # Now and then an item the other tables name has no features (null item features, no category).
        item_features=items.filter(pl.col("item_id") != item_ids[-1]) if n_items > 1 and rng.random() < 0.3 else items,
        item_neighbours=neighbours,
        user_category_affinity=affinity(contracts.USER_CATEGORY_AFFINITY, categories),
        user_creator_affinity=affinity(contracts.USER_CREATOR_AFFINITY, creators),
        user_item_history=history,
        collaborative_scores=collaborative,
        item_transitions=transitions,
    )
    # Some of the users asked for may have no data at all (cold), one asked for twice.
    asked = [*user_ids.tolist(), int(user_ids[0]), offset + 5000]
    return tables, pl.Series("user_id", asked, pl.Int64)


CONFIGS = [
    CandidateConfig(cooc=3, pop=2, category=2, creator=2, new=1, cf=2, seq=2, seq_min_score=0.05, recent_items=3),
    CandidateConfig(cooc=100, pop=50, category=50, creator=30, new=30, cf=50, seq=30, recent_items=20),
    CandidateConfig(cooc=1, pop=1, category=1, creator=1, new=1, cf=1, seq=1, recent_items=1, exclude_consumed=False),
]


@hyp_settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), config=st.sampled_from(CONFIGS), big_ids=st.booleans())
def test_candidates_equal_the_plain_reference_on_random_worlds(seed, config, big_ids):
    tables, users = random_world(seed, big_ids)
    got = generate_candidates(tables, users, config)
    expected = reference_candidates(tables, users, config)
    assert got.schema == expected.schema
    assert got.equals(expected)


@hyp_settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), config=st.sampled_from(CONFIGS), big_ids=st.booleans())
def test_ranking_frame_equals_the_plain_reference_on_random_worlds(seed, config, big_ids):
    tables, users = random_world(seed, big_ids)
    # One category the model never saw (no code) and one it knows that no item has any more.
    categories = [*category_encoding(tables.item_features)[1:], "zz"]
    got = build_ranking_frame(tables, users, config, categories)
    expected = reference_frame(tables, users, config, categories)
    assert got.schema == expected.schema
    assert got.equals(expected)


@hyp_settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), big_ids=st.booleans())
def test_sequence_scores_equal_the_plain_reference_on_random_worlds(seed, big_ids):
    tables, users = random_world(seed, big_ids)
    last_items = select_last_items(tables.user_item_history, LAST_ITEMS)
    got = score_transitions(last_items, tables.item_transitions)
    expected = transitions_reference(last_items, tables.item_transitions)
    assert got.schema == expected.schema
    assert got.equals(expected)


def test_every_source_proposes_something_in_the_random_worlds():
    # The comparison above means something only if the worlds exercise every source and the cuts.
    found = pl.concat([generate_candidates(*random_world(seed), CONFIGS[0]) for seed in range(30)])
    for source in SOURCES:
        assert found[f"{source}_rank"].drop_nulls().len() > 0, source
    assert (found["n_sources"] > 1).any()
    assert found["cooc_score"].is_null().any() and found["cooc_score"].is_not_null().any()
    assert (found["seq_2step_share"] > 0).any() and (found["seq_last_share"] > 0).any()


def test_a_planted_tie_break_bug_is_caught(monkeypatch):
    # The cooc source's ties broken by descending item id: the comparison must notice.
    original = candidates.top_in_rows

    def reversed_ties(rows, scores, n_rows, limit):
        flipped = np.lexsort((-np.arange(len(rows)), -scores, rows))
        chosen, ranks = original(rows[flipped], scores[flipped], n_rows, limit)
        return flipped[chosen], ranks

    monkeypatch.setattr(candidates, "top_in_rows", reversed_ties)
    worlds = [random_world(seed) for seed in range(40)]
    config = CONFIGS[0]
    assert any(not generate_candidates(*w, config).equals(reference_candidates(*w, config)) for w in worlds)


@pytest.mark.parametrize("config", [replace(CONFIGS[0], cooc=0), replace(CONFIGS[1], exclude_consumed=False)])
def test_no_candidates_of_a_source_cut_to_zero_and_consumed_items_kept_when_asked(config):
    tables, users = random_world(7)
    assert generate_candidates(tables, users, config).equals(reference_candidates(tables, users, config))
