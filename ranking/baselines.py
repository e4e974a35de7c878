"""Baseline recommenders reported next to every model on the same weeks.

Each takes one snapshot's feature frames and a list of users, and returns
(user_id, item_id, rank) with rank 1 first, at most k rows per user. Items a user
already consumed (in `history`) are excluded unless `exclude_consumed=False`. Ties are
broken by item_id, so the output is deterministic.
"""

from collections.abc import Sequence

import polars as pl

from features.contracts import require_columns
from ranking import candidates

USER, ITEM, RANK = "user_id", "item_id", "rank"
_RECS_COLUMNS = [pl.col(c).cast(pl.Int64) for c in (USER, ITEM, RANK)]


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

    short = (
        wanted.join(knn.group_by(USER).agg(filled=pl.len()), on=USER, how="left")
        .with_columns(pl.col("filled").fill_null(0))
        .filter(pl.col("filled") < k)
    )
    excluded = pl.concat([consumed, knn.select(USER, ITEM)] if exclude_consumed else [knn.select(USER, ITEM)])
    fill = (
        _popular_excluding(item_features, "plays_4w", short.select(USER), k, excluded)
        .join(short, on=USER)
        .with_columns((pl.col(RANK) + pl.col("filled")).alias(RANK))
        .filter(pl.col(RANK) <= k)
        .select(_RECS_COLUMNS)
    )
    return pl.concat([knn, fill]).sort(USER, RANK)


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
