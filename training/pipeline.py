"""Training-week planning, labelled frames, model and baseline evaluation: pure functions.

Used by the training flow and by the weekly backtest (`recsys evaluate`), so both
compute numbers in exactly the same way.
"""

from dataclasses import dataclass
from datetime import date, timedelta

import polars as pl

from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, build_ranking_frame
from ranking.scoring import ScoringModel, recommend_with_model, user_batches
from training import baselines, metrics
from training.ranker import attach_labels, sample_negatives

BASELINES = ("recent_popular", "all_time_popular", "item_knn")
RECALL_KEYS = ("all", *SOURCES)
NEGATIVES_PER_USER = 50
BATCH_USERS = 5_000  # users whose candidate frame is built at once (training, evaluation)


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
    negatives_per_user: int = NEGATIVES_PER_USER,
    seed: int = 42,
    max_users: int | None = None,
    batch_users: int = BATCH_USERS,
) -> pl.DataFrame:
    """The ranking frame of one week with its labels and sampled negatives, for training or validation.

    At most `max_users` labelled users (a fixed-seed sample), built `batch_users` at a time:
    memory follows the batch and the kept rows, not the week's candidate count. Negatives
    are drawn per user, so batching does not change the result.
    """
    users = sample_users(labelled_users(labels, tables), max_users, seed)
    parts = []
    for batch in user_batches(users, batch_users) or [users]:  # no users: one empty, well-typed frame
        labelled = attach_labels(build_ranking_frame(tables, batch, config, categories), labels, as_of)
        parts.append(sample_negatives(labelled, negatives_per_user, seed))
    return pl.concat(parts)


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


@dataclass(frozen=True)
class WeekEvaluation:
    """Every recommender's metrics on one evaluated week, and the candidates' recall there."""

    metrics: dict[str, dict[str, float]]
    candidate_recall: dict[str, float]


def evaluate_week(
    model: ScoringModel,
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    k: int,
    *,
    champion: ScoringModel | None = None,
    batch_users: int = BATCH_USERS,
) -> WeekEvaluation:
    """The model, the baselines and the champion (if any) on the same evaluated users,
    truth and catalogue of one week, with the recall of the model's candidates.

    Users are scored `batch_users` at a time; only their top-k lists are kept.
    """
    users = labelled_users(labels, tables)
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
    parts: dict[str, list[pl.DataFrame]] = {}
    recall: list[dict[str, float]] = []
    for batch in user_batches(users, batch_users) or [users]:  # no users: empty results, zero recall
        frame = build_ranking_frame(tables, batch, config, model.categories)
        recs = {"model": _recommend(model, tables, batch, config, k, frame)}
        recs |= recommend_baselines(tables, batch, k, exclude_consumed=config.exclude_consumed)
        if champion is not None:
            same_frame = frame if champion.categories == model.categories else None
            recs["champion"] = _recommend(champion, tables, batch, config, k, same_frame)
        for name, top in recs.items():
            parts.setdefault(name, []).append(top)
        batch_truth = truth.join(batch.to_frame("user_id"), on="user_id", how="semi")
        recall.append(candidate_recall(frame, batch_truth) | {"users": batch.len()})
    recs = {name: pl.concat(frames) for name, frames in parts.items()}
    return WeekEvaluation(evaluate_recommenders(recs, labels, tables, k), combine_batches_recall(recall))


def combine_batches_recall(batches: list[dict[str, float]]) -> dict[str, float]:
    """Candidate recall of one week from its user batches: shares weighted by truth pairs, candidates by users."""
    combined = combine_recall(batches)
    users = sum(b["users"] for b in batches)
    per_user = sum(b["candidates_per_user"] * b["users"] for b in batches) / users if users else 0.0
    return combined | {"candidates_per_user": per_user}


def _recommend(
    model: ScoringModel,
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    k: int,
    frame: pl.DataFrame | None,
) -> pl.DataFrame:
    return recommend_with_model(
        model.booster, model.feature_names, tables, users, config, model.categories, k, frame=frame
    )


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
