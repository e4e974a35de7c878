"""Training flow: labelled snapshots → LightGBM ranker → evaluated against baselines → registry."""

import logging
from datetime import date
from importlib.metadata import version as package_version

import lightgbm as lgb
import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from features import contracts, store
from flows.common import IO, PURE, current_run_id, resolve_as_of, run_name
from recsys.settings import Settings
from recsys.stores import open_stores
from training import pipeline, registry
from training.candidates import CandidateConfig, SnapshotTables, category_encoding
from training.promotion import decide_promotion
from training.ranker import RankerParams, TrainedRanker, train_ranker

log = logging.getLogger(__name__)


def candidate_config(settings: Settings) -> CandidateConfig:
    return CandidateConfig(recent_items=settings.recent_items_per_user, exclude_consumed=settings.exclude_consumed)


@task(**IO)
def plan_training(engine, as_of: date, training_weeks: int) -> pipeline.WeekPlan:
    """Pick the holdout, validation and training weeks among passed labelled snapshots."""
    features = set(store.passed_as_ofs(engine, contracts.USER_FEATURES.name))
    labelled = [d for d in store.passed_as_ofs(engine, contracts.LABELS.name) if d in features]
    return pipeline.plan_weeks(labelled, as_of, training_weeks)


@task(**IO)
def load_snapshot(engine, as_of: date, user_ids: list[int] | None = None) -> SnapshotTables:
    """The six feature tables of one passed snapshot (user tables optionally for some users)."""
    frames = {}
    for contract in contracts.FEATURE_TABLES:
        users = user_ids if "user_id" in contract.key else None
        frames[contract.name] = store.read_table(engine, contract.name, as_of, user_ids=users)
    return SnapshotTables.from_frames(frames)


@task(**IO)
def load_labels(engine, as_of: date) -> pl.DataFrame:
    return store.read_table(engine, contracts.LABELS.name, as_of)


@task(**IO)
def build_training_frame(engine, week: date, config: CandidateConfig, categories: list[str], seed: int) -> pl.DataFrame:
    """One labelled week: candidates of its active users, with features and next-week labels."""
    return pipeline.labelled_frame(
        load_snapshot.fn(engine, week), load_labels.fn(engine, week), week, config, categories, seed=seed
    )


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
) -> dict[str, dict[str, float]]:
    """Model, champion and baselines on the same holdout users, truth and catalogue."""
    users = pipeline.labelled_users(labels, tables)
    recs = pipeline.recommend_baselines(tables, users, k, exclude_consumed=config.exclude_consumed)
    booster = lgb.Booster(model_str=model.model_text)
    recs["model"] = pipeline.recommend_with_model(booster, model.feature_names, tables, users, config, categories, k)
    if champion is not None:
        champion_booster, record = champion
        recs["champion"] = pipeline.recommend_with_model(
            champion_booster, record.feature_names, tables, users, config,
            record.encodings["category"], k,
        )  # fmt: skip
    return pipeline.evaluate_recommenders(recs, labels, tables, k)


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
    results: dict,
    categories: list[str],
    digests: dict[str, str],
) -> tuple[int, dict]:
    """Register the model; promote it to champion only if it passes the gate."""
    metric = f"ndcg@{settings.eval_k}"
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
        encodings={"category": categories},
        params=model.params | {"best_iteration": model.best_iteration},
        metrics=results,
        as_of=plan.as_of,
        training_as_ofs=plan.train,
        validation_as_of=plan.validation,
        holdout_as_of=plan.holdout,
        feature_snapshots=digests,
        flow_run_id=current_run_id(),
        code_version=package_version("weekly-recs"),
        status="registered" if decision.promote else "rejected",
        decision=decision,
    )
    if decision.promote:
        registry.promote(engine, settings.model_name, version, reason=decision.reason, actor="training-flow")
    return version, {"promote": decision.promote, "reason": decision.reason}


def metrics_markdown(version: int, plan: pipeline.WeekPlan, results: dict, decision: dict, k: int) -> str:
    names = ["recall", "ndcg", "hitrate", "map", "coverage"]
    header = "| recommender | " + " | ".join(f"{n}@{k}" for n in names) + " | users |"
    rows = [
        f"| {who} | " + " | ".join(f"{m[f'{n}@{k}']:.4f}" for n in names) + f" | {m['users']} |"
        for who, m in results.items()
    ]
    verdict = "promoted to champion" if decision["promote"] else "rejected"
    return (
        f"# Model v{version}: {verdict}\n\n{decision['reason']}\n\n"
        f"Holdout week {plan.holdout}; validation {plan.validation}; trained on {', '.join(map(str, plan.train))}\n\n"
        + "\n".join([header, "|---" * (len(names) + 2) + "|", *rows])
    )


@flow(name="training", flow_run_name=run_name("train"), timeout_seconds=3 * 3600)
def training_flow(as_of: date | None = None) -> dict:
    """Train a ranker on past labelled weeks, evaluate it on the latest, register and gate it."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    config = candidate_config(settings)
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        plan = plan_training(stores.engine, as_of, settings.training_weeks)
        holdout = load_snapshot(stores.engine, plan.holdout)
        holdout_labels = load_labels(stores.engine, plan.holdout)
        # Items never leave the catalogue, so the newest week's categories cover the older weeks'.
        categories = category_encoding(holdout.item_features)
        train = pl.concat(
            [build_training_frame(stores.engine, w, config, categories, settings.seed) for w in plan.train]
        )
        valid = build_training_frame(stores.engine, plan.validation, config, categories, settings.seed)
        model = fit_ranker(train, valid, RankerParams(seed=settings.seed, num_threads=settings.num_threads))
        champion = load_champion(stores.engine, settings.model_name)
        results = evaluate_on_holdout(model, champion, holdout, holdout_labels, config, categories, settings.eval_k)
        digests = snapshot_digests(stores.engine, [*plan.train, plan.validation, plan.holdout])
        version, decision = register_and_gate(stores.engine, settings, model, plan, results, categories, digests)
    create_markdown_artifact(
        key="training-metrics",
        markdown=metrics_markdown(version, plan, results, decision, settings.eval_k),
        description=f"Model v{version} on holdout {plan.holdout}",
    )
    return {"version": version, "as_of": str(as_of), "metrics": results, **decision}


def snapshot_digests(engine, weeks: list[date]) -> dict[str, str]:
    """Lineage: the digest of every feature and label table the model was built from."""
    summary = pl.concat([store.snapshot_summary(engine, w).with_columns(pl.lit(w).alias("as_of")) for w in weeks])
    return {f"{r['table_name']}@{r['as_of']}": r["digest"] for r in summary.iter_rows(named=True) if r["passed"]}
