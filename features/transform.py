"""Feature and label computation: raw events in, one frame per feature table out.

Every function takes `as_of` and uses only events with `ts < as_of` (labels: the week
`[as_of, as_of + 7d)`), so the same code computes training weeks and this week alike.
"""

from datetime import UTC, date, datetime, timedelta

import polars as pl

from features import contracts

DAY_US = 86_400 * 1_000_000
WEEK = timedelta(days=7)


def week_start(as_of: date) -> datetime:
    """The instant `as_of` 00:00 UTC."""
    return datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC)


def events_before(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Events strictly before `as_of`: the only events a snapshot may see."""
    return events.filter(pl.col("ts") < week_start(as_of))


def _days_before(as_of: date, ts: pl.Expr) -> pl.Expr:
    return (pl.lit(week_start(as_of)) - ts).dt.total_microseconds() / DAY_US


def _within_weeks(as_of: date, weeks: int) -> pl.Expr:
    return pl.col("ts") >= week_start(as_of) - weeks * WEEK


def build_user_features(past: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Activity per user over the last 1/4/12 weeks and overall, recency and breadth."""
    windows = []
    for weeks in (1, 4, 12):
        recent = _within_weeks(as_of, weeks)
        windows += [
            recent.sum().alias(f"events_{weeks}w"),
            pl.col("item_id").filter(recent).n_unique().alias(f"distinct_items_{weeks}w"),
            pl.col("weight").filter(recent).sum().alias(f"weight_{weeks}w"),
        ]
    with_category = past.join(items.select("item_id", "category"), on="item_id", how="left")
    frame = with_category.group_by("user_id").agg(
        *windows,
        pl.len().alias("events_total"),
        pl.col("item_id").n_unique().alias("distinct_items_total"),
        _days_before(as_of, pl.col("ts").min()).alias("days_since_first_event"),
        _days_before(as_of, pl.col("ts").max()).alias("days_since_last_event"),
        pl.col("category").filter(_within_weeks(as_of, 12)).n_unique().alias("distinct_categories_12w"),
    )
    return _finish(contracts.USER_FEATURES, frame, as_of)


def build_item_features(past: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Popularity, trend and age of every item released or played before `as_of`."""
    plays = past.group_by("item_id").agg(
        *[_within_weeks(as_of, w).sum().alias(f"plays_{w}w") for w in (1, 4, 12)],
        pl.len().alias("plays_total"),
        pl.col("user_id").filter(_within_weeks(as_of, 4)).n_unique().alias("users_4w"),
        pl.col("user_id").n_unique().alias("users_total"),
        pl.col("ts").min().alias("first_ts"),
    )
    released = items.filter(pl.col("release_ts") < week_start(as_of))
    known = pl.concat([released.select("item_id"), plays.select("item_id")]).unique()
    frame = (
        known.join(items, on="item_id", how="left")
        .join(plays, on="item_id", how="left")
        .with_columns(
            pl.col("category").fill_null("unknown"),
            pl.col("creator").fill_null("unknown"),
            *[pl.col(c).fill_null(0) for c in plays.columns if c not in ("item_id", "first_ts")],
        )
        .with_columns(
            # Items with no known release date are as old as their first play.
            pl.coalesce("release_ts", "first_ts").alias("release_ts"),
            pl.coalesce("first_ts", "release_ts").alias("first_ts"),
        )
        .with_columns(
            ((pl.col("plays_1w") + 1) / (pl.col("plays_4w") / 4 + 1)).alias("trend_1w_vs_4w"),
            _days_before(as_of, pl.col("release_ts")).clip(lower_bound=0).alias("days_since_release"),
            _days_before(as_of, pl.col("first_ts")).clip(lower_bound=0).alias("days_since_first_event"),
        )
        .sort(["plays_4w", "plays_total", "item_id"], descending=[True, True, False])
        .with_row_index("popularity_rank_4w", offset=1)
    )
    return _finish(contracts.ITEM_FEATURES, frame, as_of)


def recent_items_per_user(past: pl.DataFrame, as_of: date, limit: int) -> pl.DataFrame:
    """Each user's `limit` most recently consumed distinct items of the last 12 weeks."""
    return (
        past.filter(_within_weeks(as_of, 12))
        .group_by("user_id", "item_id")
        .agg(pl.col("ts").max().alias("last_ts"))
        .sort(["user_id", "last_ts", "item_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(limit)
        .select("user_id", "item_id")
    )


def build_item_neighbours(past: pl.DataFrame, as_of: date, *, recent_items: int, top_k: int) -> pl.DataFrame:
    """Top-K co-occurrence neighbours per item, cosine-normalised over users' recent items."""
    baskets = recent_items_per_user(past, as_of, recent_items)
    item_users = baskets.group_by("item_id").agg(pl.len().alias("n"))
    pairs = (
        baskets.join(baskets, on="user_id", suffix="_b")
        .filter(pl.col("item_id") != pl.col("item_id_b"))
        .group_by("item_id", "item_id_b")
        .agg(pl.len().alias("together"))
        .join(item_users, on="item_id")
        .join(item_users.rename({"item_id": "item_id_b", "n": "n_b"}), on="item_id_b")
        .with_columns((pl.col("together") / (pl.col("n") * pl.col("n_b")).sqrt()).alias("score"))
        .sort(["item_id", "score", "item_id_b"], descending=[False, True, False])
        .group_by("item_id", maintain_order=True)
        .head(top_k)
        .with_columns(pl.int_range(1, pl.len() + 1).over("item_id").alias("rank"))
        .rename({"item_id_b": "neighbour_id"})
    )
    return _finish(contracts.ITEM_NEIGHBOURS, pairs, as_of)


def _build_affinity(
    past: pl.DataFrame, items: pl.DataFrame, as_of: date, column: str, contract: contracts.TableContract, top: int
) -> pl.DataFrame:
    recent = past.filter(_within_weeks(as_of, 12)).join(items.select("item_id", column), on="item_id", how="left")
    frame = (
        recent.with_columns(pl.col(column).fill_null("unknown"))
        .group_by("user_id", column)
        .agg(pl.len().alias("events_12w"))
        .with_columns((pl.col("events_12w") / pl.col("events_12w").sum().over("user_id")).alias("share_12w"))
        .sort(["user_id", "events_12w", column], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(top)
    )
    return _finish(contract, frame, as_of)


def build_user_category_affinity(past: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Share of each user's last-12-week events per category."""
    return _build_affinity(past, items, as_of, "category", contracts.USER_CATEGORY_AFFINITY, top=1_000)


def build_user_creator_affinity(past: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Share of each user's last-12-week events per creator (their 20 favourite creators)."""
    return _build_affinity(past, items, as_of, "creator", contracts.USER_CREATOR_AFFINITY, top=20)


def build_user_item_history(past: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Every (user, item) pair consumed before `as_of`, with counts and recency."""
    frame = past.group_by("user_id", "item_id").agg(
        pl.len().alias("events"),
        pl.col("weight").sum(),
        _days_before(as_of, pl.col("ts").max()).alias("days_since_last_event"),
    )
    return _finish(contracts.USER_ITEM_HISTORY, frame, as_of)


def build_labels(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """(user, item) pairs of the week `[as_of, as_of+7d)`; `is_new` if never consumed before."""
    start = week_start(as_of)
    week = events.filter((pl.col("ts") >= start) & (pl.col("ts") < start + WEEK))
    seen = events_before(events, as_of).select("user_id", "item_id").unique()
    frame = (
        week.group_by("user_id", "item_id")
        .agg(pl.len().alias("events"), pl.col("weight").sum())
        .join(seen.with_columns(pl.lit(False).alias("is_new")), on=["user_id", "item_id"], how="left")
        .with_columns(pl.col("is_new").fill_null(True))
    )
    return _finish(contracts.LABELS, frame, as_of)


def build_feature_tables(
    events: pl.DataFrame, items: pl.DataFrame, as_of: date, *, recent_items: int, neighbours: int
) -> dict[str, pl.DataFrame]:
    """Every feature table of the snapshot `as_of`, keyed by table name."""
    past = events_before(events, as_of)
    return {
        contracts.USER_FEATURES.name: build_user_features(past, items, as_of),
        contracts.ITEM_FEATURES.name: build_item_features(past, items, as_of),
        contracts.ITEM_NEIGHBOURS.name: build_item_neighbours(past, as_of, recent_items=recent_items, top_k=neighbours),
        contracts.USER_CATEGORY_AFFINITY.name: build_user_category_affinity(past, items, as_of),
        contracts.USER_CREATOR_AFFINITY.name: build_user_creator_affinity(past, items, as_of),
        contracts.USER_ITEM_HISTORY.name: build_user_item_history(past, as_of),
    }


def _finish(contract: contracts.TableContract, frame: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Stamp `as_of`, conform to the contract, sort by key for reproducible output."""
    return contract.conform(frame.with_columns(pl.lit(as_of).alias("as_of"))).sort(list(contract.key))
