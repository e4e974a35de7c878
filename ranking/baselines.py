"""Baseline recommenders reported next to every model on the same weeks.

Each takes one snapshot's feature frames and a list of users, and returns
(user_id, item_id, rank) with rank 1 first, at most k rows per user. Items a user
already consumed (in `history`) are excluded unless `exclude_consumed=False`. Ties are
broken by item_id, so the output is deterministic.

EASE and ALS (`features.collaborative`) learn from the snapshot's whole history: fit them
once per snapshot with `fit_collaborative`, then `recommend` any batch of its users; or read
the lists the feature flow kept in the snapshot's `collaborative_scores` table
(`stored_collaborative`), the same lists when consumed items are excluded.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from features import collaborative
from features.contracts import require_columns
from ranking import candidates

USER, ITEM, RANK = "user_id", "item_id", "rank"
_RECS_COLUMNS = [pl.col(c).cast(pl.Int64) for c in (USER, ITEM, RANK)]
COLLABORATIVE = ("ease", "als")
NAMES = ("recent_popular", "all_time_popular", "item_knn", *COLLABORATIVE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredLists:
    """One collaborative model's top lists as the `collaborative_scores` table keeps them: each user's
    best unconsumed items, `depth` of them at most (the feature flow's RECSYS_COLLABORATIVE_ITEMS_PER_USER)."""

    name: str
    lists: pl.DataFrame  # user_id, item_id, rank (the model's rank among the user's unconsumed items)
    depth: int

    def recommend(self, users: pl.Series | Sequence[int], k: int, *, exclude_consumed: bool = True) -> pl.DataFrame:
        """Top-k (user_id, item_id, rank) of each user in `users` the table has; others get no rows."""
        if not exclude_consumed:
            raise ValueError(f"{self.name}: collaborative_scores holds unconsumed items only; fit the model instead")
        if k > self.depth:
            raise ValueError(f"{self.name}: collaborative_scores keeps {self.depth} items per user, {k} asked")
        return self.lists.join(_user_frame(users), on=USER, how="semi").filter(pl.col(RANK) <= k).sort(USER, RANK)


# A collaborative baseline's source: fitted on a history, or read from collaborative_scores.
CollaborativeLists = collaborative.FittedScorer | StoredLists


def stored_collaborative(scores: pl.DataFrame) -> dict[str, StoredLists]:
    """EASE's and ALS's lists from one snapshot's `collaborative_scores` (as many users as it holds), by
    name; a model with no rank in it (EASE above its catalogue bound, an empty history) is left out.

    They equal `fit_collaborative`'s `recommend` (consumed items excluded) on the same history and
    settings: the table ranks each model's scores rounded to 9 decimals, so only two items scoring
    within 1e-9 of each other could swap (then by item_id).
    """
    stored = {}
    for name in COLLABORATIVE:
        lists = stored_lists(scores, name)
        if lists.height:
            stored[name] = StoredLists(name, lists, int(lists.get_column(RANK).max()))
    return stored


def stored_lists(scores: pl.DataFrame, name: str) -> pl.DataFrame:
    """`name`'s (user_id, item_id, rank) rows of one snapshot's `collaborative_scores` (where its rank is set)."""
    if name not in COLLABORATIVE:
        raise ValueError(f"stored_lists: unknown collaborative baseline {name!r}; expected one of {COLLABORATIVE}")
    rank = f"{name}_rank"
    return (
        _one_snapshot(scores, "collaborative_scores")
        .filter(pl.col(rank).is_not_null())
        .select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64), pl.col(rank).cast(pl.Int64).alias(RANK))
    )


