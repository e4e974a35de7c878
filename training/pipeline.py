"""Training-week planning, labelled frames, model and baseline evaluation: pure functions.

Used by the training flow and by the weekly backtest (`recsys evaluate`), so both
compute numbers in exactly the same way.
"""

from dataclasses import dataclass
from datetime import date, timedelta

import lightgbm as lgb
import polars as pl

from training import baselines, metrics
from training.candidates import CandidateConfig, SnapshotTables, build_ranking_frame
from training.ranker import attach_labels, score, top_n

BASELINES = ("recent_popular", "all_time_popular", "item_knn")


@dataclass(frozen=True)
class WeekPlan:
    """Which labelled snapshots train, validate and evaluate a model trained at `as_of`."""

    as_of: date
    train: list[date]
    validation: date
    holdout: date


def plan_weeks(labelled: list[date], as_of: date, training_weeks: int) -> WeekPlan:
    """Latest labelled week before `as_of` is the holdout, the one before validates,
    up to `training_weeks` earlier ones train. Only weeks whose labels are complete count."""
    usable = sorted(d for d in set(labelled) if d + timedelta(days=7) <= as_of)
    if len(usable) < 3:
        raise ValueError(
            f"training as of {as_of} needs at least 3 labelled feature snapshots before it "
            f"(train, validation, holdout); found {len(usable)}: {[str(d) for d in usable]}. "
            f"Run the feature flow for earlier weeks first (recsys features --from ... --to ...)"
        )
    return WeekPlan(as_of=as_of, train=usable[-2 - training_weeks : -2], validation=usable[-2], holdout=usable[-1])


def labelled_users(labels: pl.DataFrame, tables: SnapshotTables) -> pl.Series:
    """Users with at least one new item that week and some history before it."""
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
    return truth.get_column("user_id").unique().sort()


def labelled_frame(
    tables: SnapshotTables, labels: pl.DataFrame, as_of: date, config: CandidateConfig, categories: list[str]
) -> pl.DataFrame:
    """The ranking frame of one week with its labels, for training or validation."""
    users = labelled_users(labels, tables)
    return attach_labels(build_ranking_frame(tables, users, config, categories), labels, as_of)


def recommend_with_model(
    booster: lgb.Booster,
    feature_names: list[str],
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    categories: list[str],
    n: int,
) -> pl.DataFrame:
    """Top-n (user_id, item_id, rank) by the model over the shared candidate frame."""
    frame = build_ranking_frame(tables, users, config, categories)
    return top_n(score(booster, frame, feature_names), n)


def recommend_baselines(
    tables: SnapshotTables, users: pl.Series, k: int, *, exclude_consumed: bool = True
) -> dict[str, pl.DataFrame]:
    """Every baseline's top-k for `users`, named as in reports."""
    history = tables.user_item_history
    return {
        "recent_popular": baselines.recommend_recent_popular(
            tables.item_features, history, users, k, exclude_consumed=exclude_consumed
        ),
        "all_time_popular": baselines.recommend_all_time_popular(
            tables.item_features, history, users, k, exclude_consumed=exclude_consumed
        ),
        "item_knn": baselines.recommend_item_knn(
            tables.item_neighbours,
            history,
            users,
            k,
            item_features=tables.item_features,
            exclude_consumed=exclude_consumed,
        ),  # fmt: skip
    }


def evaluate_recommenders(
    recs: dict[str, pl.DataFrame], labels: pl.DataFrame, tables: SnapshotTables, k: int
) -> dict[str, dict[str, float]]:
    """Metrics of each named recommender on the same week's truth and catalogue."""
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
    n_catalogue = max(tables.item_features.height, 1)
    return {name: metrics.rank_metrics(frame, truth, k=k, n_catalogue=n_catalogue) for name, frame in recs.items()}


def best_baseline(results: dict[str, dict[str, float]], metric: str) -> tuple[str, dict[str, float]]:
    """The baseline with the highest `metric` among the reported ones."""
    name = max((n for n in BASELINES if n in results), key=lambda n: results[n][metric])
    return name, results[name]
