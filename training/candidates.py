"""Candidate generation and the candidate×feature frame, shared by training and inference.

`build_ranking_frame` is the one function that turns (snapshot tables, users) into the
rows the ranker scores; inference calls it exactly as training did.
"""

from dataclasses import dataclass

import polars as pl

from features import contracts

SOURCES = ("cooc", "pop", "category", "creator", "new")


@dataclass(frozen=True)
class SnapshotTables:
    """The feature tables of one `as_of`, restricted to the users being ranked."""

    user_features: pl.DataFrame
    item_features: pl.DataFrame
    item_neighbours: pl.DataFrame
    user_category_affinity: pl.DataFrame
    user_creator_affinity: pl.DataFrame
    user_item_history: pl.DataFrame

    @classmethod
    def from_frames(cls, frames: dict[str, pl.DataFrame]) -> "SnapshotTables":
        return cls(**{t.name: frames[t.name] for t in contracts.FEATURE_TABLES})


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates each source contributes per user."""

    cooc: int = 100
    pop: int = 50
    category: int = 50
    creator: int = 30
    new: int = 30
    recent_items: int = 20
    new_release_days: float = 28.0
    exclude_consumed: bool = True


def _ranked(frame: pl.DataFrame, score: str, source: str, limit: int, keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """Keep each user's top `limit` items by `score` (ties by item id), with the rank as a column."""
    return (
        frame.sort(["user_id", score, "item_id"], descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias(f"{source}_rank"))
        .filter(pl.col(f"{source}_rank") <= limit)
        .select("user_id", "item_id", f"{source}_rank", *keep)
    )


def _exclude(frame: pl.DataFrame, consumed: pl.DataFrame | None) -> pl.DataFrame:
    return frame if consumed is None else frame.join(consumed, on=["user_id", "item_id"], how="anti")


def _global_top(
    items: pl.DataFrame,
    users: pl.DataFrame,
    score: str,
    source: str,
    limit: int,
    consumed: pl.DataFrame | None,
    pool: int,
) -> pl.DataFrame:
    """Top items of a global ordering, per user, after removing what each user consumed."""
    top = items.sort([score, "item_id"], descending=[True, False]).head(pool).select("item_id", score)
    return _ranked(_exclude(users.join(top, how="cross"), consumed), score, source, limit)