def fit_collaborative(
    history: pl.DataFrame, config: collaborative.CollaborativeConfig, names: Sequence[str] = COLLABORATIVE
) -> dict[str, collaborative.FittedScorer]:
    """The collaborative baselines among `names` fitted on one snapshot's history, by name.

    EASE is left out, with a logged reason, when the history holds more than
    `config.ease_max_items` items; an empty history fits nothing.
    """
    unknown = sorted(set(names) - set(COLLABORATIVE))
    if unknown:
        raise ValueError(f"fit_collaborative: unknown collaborative baselines {unknown}; expected {COLLABORATIVE}")
    history = _one_snapshot(history, "history")
    if history.is_empty():
        return {}
    fitted = {}
    if "ease" in names:
        n_items = collaborative.count_items(history)
        if n_items > config.ease_max_items:
            log.warning(
                "ease skipped: the history holds %d items, above RECSYS_EASE_MAX_ITEMS=%d "
                "(EASE needs 8·n² bytes: %.1f GB)", n_items, config.ease_max_items, 8 * n_items**2 / 1e9,
            )  # fmt: skip
        else:
            fitted["ease"] = collaborative.fit_ease(history, config)
    if "als" in names:
        fitted["als"] = collaborative.fit_als(history, config)
    return fitted


def recommend(
    name: str,
    tables: candidates.SnapshotTables,
    users: pl.Series | Sequence[int],
    k: int,
    config: candidates.CandidateConfig,
    fitted: dict[str, CollaborativeLists],
) -> pl.DataFrame:
    """The named baseline's top-k (user_id, item_id, rank) for `users`, as evaluation and serving both run it.

    Collaborative baselines come from `fitted` (`fit_collaborative` on the same snapshot, or
    `stored_collaborative` of its collaborative_scores table);
    their users without a full list (cold users) are filled with recent popularity.
    """
    history, exclude = tables.user_item_history, config.exclude_consumed
    if name == "recent_popular":
        return recommend_recent_popular(tables.item_features, history, users, k, exclude_consumed=exclude)
    if name == "all_time_popular":
        return recommend_all_time_popular(tables.item_features, history, users, k, exclude_consumed=exclude)
    if name == "item_knn":
        return recommend_item_knn(
            tables.item_neighbours, history, users, k, config.recent_items,
            item_features=tables.item_features, exclude_consumed=exclude,
        )  # fmt: skip
    if name not in NAMES:
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(NAMES)}")
    if name not in fitted:
        raise ValueError(f"baseline {name!r} was not fitted on this snapshot (see fit_collaborative's log)")
    _require_k(k)
    wanted = _user_frame(users)
    top = fitted[name].recommend(wanted[USER], k, exclude_consumed=exclude).select(_RECS_COLUMNS)
    consumed = _consumed_pairs(history, wanted)
    return _fill_with_recent_popular(top, wanted, tables.item_features, k, consumed if exclude else None)


def recommend_recent_popular(
    item_features: pl.DataFrame,
    history: pl.DataFrame,
    users: pl.Series | Sequence[int],
    k: int,
    *,
    exclude_consumed: bool = True,
) -> pl.DataFrame:
    """The k items most played in the last 4 weeks that each user has not consumed."""
    return _recommend_popular(item_features, "plays_4w", history, users, k, exclude_consumed)


def recommend_all_time_popular(
    item_features: pl.DataFrame,
    history: pl.DataFrame,
    users: pl.Series | Sequence[int],
    k: int,
    *,
    exclude_consumed: bool = True,
) -> pl.DataFrame:
    """The k items most played ever that each user has not consumed."""
    return _recommend_popular(item_features, "plays_total", history, users, k, exclude_consumed)


