"""Training flow: labelled snapshots → LightGBM ranker → evaluated against baselines → registry."""

import logging
from dataclasses import asdict
from datetime import date

import lightgbm as lgb
import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows import configs
from flows.common import IO, PURE, TRANSIENT_IO, current_run_id, resolve_as_of, run_name
from flows.runs import run_body
from ranking import registry
from ranking.candidates import CandidateConfig, SnapshotTables, category_encoding
from recsys.settings import Settings
from recsys.stores import open_stores
from training import evaluation, frames, report, store
from training.plan import WeekPlan, staleness
from training.promotion import Decision
from training.ranker import RankerParams, TrainedRanker, train_ranker

log = logging.getLogger(__name__)


@task(**TRANSIENT_IO)
def plan_training(engine, as_of: date, training_weeks: int) -> WeekPlan:
    """Pick the holdout, validation and training weeks among passed labelled snapshots."""
    return store.plan_training(engine, as_of, training_weeks)


@task(**IO)
def load_snapshot(engine, as_of: date) -> SnapshotTables:
    return store.read_tables(engine, as_of)


@task(**IO)
def load_labels(engine, as_of: date) -> pl.DataFrame:
    return store.read_labels(engine, as_of)


@task(**IO)
def load_categories(engine, as_of: date) -> list[str]:
    return category_encoding(store.read_item_features(engine, as_of))


@task(**IO)
def load_champion(engine, name: str) -> tuple[lgb.Booster, registry.ModelRecord] | None:
    """The trained champion to score on the holdout; None without one, or when a baseline (scored anyway) holds it."""
    held = registry.get_champion(engine, name)
    return registry.load_model(engine, name) if held is not None and held.kind == "ranker" else None


@task(**IO)
def build_training_frame(
    engine, week: date, config: CandidateConfig, categories: list[str], sampling: dict, progress: tuple[int, int]
) -> pl.DataFrame:
    """One labelled week: candidates of (a sample of) its labelled users, with features and next-week labels."""
    tables, labels = store.read_tables(engine, week), store.read_labels(engine, week)
    frame = frames.labelled_frame(tables, labels, week, config, categories, **sampling)
    log.info(
        "training frame of week %s: %d rows", week, frame.height, extra={"progress": ("training weeks", *progress)}
    )
    return frame


@task(**PURE)
def fit_ranker(train: pl.DataFrame, valid: pl.DataFrame, params: RankerParams) -> TrainedRanker:
    return train_ranker(train, valid, params)


@task(**PURE)
def evaluate_on_holdout(
    model: TrainedRanker,
    categories: list[str],
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    k: int,
    champion: tuple[lgb.Booster, registry.ModelRecord] | None,
    batch_users: int,
) -> evaluation.WeekEvaluation:
    """Model, champion and baselines on the same holdout users (all of them, in batches), truth and catalogue."""
    return evaluation.evaluate_model(
        model, categories, tables, labels, config, k, champion=champion, batch_users=batch_users
    )


@task(**IO)
def register_and_gate(
    engine,
    name: str,
    model: TrainedRanker,
    plan: WeekPlan,
    scored: evaluation.WeekEvaluation,
    categories: list[str],
    config: CandidateConfig,
    k: int,
    margin: float,
) -> tuple[int, Decision, registry.ModelRecord]:
    """Register the model with its lineage and, only if it passes the gate, as champion (one transaction);
    the best baseline as champion while no model has won the gate. Returns the live champion too."""
    return store.register_and_gate(
        engine, name, model, plan, scored,
        categories=categories, config=config, k=k, margin=margin, flow_run_id=current_run_id(),
    )  # fmt: skip


@flow(name="training", flow_run_name=run_name("train"), timeout_seconds=3 * 3600)
@run_body
def training_flow(as_of: date | None = None) -> dict:
    """Train a ranker on past labelled weeks, evaluate it on the latest, register and gate it."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    config, k = configs.candidate_config(settings), settings.eval_k
    sampling = configs.sampling_options(settings)
    with open_stores(settings) as stores:
        engine = stores.engine
        registry.ensure_schema(engine)
        plan = plan_training(engine, as_of, settings.training_weeks)
        # Items never leave the catalogue, so the newest week's categories cover the older weeks'.
        categories = load_categories(engine, plan.holdout)
        weeks = len(plan.train) + 1
        train = pl.concat(
            [
                build_training_frame(engine, w, config, categories, sampling, (i, weeks))
                for i, w in enumerate(plan.train, 1)
            ]
        )
        valid = build_training_frame(engine, plan.validation, config, categories, sampling, (weeks, weeks))
        model = fit_ranker(train, valid, configs.ranker_params(settings))
        del train, valid  # memory holds one week's tables at a time: the training frames go before the holdout
        holdout, labels = load_snapshot(engine, plan.holdout), load_labels(engine, plan.holdout)
        champion = load_champion(engine, settings.model_name)
        scored = evaluate_on_holdout(
            model, categories, holdout, labels, config, k, champion, settings.score_batch_users
        )
        version, decision, live = register_and_gate(
            engine, settings.model_name, model, plan, scored, categories, config, k, settings.promotion_margin
        )
    create_markdown_artifact(
        key="training-metrics",
        markdown=report.metrics_markdown(version, plan, scored, decision, k, live.label),
        description=f"Model v{version} on holdout {plan.holdout}",
    )
    return {
        "version": version,
        "as_of": str(as_of),
        "holdout": str(plan.holdout),
        "training_weeks": [str(w) for w in plan.train],
        "stale_upstream": staleness(plan),
        "metrics": scored.metrics,
        "candidate_recall": scored.candidate_recall,
        **asdict(decision),
        "champion": live.label,
    }
