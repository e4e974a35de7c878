"""Scoring with a trained ranker: the feature matrix, scores, top-N, and the model check inference needs."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import polars as pl

from ranking.candidates import FEATURE_NAMES, PRIOR_FEATURE, CandidateConfig, SnapshotTables, build_ranking_frame
from recsys.errors import ExpectedError

TIE_BREAK = "item_popularity_rank_4w"


@dataclass(frozen=True)
class ScoringModel:
    """A booster with the feature names and category encoding it was trained with, and the candidate
    counts it was trained on (None: whatever the caller's config gives)."""

    booster: lgb.Booster
    feature_names: list[str]
    categories: list[str]
    config: CandidateConfig | None = None


class IncompatibleModelError(ExpectedError, ValueError):
    """The champion needs features or encodings that this code and snapshot cannot provide."""


def user_batches(users: pl.Series | list[int], size: int) -> list:
    """`users` (a Series or a list) in consecutive batches of at most `size`, in order; none if empty."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [users[start : start + size] for start in range(0, len(users), size)]


@contextmanager
def timed(steps: dict[str, float] | None, step: str) -> Iterator[None]:
    """Add the seconds the block takes to `steps[step]`; nothing when `steps` is None (a profile is optional)."""
    if steps is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        steps[step] = steps.get(step, 0.0) + time.perf_counter() - started


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
    # Only the ordering columns travel through the sort (the scored frame has ~50), and only
    # rows that can be in a top n: those with fewer than n better scores in their user (ties
    # kept, so the tie-breaks below still decide). Sorting every row with every column took
    # ~4% of scoring, this ~1% (benchmarks/README.md, scoring steps).
    keys = scored.select("user_id", score_column, *dict.fromkeys([*tie_breaks, "item_id"]))
    if _orderable(keys.get_column(score_column)):
        keys = keys.filter(pl.col(score_column).rank("min", descending=True).over("user_id") <= n)
    return (
        keys.sort(["user_id", score_column, *tie_breaks], descending=[False, True, *[False] * len(tie_breaks)])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
        .filter(pl.col("rank") <= n)
        .select("user_id", "item_id", "rank")
    )


def _orderable(scores: pl.Series) -> bool:
    """Whether ranking the scores orders them as the sort does: no nulls, no NaN (the sort puts both first)."""
    if scores.null_count():
        return False
    return not (scores.dtype.is_float() and scores.is_nan().any())


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
    steps: dict[str, float] | None = None,
) -> pl.DataFrame:
    """Top-n (user_id, item_id, rank) by the model over the shared candidate frame.

    Pass `frame` when the ranking frame of these users was already built with the same
    config and categories; `steps` adds each step's seconds (frame, predict, top_n).
    """
    if frame is None:
        with timed(steps, "frame"):
            frame = build_ranking_frame(tables, users, config, categories)
    with timed(steps, "predict"):
        scored = score(booster, frame, feature_names)
    with timed(steps, "top_n"):
        return top_n(scored, n)


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