def generate_candidates(tables: SnapshotTables, users: pl.Series, config: CandidateConfig) -> pl.DataFrame:
    """Union of every source's candidates per user, tagged with each source's rank (null if absent)."""
    user_frame = pl.DataFrame({"user_id": users.cast(pl.Int64).unique().sort()})
    history = tables.user_item_history.join(user_frame, on="user_id")
    consumed = history.select("user_id", "item_id") if config.exclude_consumed else None
    items = tables.item_features

    recent = (
        history.sort(["user_id", "days_since_last_event", "events", "item_id"], descending=[False, False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(config.recent_items)
        .select("user_id", "item_id")
    )
    cooc = (
        recent.join(tables.item_neighbours.select("item_id", "neighbour_id", "score"), on="item_id")
        .group_by("user_id", pl.col("neighbour_id").alias("item_id_n"))
        .agg(pl.col("score").sum().alias("cooc_score"), pl.col("score").max().alias("cooc_max"))
        .rename({"item_id_n": "item_id"})
    )
    cooc_ranked = _ranked(_exclude(cooc, consumed), "cooc_score", "cooc", config.cooc, ("cooc_score", "cooc_max"))

    pool = max(config.pop, config.new) * 4
    pop = _global_top(
        items.with_columns(-pl.col("popularity_rank_4w").alias("pop_score")),
        user_frame,
        "pop_score",
        "pop",
        config.pop,
        consumed,
        pool + config.pop,
    )
    new_items = items.filter(pl.col("days_since_release") < config.new_release_days)
    new = _global_top(new_items, user_frame, "plays_1w", "new", config.new, consumed, pool)

    def by_affinity(affinity: pl.DataFrame, column: str, source: str, limit: int) -> pl.DataFrame:
        favourite = (
            affinity.join(user_frame, on="user_id")
            .sort(["user_id", "share_12w", column], descending=[False, True, False])
            .group_by("user_id", maintain_order=True)
            .head(5)
        )
        per_key = (
            items.sort(["plays_4w", "item_id"], descending=[True, False])
            .group_by(column, maintain_order=True)
            .head(limit)
            .select(column, "item_id", "plays_4w")
        )
        joined = (
            favourite.select("user_id", column, "share_12w")
            .join(per_key, on=column)
            .with_columns((pl.col("share_12w") * (pl.col("plays_4w") + 1).log()).alias(f"{source}_score"))
        )
        return _ranked(_exclude(joined, consumed), f"{source}_score", source, limit)

    category = by_affinity(tables.user_category_affinity, "category", "category", config.category)
    creator = by_affinity(tables.user_creator_affinity, "creator", "creator", config.creator)

    tagged = pl.concat([cooc_ranked, pop, new, category, creator], how="diagonal")
    # One group-by merges the sources: each column is non-null in exactly one source's rows.
    merged = tagged.group_by("user_id", "item_id").agg(pl.all().drop_nulls().first())
    return merged.select(
        "user_id",
        "item_id",
        *[f"{s}_rank" for s in SOURCES],
        "cooc_score",
        "cooc_max",
        pl.sum_horizontal(pl.col(f"{s}_rank").is_not_null() for s in SOURCES).alias("n_sources"),
    ).sort("user_id", "item_id")


_USER_COLUMNS = [c for c in contracts.USER_FEATURES.column_names if c not in ("as_of", "user_id")]
_ITEM_COLUMNS = [
    c for c in contracts.ITEM_FEATURES.column_names if c not in ("as_of", "item_id", "category", "creator")
]
# Prefixed, because user and item tables share column names (days_since_first_event).
USER_FEATURE_COLUMNS = [f"user_{c}" for c in _USER_COLUMNS]
ITEM_FEATURE_COLUMNS = [f"item_{c}" for c in _ITEM_COLUMNS]
CANDIDATE_COLUMNS = [f"{s}_rank" for s in SOURCES] + ["cooc_score", "cooc_max", "n_sources"]
USER_ITEM_COLUMNS = ["category_share_12w", "creator_share_12w", "creator_events_12w", "category_code"]
FEATURE_NAMES = CANDIDATE_COLUMNS + USER_FEATURE_COLUMNS + ITEM_FEATURE_COLUMNS + USER_ITEM_COLUMNS
CATEGORICAL_FEATURES = ["category_code"]


def category_encoding(item_features: pl.DataFrame) -> list[str]:
    """The fixed, sorted category list whose positions are the codes the model sees."""
    return sorted(item_features.get_column("category").unique().to_list())


def add_features(tables: SnapshotTables, candidates: pl.DataFrame, categories: list[str]) -> pl.DataFrame:
    """Join user, item and user×item features onto candidate rows; unknown categories get null."""
    codes = pl.DataFrame(
        {"category": categories, "category_code": range(len(categories))},
        schema={"category": pl.Utf8, "category_code": pl.Int32},
    )
    users = tables.user_features.select("user_id", *[pl.col(c).alias(f"user_{c}") for c in _USER_COLUMNS])
    items = tables.item_features.select(
        "item_id", "category", "creator", *[pl.col(c).alias(f"item_{c}") for c in _ITEM_COLUMNS]
    )
    return (
        candidates.join(users, on="user_id", how="left")
        .join(items, on="item_id", how="left")
        .join(codes, on="category", how="left")
        .join(
            tables.user_category_affinity.select(
                "user_id", "category", pl.col("share_12w").alias("category_share_12w")
            ),
            on=["user_id", "category"],
            how="left",
        )
        .join(
            tables.user_creator_affinity.select(
                "user_id",
                "creator",
                pl.col("share_12w").alias("creator_share_12w"),
                pl.col("events_12w").alias("creator_events_12w"),
            ),
            on=["user_id", "creator"],
            how="left",
        )
        .with_columns(
            pl.col("category_share_12w", "creator_share_12w").fill_null(0.0),
            pl.col("creator_events_12w").fill_null(0),
        )
        .select("user_id", "item_id", *FEATURE_NAMES)
        .sort("user_id", "item_id")
    )


def build_ranking_frame(
    tables: SnapshotTables, users: pl.Series, config: CandidateConfig, categories: list[str]
) -> pl.DataFrame:
    """Candidates for `users` with every model feature: the frame training and inference both score."""
    return add_features(tables, generate_candidates(tables, users, config), categories)
