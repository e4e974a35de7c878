"""A model, the champion and the baselines on one evaluated week, and the recall of the candidates.

Used by the training flow and by the weekly backtest (`recsys evaluate`), so both compute
numbers in exactly the same way.
"""

import logging
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import polars as pl

from features.collaborative import CollaborativeConfig
from ranking import baselines, metrics
from ranking.candidates import (
    SOURCES,
    CandidateConfig,
    SnapshotTables,
    build_ranking_frame,
    candidate_rows,
    with_stored_counts,
)
from ranking.registry import ModelRecord
from ranking.scoring import ScoringModel, compile_booster, recommend_with_model, timed, user_batches
from training.frames import labelled_users
from training.ranker import TrainedRanker

BASELINES = baselines.NAMES
RECALL_KEYS = ("all", *SOURCES)
# Salt of the holdout users' hash sample: fixed, so every run, recommender and process draws the same users.
HOLDOUT_SALT = 0x5EED_0F_9A7E

log = logging.getLogger(__name__)


def user_hash(user_ids: pl.Series, salt: int = HOLDOUT_SALT) -> np.ndarray:
    """A stable 64-bit hash of each user id (splitmix64's finaliser of id XOR salt): the same on every
    machine, process and library version, unlike Python's `hash()` or polars' `Series.hash`. It is a
    bijection of the 64-bit ids, so distinct users never tie."""
    x = user_ids.cast(pl.Int64).to_numpy().astype(np.uint64) ^ np.uint64(salt)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_holdout_users(users: pl.Series, limit: int | None) -> pl.Series:
    """The `limit` users of `users` with the smallest `user_hash` (all of them when there are no more),
    sorted: a sample that depends only on the set of users, not on their order or on the run.

    A user sampled from a set stays sampled from any subset holding it, so reading only the sampled
    users' rows and sampling again gives the same users."""
    users = users.cast(pl.Int64).unique().sort()
    if limit is None or users.len() <= limit:
        return users
    if limit < 1:
        raise ValueError(f"sample_holdout_users: limit must be >= 1, got {limit}")
    smallest = np.argpartition(user_hash(users), limit - 1)[:limit]
    return users.gather(np.sort(smallest))


@dataclass(frozen=True)
class WeekEvaluation:
    """Every recommender's metrics on one evaluated week, and the candidates' recall there.

    `per_user` holds one row per evaluated user: user_id and each recommender's NDCG@k
    (a column per name in `metrics`), the units the promotion gate resamples.
    """

    metrics: dict[str, dict[str, float]]
    candidate_recall: dict[str, float]
    per_user: pl.DataFrame


def evaluate_model(
    model: TrainedRanker,
    categories: list[str],
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    k: int,
    *,
    champion: tuple[lgb.Booster, ModelRecord] | None = None,
    collaborative: CollaborativeConfig,
    batch_users: int,
    max_users: int | None = None,
) -> WeekEvaluation:
    """`evaluate_week` of a freshly trained model (with its category encoding) and the registry's champion."""
    # Compiled to native code when the week has enough users to pay for it (the same scores).
    users = labels.get_column("user_id").n_unique()
    users = users if max_users is None else min(users, max_users)
    rows = candidate_rows(users, config)
    booster = compile_booster(lgb.Booster(model_str=model.model_text), rows=rows)
    scoring = ScoringModel(booster, model.feature_names, categories)
    held = None
    if champion is not None:
        booster, record = champion
        held = ScoringModel(
            compile_booster(booster, rows=rows),
            record.feature_names,
            record.encodings["category"],
            with_stored_counts(config, record.params),
        )
    return evaluate_week(
        scoring, tables, labels, config, k, champion=held, collaborative=collaborative, batch_users=batch_users,
        max_users=max_users,
    )  # fmt: skip


def evaluate_week(
    model: ScoringModel,
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    k: int,
    *,
    champion: ScoringModel | None = None,
    collaborative: CollaborativeConfig,
    batch_users: int,
    max_users: int | None = None,
    steps: dict[str, float] | None = None,
) -> WeekEvaluation:
    """The model, the baselines and the champion (if any) on the same evaluated users,
    truth and catalogue of one week, with the recall of the model's candidates.

    The evaluated users are at most `max_users` of the week's labelled users (`sample_holdout_users`,
    all when None or fewer); `tables` may hold only theirs. EASE's and ALS's lists come from the
    snapshot's `collaborative_scores` table (`collaborative_baselines`). Users are scored
    `batch_users` at a time; only their top-k lists are kept. `steps` adds each step's seconds
    (frame, predict, top_n, baselines, recall, metrics).
    """
    users = sample_holdout_users(labelled_users(labels, tables), max_users)
    fitted = collaborative_baselines(tables, config, collaborative, k)
    truth = metrics.evaluation_truth(labels, users)
    parts: dict[str, list[pl.DataFrame]] = {}
    recall: list[dict[str, float]] = []
    for batch in user_batches(users, batch_users) or [users]:  # no users: empty results, zero recall
        with timed(steps, "frame"):
            frame = build_ranking_frame(tables, batch, config, model.categories)
        recs = {"model": _recommend(model, tables, batch, config, k, frame, steps)}
        with timed(steps, "baselines"):
            recs |= recommend_baselines(tables, batch, k, config, fitted)
        if champion is not None:
            held_config = champion.config or config
            same = champion.categories == model.categories and held_config == config
            recs["champion"] = _recommend(champion, tables, batch, held_config, k, frame if same else None, steps)
        for name, top in recs.items():
            parts.setdefault(name, []).append(top)
        with timed(steps, "recall"):
            batch_truth = truth.join(batch.to_frame("user_id"), on="user_id", how="semi")
            recall.append(candidate_recall(frame, batch_truth) | {"users": batch.len()})
        del frame  # the batch's candidate frame is the largest object here: never two batches' at once
    with timed(steps, "metrics"):
        recs = {name: pl.concat(frames) for name, frames in parts.items()}
        per_user = truth.select("user_id").unique().sort("user_id")
        for name, top in recs.items():
            per_user = per_user.join(metrics.per_user_ndcg(top, truth, k).rename({"ndcg": name}), on="user_id")
        return WeekEvaluation(
            evaluate_recommenders(recs, truth, k, n_catalogue=tables.item_features.height),
            combine_batches_recall(recall),
            per_user,
        )


