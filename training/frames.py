"""A week's labelled training rows: which users, which candidates, which negatives."""

from datetime import date

import polars as pl

from ranking import metrics
from ranking.candidates import CandidateConfig, SnapshotTables, build_ranking_frame
from ranking.scoring import user_batches
from training.ranker import attach_labels, sample_negatives


def labelled_users(labels: pl.DataFrame, known: SnapshotTables | pl.DataFrame | pl.Series) -> pl.Series:
    """Users with at least one new item that week and some history before it, sorted: `known` is the
    week's tables or only the ids of its users with history (the user features' user_id)."""
    if isinstance(known, SnapshotTables):
        known = known.user_features.select("user_id")
    return metrics.evaluation_truth(labels, known).get_column("user_id").unique().sort()


def sample_users(users: pl.Series, limit: int | None, seed: int) -> pl.Series:
    """At most `limit` of `users` (all if None), drawn by a fixed-seed hash: the same users every run, sorted."""
    if limit is None or users.len() <= limit:
        return users
    return users.gather(users.hash(seed).arg_sort().head(limit)).sort()


def labelled_frame(
    tables: SnapshotTables,
    labels: pl.DataFrame,
    as_of: date,
    config: CandidateConfig,
    categories: list[str],
    *,
    negatives_per_user: int,
    seed: int,
    max_users: int | None,
    batch_users: int,
) -> pl.DataFrame:
    """The ranking frame of one week with its labels and sampled negatives, for training or validation.

    At most `max_users` labelled users (a fixed-seed sample), built `batch_users` at a time:
    memory follows the batch and the kept rows, not the week's candidate count. Negatives
    are drawn per user, so batching does not change the result.
    """
    users = sample_users(labelled_users(labels, tables), max_users, seed)
    parts = []
    for batch in user_batches(users, batch_users) or [users]:  # no users: one empty, well-typed frame
        # Released before the next batch's is built: never two batches' whole candidate frames at once.
        labelled = attach_labels(build_ranking_frame(tables, batch, config, categories), labels, as_of)
        parts.append(sample_negatives(labelled, negatives_per_user, seed))
        del labelled
    return pl.concat(parts)
