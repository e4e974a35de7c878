"""Batch scoring: the champion ranks the shared candidate frame of each user partition."""

import lightgbm as lgb
import numpy as np
import polars as pl

from ranking.candidates import CandidateConfig, SnapshotTables, build_ranking_frame
from ranking.scoring import score, top_n

# Users scored together: bounds a task's memory (about 250 candidate rows of ~30 features each).


def partition_users(user_ids: pl.Series, partitions: int) -> list[list[int]]:
    """Split users into `partitions` groups by a fixed multiplicative hash of the id."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    ids = np.sort(user_ids.cast(pl.Int64).unique().to_numpy())
    # Knuth's multiplicative hash spreads consecutive ids; stable across processes and versions.
    bucket = ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(partitions)
    return [ids[bucket == p].tolist() for p in range(partitions)]


def recommend_users(
    booster: lgb.Booster,
    feature_names: list[str],
    categories: list[str],
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    n: int,
) -> pl.DataFrame:
    """Each user's top-n item ids as one list per user (user_id, items), best first.

    Users without any candidate (e.g. every item already consumed) get no row.
    """
    ranked = top_n(score(booster, build_ranking_frame(tables, users, config, categories), feature_names), n)
    return ranked.sort("user_id", "rank").group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("items"))


def fallback_items(item_features: pl.DataFrame, n: int) -> list[int]:
    """The list for users without personal recommendations: recent popularity, ties by item id."""
    return item_features.sort("popularity_rank_4w", "item_id").head(n).get_column("item_id").to_list()