def collaborative_baselines(
    tables: SnapshotTables, config: CandidateConfig, collaborative: CollaborativeConfig, k: int
) -> dict[str, baselines.CollaborativeLists]:
    """EASE's and ALS's top-k source for `baselines.recommend`, by name.

    With consumed items excluded, the snapshot's `collaborative_scores` table: the feature flow fitted
    both on the same history with the same settings and kept each user's top unconsumed items, so a
    gate week reads its users' lists instead of refitting ALS (and EASE) on every user; a model the
    table lacks (EASE above its catalogue bound) is left out, as `fit_collaborative` leaves it out.
    The table cannot serve consumed items (`exclude_consumed` off), nor lists longer than it keeps:
    then the model is fitted on the history in `tables` (logged).
    """
    stored = baselines.stored_collaborative(tables.collaborative_scores) if config.exclude_consumed else {}
    short = [n for n, lists in stored.items() if lists.depth < k]
    if config.exclude_consumed and not short:
        return stored
    names = short if config.exclude_consumed else list(baselines.COLLABORATIVE)
    log.info("%s fitted on the snapshot's history, not read from collaborative_scores", ", ".join(names))
    refitted = baselines.fit_collaborative(tables.user_item_history, collaborative, names=names)
    return {n: lists for n, lists in stored.items() if n not in short} | refitted


def _recommend(
    model: ScoringModel,
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    k: int,
    frame: pl.DataFrame | None,
    steps: dict[str, float] | None = None,
) -> pl.DataFrame:
    return recommend_with_model(
        model.booster, model.feature_names, tables, users, config, model.categories, k, frame=frame, steps=steps
    )


def recommend_baselines(
    tables: SnapshotTables,
    users: pl.Series,
    k: int,
    config: CandidateConfig,
    fitted: dict[str, baselines.CollaborativeLists],
) -> dict[str, pl.DataFrame]:
    """Every baseline's top-k for `users`, named as in reports: consumed items and recent items as the
    candidates; EASE and ALS from `fitted` (`collaborative_baselines`), left out when absent."""
    names = [n for n in BASELINES if n not in baselines.COLLABORATIVE or n in fitted]
    return {name: baselines.recommend(name, tables, users, k, config, fitted) for name in names}


def evaluate_recommenders(
    recs: dict[str, pl.DataFrame], truth: pl.DataFrame, k: int, *, n_catalogue: int
) -> dict[str, dict[str, float]]:
    """Metrics of each named recommender on the same evaluated users' `truth` (`metrics.evaluation_truth`)
    and a catalogue of `n_catalogue` items (at least 1 counted)."""
    n_catalogue = max(n_catalogue, 1)
    return {name: metrics.rank_metrics(frame, truth, k=k, n_catalogue=n_catalogue) for name, frame in recs.items()}


def candidate_recall(frame: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    """Share of the truth (user, item) pairs found among the candidates, overall and per source.

    `frame` is a ranking frame (one `<source>_rank` column per source, null when the source
    did not propose the item); `truth_items` counts the pairs, for averaging over weeks.
    """
    truth = truth.select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64)).unique()
    found = truth.join(
        frame.select("user_id", "item_id", *[f"{s}_rank" for s in SOURCES]), on=["user_id", "item_id"], how="inner"
    )
    n = truth.height
    share = {"all": found.height / n if n else 0.0}
    share |= {s: (found.get_column(f"{s}_rank").is_not_null().sum() / n if n else 0.0) for s in SOURCES}
    per_user = frame.height / max(frame.get_column("user_id").n_unique(), 1)
    return share | {"truth_items": n, "candidates_per_user": per_user}


def combine_recall(per_week: list[dict[str, float]]) -> dict[str, float]:
    """Candidate recall over several weeks, each week weighted by its number of truth pairs."""
    if not per_week:
        raise ValueError("combine_recall: no weekly recall to combine")
    total = sum(w["truth_items"] for w in per_week)
    combined = {key: sum(w[key] * w["truth_items"] for w in per_week) / total if total else 0.0 for key in RECALL_KEYS}
    per_user = sum(w["candidates_per_user"] for w in per_week) / len(per_week)
    return combined | {"truth_items": total, "candidates_per_user": per_user}


def combine_batches_recall(batches: list[dict[str, float]]) -> dict[str, float]:
    """Candidate recall of one week from its user batches: shares weighted by truth pairs, candidates by users."""
    combined = combine_recall(batches)
    users = sum(b["users"] for b in batches)
    per_user = sum(b["candidates_per_user"] * b["users"] for b in batches) / users if users else 0.0
    return combined | {"candidates_per_user": per_user}
