"""Scoring with a trained ranker: the feature matrix, scores, top-N, and the model check inference needs."""

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import polars as pl

from ranking.candidates import FEATURE_NAMES, PRIOR_FEATURE, CandidateConfig, SnapshotTables, build_ranking_frame
from recsys.errors import ExpectedError

TIE_BREAK = "item_popularity_rank_4w"


@dataclass(frozen=True)
class ScoringModel:
    """A booster with the feature names and category encoding it was trained with."""

    booster: lgb.Booster
    feature_names: list[str]
    categories: list[str]


class IncompatibleModelError(ExpectedError, ValueError):
    """The champion needs features or encodings that this code and snapshot cannot provide."""


def user_batches(users: pl.Series | list[int], size: int) -> list:
    """`users` (a Series or a list) in consecutive batches of at most `size`, in order; none if empty."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [users[start : start + size] for start in range(0, len(users), size)]


def feature_matrix(frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray:
    return frame.select(pl.col(feature_names).cast(pl.Float64)).to_numpy()


def prior_scores(frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray | None:
    """The starting score the trees add to, when the model was trained from one."""
    if PRIOR_FEATURE not in feature_names:
        return None
    return frame.get_column(PRIOR_FEATURE).cast(pl.Float64).fill_null(0.0).to_numpy()


def score(booster: lgb.Booster, frame: pl.DataFrame, feature_names: list[str]) -> pl.DataFrame:
    """Add the model's score to every candidate row: its trees plus the prior it was trained from, if any."""
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(f"the candidate frame lacks features the model was trained with: {missing}")
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Float64).alias("score"))
    scores = booster.predict(feature_matrix(frame, feature_names), num_threads=1)
    prior = prior_scores(frame, feature_names)
    return frame.with_columns(pl.Series("score", scores if prior is None else scores + prior))


def top_n(scored: pl.DataFrame, n: int, score_column: str = "score") -> pl.DataFrame:
    """Each user's best `n` items as rows (user_id, item_id, rank).

    Ties in score go to the more popular item (lower `item_popularity_rank_4w`, when the
    frame has it), then to the lower item id: a shallow model scores many items alike,
    and popularity is the best guess among them.
    """
    tie_breaks = [c for c in (TIE_BREAK, "item_id") if c in scored.columns]
    return (
        scored.sort(["user_id", score_column, *tie_breaks], descending=[False, True, *[False] * len(tie_breaks)])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
        .filter(pl.col("rank") <= n)
        .select("user_id", "item_id", "rank")
    )


def recommend_with_model(
    booster: lgb.Booster,
    feature_names: list[str],
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    categories: list[str],
    n: int,
    *,
    frame: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Top-n (user_id, item_id, rank) by the model over the shared candidate frame.

    Pass `frame` when the ranking frame of these users was already built with the same
    config and categories.
    """
    if frame is None:
        frame = build_ranking_frame(tables, users, config, categories)
    return top_n(score(booster, frame, feature_names), n)


def check_model(feature_names: list[str], encodings: dict, model: str) -> None:
    """Refuse a model that needs features or encodings the candidate frame cannot build."""
    missing = [f for f in feature_names if f not in FEATURE_NAMES]
    if missing:
        raise IncompatibleModelError(
            f"model {model} was trained with features this code does not build from a feature "
            f"snapshot: {missing}; retrain it (recsys train) or roll back to a compatible model"
        )
    if not isinstance(encodings.get("category"), list):
        raise IncompatibleModelError(
            f"model {model} has no category encoding (encodings['category']); retrain it (recsys train)"
        )
