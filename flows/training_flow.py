"""Training flow: labelled snapshots → LightGBM ranker → evaluated against baselines → registry."""

import logging
from dataclasses import asdict
from datetime import date, timedelta
from importlib.metadata import version as package_version

import lightgbm as lgb
import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from features import contracts, store
from flows import configs
from flows.common import IO, PURE, current_run_id, resolve_as_of, run_name
from ranking import registry
from ranking.candidates import CandidateConfig, SnapshotTables, category_encoding
from ranking.scoring import ScoringModel
from recsys.settings import Settings
from recsys.stores import open_stores
from training import pipeline
from training.promotion import decide_promotion
from training.ranker import RankerParams, TrainedRanker, train_ranker

log = logging.getLogger(__name__)


@task(**IO)
def plan_training(engine, as_of: date, training_weeks: int) -> pipeline.WeekPlan:
    """Pick the holdout, validation and training weeks among passed labelled snapshots."""
    features = set(store.passed_as_ofs(engine, contracts.USER_FEATURES.name))
    labelled = [d for d in store.passed_as_ofs(engine, contracts.LABELS.name) if d in features]
    plan = pipeline.plan_weeks(labelled, as_of, training_weeks)
    if (stale := staleness(plan)) is not None:
        log.warning(stale)
    return plan


def staleness(plan: pipeline.WeekPlan) -> str | None:
    """A warning when the newest labelled week is older than the week that closed at `as_of`."""
    expected = plan.as_of - timedelta(weeks=1)
    if plan.holdout >= expected:
        return None
    return (
        f"the newest labelled snapshot is {plan.holdout}, older than the expected {expected} "
        f"({(expected - plan.holdout).days // 7} week(s) behind): training on what the feature flow last "
        f"produced that passed; run the feature flow as of {plan.as_of} to catch up"
    )


@task(**IO)
def load_snapshot(engine, as_of: date, user_ids: list[int] | None = None) -> SnapshotTables:
    """The six feature tables of one passed snapshot (user tables optionally for some users)."""
    frames = {}
    for contract in contracts.FEATURE_TABLES:
        users = user_ids if "user_id" in contract.key else None
        frames[contract.name] = store.read_table(engine, contract.name, as_of, user_ids=users)
    return SnapshotTables.from_frames(frames)


@task(**IO)
def load_item_features(engine, as_of: date) -> pl.DataFrame:
    return store.read_table(engine, contracts.ITEM_FEATURES.name, as_of)


@task(**IO)
def load_labels(engine, as_of: date) -> pl.DataFrame:
    return store.read_table(engine, contracts.LABELS.name, as_of)


@task(**IO)
def build_training_frame(
    engine, week: date, config: CandidateConfig, categories: list[str], settings: Settings
) -> pl.DataFrame:
    """One labelled week: candidates of (a sample of) its labelled users, with features and next-week labels."""
    return pipeline.labelled_frame(
        load_snapshot.fn(engine, week), load_labels.fn(engine, week), week, config, categories,
        negatives_per_user=settings.negatives_per_user, seed=settings.seed,
        max_users=settings.training_users_per_week, batch_users=settings.score_batch_users,
    )  # fmt: skip


@task(**PURE)
def fit_ranker(train: pl.DataFrame, valid: pl.DataFrame, params: RankerParams) -> TrainedRanker:
    return train_ranker(train, valid, params)


@task(**PURE)
def evaluate_on_holdout(
    model: TrainedRanker,
    champion: tuple[lgb.Booster, registry.ModelRecord] | None,
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    categories: list[str],
    k: int,
    batch_users: int,
) -> pipeline.WeekEvaluation:
    """Model, champion and baselines on the same holdout users (all of them, in batches), truth and catalogue."""
    scoring = ScoringModel(lgb.Booster(model_str=model.model_text), model.feature_names, categories)
    held = None
    if champion is not None:
        booster, record = champion
        held = ScoringModel(booster, record.feature_names, record.encodings["category"])
    return pipeline.evaluate_week(scoring, tables, labels, config, k, champion=held, batch_users=batch_users)


@task(**IO)
def load_champion(engine, name: str) -> tuple[lgb.Booster, registry.ModelRecord] | None:
    if registry.get_champion(engine, name) is None:
        return None
    return registry.load_model(engine, name)


