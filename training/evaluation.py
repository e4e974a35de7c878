"""A model, the champion and the baselines on one evaluated week, and the recall of the candidates.

Used by the training flow and by the weekly backtest (`recsys evaluate`), so both compute
numbers in exactly the same way.
"""

from dataclasses import dataclass

import lightgbm as lgb
import polars as pl

from features.collaborative import CollaborativeConfig, FittedScorer
from ranking import baselines, metrics
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, build_ranking_frame, with_stored_counts
from ranking.registry import ModelRecord
from ranking.scoring import ScoringModel, recommend_with_model, timed, user_batches
from training.frames import labelled_users
from training.ranker import TrainedRanker

BASELINES = baselines.NAMES
RECALL_KEYS = ("all", *SOURCES)


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
) -> WeekEvaluation:
    """`evaluate_week` of a freshly trained model (with its category encoding) and the registry's champion."""
    scoring = ScoringModel(lgb.Booster(model_str=model.model_text), model.feature_names, categories)
    held = None
    if champion is not None:
        booster, record = champion
        held = ScoringModel(
            booster, record.feature_names, record.encodings["category"], with_stored_counts(config, record.params)
        )
    return evaluate_week(
        scoring, tables, labels, config, k, champion=held, collaborative=collaborative, batch_users=batch_users
    )


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
    steps: dict[str, float] | None = None,
) -> WeekEvaluation:
    """The model, the baselines and the champion (if any) on the same evaluated users,
    truth and catalogue of one week, with the recall of the model's candidates.

    EASE and ALS are fitted once on the week's snapshot; users are scored `batch_users`
    at a time; only their top-k lists are kept. `steps` adds each step's seconds (frame,
    predict, top_n, baselines, recall, metrics).
    """
    users = labelled_users(labels, tables)
    fitted = baselines.fit_collaborative(tables.user_item_history, collaborative)
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
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
    with timed(steps, "metrics"):
        recs = {name: pl.concat(frames) for name, frames in parts.items()}
        per_user = truth.select("user_id").unique().sort("user_id")
        for name, top in recs.items():
            per_user = per_user.join(metrics.per_user_ndcg(top, truth, k).rename({"ndcg": name}), on="user_id")
        return WeekEvaluation(evaluate_recommenders(recs, labels, tables, k), combine_batches_recall(recall), per_user)


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
    tables: SnapshotTables, users: pl.Series, k: int, config: CandidateConfig, fitted: dict[str, FittedScorer]
) -> dict[str, pl.DataFrame]:
    """Every baseline's top-k for `users`, named as in reports: consumed items and recent items as the
    candidates; EASE and ALS from `fitted` (`baselines.fit_collaborative`), left out when not fitted."""
    names = [n for n in BASELINES if n not in baselines.COLLABORATIVE or n in fitted]
    return {name: baselines.recommend(name, tables, users, k, config, fitted) for name in names}


def evaluate_recommenders(
    recs: dict[str, pl.DataFrame], labels: pl.DataFrame, tables: SnapshotTables, k: int
) -> dict[str, dict[str, float]]:
    """Metrics of each named recommender on the same week's truth and catalogue."""
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
    n_catalogue = max(tables.item_features.height, 1)
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