def recommend_item_knn(
    item_neighbours: pl.DataFrame,
    history: pl.DataFrame,
    users: pl.Series | Sequence[int],
    k: int,
    recent_items: int,
    *,
    item_features: pl.DataFrame | None,
    exclude_consumed: bool = True,
) -> pl.DataFrame:
    """Co-occurrence neighbours of each user's `recent_items` most recent items, best summed score first.

    Recent items and neighbour scores are the candidates' own (`ranking.candidates`). Users
    left with fewer than k items (cold users, items without neighbours) are filled with
    recent popularity from `item_features`; pass None for neighbours only.
    """
    _require_k(k)
    if recent_items < 1:
        raise ValueError(f"recommend_item_knn: recent_items must be >= 1, got {recent_items}")
    require_columns(item_neighbours.columns, (ITEM, "neighbour_id", "score"), "item_neighbours")
    require_columns(history.columns, (USER, ITEM, "days_since_last_event", "events"), "history")
    wanted = _user_frame(users)
    consumed = _consumed_pairs(history, wanted)
    recent = candidates.select_recent_items(
        history.with_columns(pl.col(USER, ITEM).cast(pl.Int64)).join(wanted, on=USER, how="semi"), recent_items
    )
    neighbours = _one_snapshot(item_neighbours, "item_neighbours").select(
        pl.col(ITEM).cast(pl.Int64), pl.col("neighbour_id").cast(pl.Int64), "score"
    )
    knn = candidates.score_neighbours(recent, neighbours, consumed if exclude_consumed else None, k).select(
        USER, ITEM, pl.col("cooc_rank").cast(pl.Int64).alias(RANK)
    )
    if item_features is None:
        return knn.sort(USER, RANK)
    return _fill_with_recent_popular(knn, wanted, item_features, k, consumed if exclude_consumed else None)


def _fill_with_recent_popular(
    recs: pl.DataFrame, users: pl.DataFrame, item_features: pl.DataFrame, k: int, consumed: pl.DataFrame | None
) -> pl.DataFrame:
    """`recs` with every user's list filled up to k by recent popularity (not already listed, nor consumed)."""
    short = (
        users.join(recs.group_by(USER).agg(filled=pl.len()), on=USER, how="left")
        .with_columns(pl.col("filled").fill_null(0))
        .filter(pl.col("filled") < k)
    )
    listed = recs.select(USER, ITEM)
    excluded = pl.concat([consumed, listed]) if consumed is not None else listed
    fill = (
        _popular_excluding(item_features, "plays_4w", short.select(USER), k, excluded)
        .join(short, on=USER)
        .with_columns((pl.col(RANK) + pl.col("filled")).alias(RANK))
        .filter(pl.col(RANK) <= k)
        .select(_RECS_COLUMNS)
    )
    return pl.concat([recs, fill]).sort(USER, RANK)


def _recommend_popular(
    item_features: pl.DataFrame,
    column: str,
    history: pl.DataFrame,
    users: pl.Series | Sequence[int],
    k: int,
    exclude_consumed: bool,
) -> pl.DataFrame:
    _require_k(k)
    wanted = _user_frame(users)
    consumed = _consumed_pairs(history, wanted)
    return _popular_excluding(item_features, column, wanted, k, consumed if exclude_consumed else None)


def _popular_excluding(
    item_features: pl.DataFrame, column: str, users: pl.DataFrame, k: int, excluded: pl.DataFrame | None
) -> pl.DataFrame:
    """Each user's first k items by `column` descending (ties by item_id) that are not in their `excluded` pairs."""
    require_columns(item_features.columns, (ITEM, column), "item_features")
    ranked = (
        _one_snapshot(item_features, "item_features")
        .select(pl.col(ITEM).cast(pl.Int64), column)
        .sort(column, ITEM, descending=[True, False])
    )
    return candidates.take_unconsumed(ranked, users, k, excluded, RANK).select(_RECS_COLUMNS)


def _consumed_pairs(history: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    require_columns(history.columns, (USER, ITEM), "history")
    return (
        _one_snapshot(history, "history")
        .select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64))
        .join(users, on=USER, how="semi")
    )


def _user_frame(users: pl.Series | Sequence[int]) -> pl.DataFrame:
    return pl.DataFrame({USER: pl.Series(values=users, dtype=pl.Int64)}).unique().sort(USER)


def _one_snapshot(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    if "as_of" in frame.columns and frame["as_of"].n_unique() > 1:
        raise ValueError(f"{name}: holds {frame['as_of'].n_unique()} as_of snapshots; pass one snapshot")
    return frame


def _require_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