@task(**IO)
def register_and_gate(
    engine,
    settings: Settings,
    model: TrainedRanker,
    plan: pipeline.WeekPlan,
    evaluation: pipeline.WeekEvaluation,
    lineage: dict,
) -> tuple[int, dict]:
    """Register the model with its lineage and, only if it passes the gate, as champion (one transaction)."""
    metric = f"ndcg@{settings.eval_k}"
    results = evaluation.metrics
    baseline_name, baseline = pipeline.best_baseline(results, metric)
    decision = decide_promotion(
        results["model"], results.get("champion"), baseline, metric=metric,
        margin=settings.promotion_margin, baseline_name=baseline_name,
    )  # fmt: skip
    version = registry.register_model(
        engine,
        name=settings.model_name,
        model_text=model.model_text,
        feature_names=model.feature_names,
        encodings={"category": lineage["categories"]},
        params=model.params | {"best_iteration": model.best_iteration, "candidates": lineage["candidates"]},
        metrics=results | {"candidate_recall": evaluation.candidate_recall},
        as_of=plan.as_of,
        training_as_ofs=plan.train,
        validation_as_of=plan.validation,
        holdout_as_of=plan.holdout,
        feature_snapshots=lineage["digests"],
        flow_run_id=current_run_id(),
        code_version=package_version("weekly-recs"),
        status="registered" if decision.promote else "rejected",
        decision=decision,
        promote_reason=decision.reason if decision.promote else None,
        actor="training-flow",
    )
    return version, {"promote": decision.promote, "reason": decision.reason}


def metrics_markdown(
    version: int, plan: pipeline.WeekPlan, evaluation: pipeline.WeekEvaluation, decision: dict, k: int
) -> str:
    """The artifact: the decision, every recommender on the holdout, and candidate recall."""
    names = ["recall", "ndcg", "hitrate", "map", "coverage"]
    ndcg = f"ndcg@{k}"
    results = evaluation.metrics
    model = results["model"][ndcg]
    header = "| recommender | " + " | ".join(f"{n}@{k}" for n in names) + " | users | model / this |"
    rows = [
        f"| {who} | " + " | ".join(f"{m[f'{n}@{k}']:.4f}" for n in names)
        + f" | {m['users']} | " + (f"{model / m[ndcg]:.2f}×" if m[ndcg] else "–") + " |"
        for who, m in results.items()
    ]  # fmt: skip
    recall = evaluation.candidate_recall
    keys = list(pipeline.RECALL_KEYS)
    verdict = "promoted to champion" if decision["promote"] else "rejected"
    return "\n".join(
        [
            f"# Model v{version}: {verdict}",
            "",
            decision["reason"],
            "",
            *([f"⚠️ {stale}", ""] if (stale := staleness(plan)) else []),
            f"Holdout week {plan.holdout}; validation {plan.validation}; trained on {', '.join(map(str, plan.train))}",
            "",
            header,
            "|---" * (len(names) + 3) + "|",
            *rows,
            "",
            f"Candidate recall on the holdout ({recall['truth_items']} new items, "
            f"{recall['candidates_per_user']:.0f} candidates per user):",
            "",
            "| " + " | ".join(keys) + " |",
            "|---" * len(keys) + "|",
            "| " + " | ".join(f"{recall[key]:.3f}" for key in keys) + " |",
        ]
    )


@flow(name="training", flow_run_name=run_name("train"), timeout_seconds=3 * 3600)
def training_flow(as_of: date | None = None) -> dict:
    """Train a ranker on past labelled weeks, evaluate it on the latest, register and gate it."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    config = configs.candidate_config(settings)
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        plan = plan_training(stores.engine, as_of, settings.training_weeks)
        # Items never leave the catalogue, so the newest week's categories cover the older weeks'.
        categories = category_encoding(load_item_features(stores.engine, plan.holdout))
        train = pl.concat([build_training_frame(stores.engine, w, config, categories, settings) for w in plan.train])
        valid = build_training_frame(stores.engine, plan.validation, config, categories, settings)
        model = fit_ranker(train, valid, configs.ranker_params(settings))
        del train, valid  # memory holds one week's tables at a time: the training frames go before the holdout
        holdout = load_snapshot(stores.engine, plan.holdout)
        holdout_labels = load_labels(stores.engine, plan.holdout)
        champion = load_champion(stores.engine, settings.model_name)
        evaluation = evaluate_on_holdout(
            model, champion, holdout, holdout_labels, config, categories, settings.eval_k, settings.score_batch_users
        )
        lineage = {
            "categories": categories,
            "candidates": asdict(config),
            "digests": snapshot_digests(stores.engine, [*plan.train, plan.validation, plan.holdout]),
        }
        version, decision = register_and_gate(stores.engine, settings, model, plan, evaluation, lineage)
    create_markdown_artifact(
        key="training-metrics",
        markdown=metrics_markdown(version, plan, evaluation, decision, settings.eval_k),
        description=f"Model v{version} on holdout {plan.holdout}",
    )
    return {
        "version": version,
        "as_of": str(as_of),
        "holdout": str(plan.holdout),
        "training_weeks": [str(w) for w in plan.train],
        "stale_upstream": staleness(plan),
        "metrics": evaluation.metrics,
        "candidate_recall": evaluation.candidate_recall,
        **decision,
    }


def snapshot_digests(engine, weeks: list[date]) -> dict[str, str]:
    """Lineage: the digest of every feature and label table the model was built from."""
    summary = pl.concat([store.snapshot_summary(engine, w).with_columns(pl.lit(w).alias("as_of")) for w in weeks])
    return {f"{r['table_name']}@{r['as_of']}": r["digest"] for r in summary.iter_rows(named=True) if r["passed"]}
