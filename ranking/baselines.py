"""Baseline recommenders reported next to every model on the same weeks.

Each takes one snapshot's feature frames and a list of users, and returns
(user_id, item_id, rank) with rank 1 first, at most k rows per user. Items a user
already consumed (in `history`) are excluded unless `exclude_consumed=False`. Ties are
broken by item_id, so the output is deterministic.
"""

from collections.abc import Sequence

import polars as pl

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
    recent_items: int = 20,
    *,
    item_features: pl.DataFrame | None,
    exclude_consumed: bool = True,
) -> pl.DataFrame:
    """Co-occurrence neighbours of each user's most recent items, best summed score first.

    A user's recent items are those with the smallest days_since_last_event (then most
    events). Users left with fewer than k items (cold users, items without neighbours)
    are filled with recent popularity from `item_features`; pass None for neighbours only.
    """
    _require_k(k)
    if recent_items < 1:
        raise ValueError(f"recommend_item_knn: recent_items must be >= 1, got {recent_items}")
    _require_columns(item_neighbours, "item_neighbours", (ITEM, "neighbour_id", "score"))
    wanted = _user_frame(users)
    consumed = _consumed_pairs(history, wanted)
    recent = (
        _require_columns(history, "history", (USER, ITEM, "days_since_last_event", "events"))
        .with_columns(pl.col(USER, ITEM).cast(pl.Int64))
        .join(wanted, on=USER, how="semi")
        .sort(USER, "days_since_last_event", "events", ITEM, descending=[False, False, True, False])
        .filter(pl.int_range(pl.len()).over(USER) < recent_items)
        .select(USER, ITEM)
    )
    neighbours = _one_snapshot(item_neighbours, "item_neighbours").select(
        pl.col(ITEM).cast(pl.Int64), pl.col("neighbour_id").cast(pl.Int64), "score"
    )
    scored = (
        recent.lazy()
        .join(neighbours.lazy(), on=ITEM)
        .group_by(USER, "neighbour_id")
        # Rounded so that float summation order cannot reorder near-equal scores.
        .agg(pl.col("score").sum().round(9))
        .rename({"neighbour_id": ITEM})
    )
    if exclude_consumed:
        scored = scored.join(consumed.lazy(), on=[USER, ITEM], how="anti")
    # Users have up to recent_items x neighbours scored items: cut to the top-k scores
    # (ties kept) before the exact sort, which would otherwise dominate the run time.
    best = scored.filter(pl.col("score").rank("min", descending=True).over(USER) <= k).collect()
    knn = _take_top(best.sort(USER, "score", ITEM, descending=[False, True, False]), k)
    if item_features is None:
        return knn.sort(USER, RANK)

    short = (
        wanted.join(knn.group_by(USER).agg(filled=pl.len()), on=USER, how="left")
        .with_columns(pl.col("filled").fill_null(0))
        .filter(pl.col("filled") < k)
    )
    not_again = consumed if exclude_consumed else consumed.clear()
    excluded = pl.concat([not_again, knn.select(USER, ITEM)])
    ranked = _rank_items_by(item_features, "plays_4w")
    fill = (
        _popular_excluding(ranked, excluded, short.select(USER), k)
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
    excluded = _consumed_pairs(history, wanted)
    if not exclude_consumed:
        excluded = excluded.clear()
    return _popular_excluding(_rank_items_by(item_features, column), excluded, wanted, k)


def _rank_items_by(item_features: pl.DataFrame, column: str) -> pl.DataFrame:
    """(item_id, position): items by `column` descending, then item_id, position 1 first."""
    _require_columns(item_features, "item_features", (ITEM, column))
    return (
        _one_snapshot(item_features, "item_features")
        .select(pl.col(ITEM).cast(pl.Int64), column)
        .sort(column, ITEM, descending=[True, False])
        .select(ITEM, position=pl.int_range(1, pl.len() + 1, dtype=pl.Int64))
    )


def _popular_excluding(ranked: pl.DataFrame, excluded: pl.DataFrame, users: pl.DataFrame, k: int) -> pl.DataFrame:
    """Each user's first k items of `ranked` that are not in their `excluded` pairs."""
    # A user with e excluded ranked items finds k allowed ones within the first k + e:
    # the candidate frame grows with users * k + len(excluded), never users * catalogue.
    excluded_counts = excluded.join(ranked, on=ITEM, how="semi").group_by(USER).agg(n_excluded=pl.len())
    depth = pl.min_horizontal(pl.lit(k) + pl.col("n_excluded"), pl.lit(ranked.height))
    candidates = (
        users.join(excluded_counts, on=USER, how="left", maintain_order="left")
        .with_columns(pl.col("n_excluded").fill_null(0))
        .select(USER, position=pl.int_ranges(1, depth + 1, dtype=pl.Int64))
        .explode("position")
        .join(ranked, on="position", maintain_order="left")
        .join(excluded, on=[USER, ITEM], how="anti", maintain_order="left")
    )
    return _take_top(candidates, k)


def _take_top(ordered: pl.DataFrame, k: int) -> pl.DataFrame:
    """The first k rows of each user in the frame's order, numbered as rank."""
    return (
        ordered.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(USER).alias(RANK))
        .filter(pl.col(RANK) <= k)
        .select(_RECS_COLUMNS)
    )


def _consumed_pairs(history: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    return (
        _one_snapshot(_require_columns(history, "history", (USER, ITEM)), "history")
        .select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64))
        .join(users, on=USER, how="semi")
    )


def _user_frame(users: pl.Series | Sequence[int]) -> pl.DataFrame:
    return pl.DataFrame({USER: pl.Series(values=users, dtype=pl.Int64)}).unique().sort(USER)


def _one_snapshot(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    if "as_of" in frame.columns and frame["as_of"].n_unique() > 1:
        raise ValueError(f"{name}: holds {frame['as_of'].n_unique()} as_of snapshots; pass one snapshot")
    return frame


def _require_columns(frame: pl.DataFrame, name: str, columns: tuple[str, ...]) -> pl.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing} (has {frame.columns})")
    return frame


def _require_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
