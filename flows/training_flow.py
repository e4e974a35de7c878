"""Training flow: labelled snapshots → a ranker per gate week → pooled against champion and baselines → the
recipe refitted through the newest labelled week → registry."""

import logging
from dataclasses import asdict, replace
from datetime import date
from functools import partial

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
from training import evaluation, frames, gate, report, store
from training.allocation import Allocation
from training.plan import WeekPlan, staleness
from training.promotion import Decision
from training.ranker import RankerParams, TrainedRanker
from training.tuning import TuningConfig, TuningResult

log = logging.getLogger(__name__)


@task(**TRANSIENT_IO)
def plan_training(engine, as_of: date, options: dict) -> list[WeekPlan]:
    """The gate's weeks, each with its training and validation weeks among passed labelled snapshots;
    the model trained as of `as_of` last (`options`: `configs.plan_options`)."""
    return store.plan_training(engine, as_of, **options)


@task(**IO)
def load_categories(engine, as_of: date) -> list[str]:
    return category_encoding(store.read_item_features(engine, as_of))


@task(**IO)
def load_champion(engine, name: str) -> tuple[lgb.Booster, registry.ModelRecord] | None:
    """The trained champion to score on the holdouts; None without one, or when a baseline (scored anyway) holds it."""
    held = registry.get_champion(engine, name)
    return registry.load_model(engine, name) if held is not None and held.kind == "ranker" else None


@task(**IO)
def train_and_evaluate_week(
    engine,
    plan: WeekPlan,
    categories: list[str],
    cache: gate.FrameCache,
    champion: tuple[lgb.Booster, registry.ModelRecord] | None,
    options: dict,
    progress: tuple[int, int],
    later: list[date],
    reuse_key: str | None,
) -> gate.WeekRun:
    """A model trained on the week's past only (or the one an earlier run trained under the same `reuse_key`),
    then it, the champion and every baseline on that week's holdout (only its sampled users' rows read). Once
    the model is trained, the cache keeps only the frames of the `later` weeks (the later plans' training and
    validation weeks), so the holdout is evaluated without them. A trained model is kept under `reuse_key`."""
    sample = partial(evaluation.sample_holdout_users, limit=options["max_holdout_users"])
    reused = store.reused_gate_model(engine, reuse_key) if reuse_key is not None else None
    run = gate.train_and_evaluate_week(
        plan, categories, frame_of=cache.get, champion=champion,
        holdout_of=lambda week: store.read_sampled_week(engine, week, sample),
        after_training=lambda: cache.keep(later), reused=reused, **options,
    )  # fmt: skip
    if reuse_key is not None and reused is None:
        store.keep_gate_model(
            engine, reuse_key, plan.holdout, gate.FittedWeek(run.model, run.train_rows, run.valid_rows)
        )
    log.info("gate week %s evaluated", plan.holdout, extra={"progress": ("gate weeks", *progress)})
    return run


@task(**TRANSIENT_IO)
def plan_refit(engine, latest: WeekPlan, options: dict) -> WeekPlan:
    """The served model's weeks: `latest`'s recipe refitted through its holdout, planned as next week's run plans
    its gate model of the week after (`training.store.plan_refit`)."""
    return store.plan_refit(engine, latest, **options)


@task(**IO)
def load_refit_categories(engine, refit: WeekPlan) -> list[str]:
    """The category encoding next week's gate model of `refit.holdout` uses (that snapshot's, already there when
    the feature flow wrote this week's features); the newest labelled week's when it is not (yet) there."""
    return category_encoding(store.read_item_features(engine, store.encoding_week(engine, refit)))


@task(**TRANSIENT_IO)
def is_kept(engine, key: str) -> bool:
    """Whether an earlier run kept a model under `key` (`training.store.keep_gate_model`)."""
    return store.has_gate_model(engine, key)


@task(**IO)
def refit_through_newest_week(
    engine, plan: WeekPlan, categories: list[str], cache: gate.FrameCache, params: RankerParams, reuse_key: str | None
) -> tuple[TrainedRanker, bool]:
    """The model to register: the gate's recipe trained on `plan` (through the newest labelled week), or the one an
    earlier run kept under the same `reuse_key`; kept under it for next week's run, which scores it as its gate
    model of `plan.holdout`. Returns the model and whether it was reused."""
    reused = store.reused_gate_model(engine, reuse_key) if reuse_key is not None else None
    if reused is not None:
        log.info("refit through %s reused (key %s)", plan.validation[-1], reuse_key[:12])
        return reused.model, True
    fitted, _ = gate.fit_week(plan, categories, frame_of=cache.get, params=params)
    cache.keep([])
    if reuse_key is not None:
        store.keep_gate_model(engine, reuse_key, plan.holdout, fitted)
    log.info("refit through %s: %d training rows, %d trees", plan.validation[-1], fitted.train_rows,
             fitted.model.best_iteration)  # fmt: skip
    return fitted.model, False


@task(**TRANSIENT_IO)
def gate_model_key(engine, plan: WeekPlan, categories: list[str], options: dict, sampling: dict) -> str:
    """The key an identical earlier gate model was kept under (`training.store.gate_model_key`)."""
    return store.gate_model_key(
        engine, plan, categories, config=options["config"], params=options["params"], sampling=sampling
    )


def read_training_week(engine, week: date, sampling: dict) -> tuple[SnapshotTables, pl.DataFrame]:
    """A training or validation week's tables and labels, only the users its frame samples (the same
    `frames.sample_users` draw `labelled_frame` makes, so the frame is the one of the whole week)."""
    return store.read_sampled_week(
        engine, week, lambda users: frames.sample_users(users, sampling["max_users"], sampling["seed"])
    )


@task(**IO)
def tune(
    plan: WeekPlan, categories: list[str], cache: gate.FrameCache, params: RankerParams, tuning: TuningConfig
) -> TuningResult:
    """The ranker's hyper-parameters chosen by Optuna on the earliest gate plan's validation weeks, which
    come before every holdout the gate scores; every gate model is trained with them."""
    return gate.tune_on_plan(plan, categories, frame_of=cache.get, params=params, tuning=tuning)


@task(**TRANSIENT_IO)
def allocate(
    engine, plan: WeekPlan, config: CandidateConfig, sampling: dict, budget: int, bands: int
) -> Allocation | None:
    """Candidate counts per source by their recall on the earliest gate plan's training and validation
    weeks: before every gate holdout, so each gate week is scored on weeks its counts never saw. Each week's
    users are its training frame's sample, read alone (`read_training_week`)."""
    return gate.allocate_on_plan(
        plan, week_of=lambda w: read_training_week(engine, w, sampling), config=config, budget=budget,
        max_users=sampling["max_users"], seed=sampling["seed"], bands=bands,
    )  # fmt: skip


@task(**PURE)
def pool_weeks(
    runs: list[gate.WeekRun], gate_options: dict, champion: tuple[lgb.Booster, registry.ModelRecord] | None
) -> gate.PooledEvaluation:
    """Every gate week's results as (user, week) units, with the model's gain over each recommender and its
    interval; the champion's only on the weeks after its training weeks (out of sample)."""
    after = store.trained_through(champion[1]) if champion is not None else None
    return gate.pool_weeks({r.plan.holdout: r.evaluation for r in runs}, champion_after=after, **gate_options)


@task(**IO)
def register_and_gate(
    engine,
    name: str,
    model: TrainedRanker,
    categories: list[str],
    plans: list[WeekPlan],
    refit: WeekPlan,
    pooled: gate.PooledEvaluation,
    recipe: str,
    config: CandidateConfig,
    k: int,
    margin: float,
) -> tuple[int, Decision, registry.ModelRecord]:
    """Register the refitted model with the gate's pooled evidence and, only if it passes the gate, as champion
    (one transaction); the best baseline as champion while no model has won the gate. Returns the live champion too."""
    return store.register_and_gate(
        engine, name, model, plans, pooled, refit=refit, recipe=recipe,
        categories=categories, config=config, k=k, margin=margin, flow_run_id=current_run_id(),
    )  # fmt: skip


@flow(name="training", flow_run_name=run_name("train"), timeout_seconds=3 * 3600)
@run_body
def training_flow(as_of: date | None = None) -> dict:
    """Train a ranker as of each gate week on its past, evaluate each against the champion and the baselines,
    pool the weeks, refit the recipe through the newest labelled week, register and gate that model."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    config, k = configs.candidate_config(settings), settings.eval_k
    sampling = configs.sampling_options(settings)
    gate_options = configs.gate_options(settings)
    margin = gate_options.pop("margin")
    options = {
        "params": configs.ranker_params(settings), "config": config, "k": k,
        "collaborative": configs.collaborative_config(settings), "batch_users": settings.gate_batch_users,
        "max_holdout_users": settings.gate_users_per_week,
    }  # fmt: skip
    with open_stores(settings) as stores:
        engine = stores.engine
        store.ensure_schema(engine)
        plans = plan_training(engine, as_of, configs.plan_options(settings))
        refit = plan_refit(engine, plans[-1], configs.plan_options(settings))
        champion = load_champion(engine, settings.model_name)
        allocated = allocate(engine, plans[0], config, sampling, settings.candidates_per_user, settings.candidate_bands)
        if allocated is not None:
            config = allocated.config(config)
            options["config"] = config
        cache = gate.FrameCache(
            lambda week, categories: frames.labelled_frame(
                *read_training_week(engine, week, sampling), week, config, categories, **sampling
            )
        )
        tuning = configs.tuning_config(settings)
        tuned = None
        if tuning.enabled:
            tuned = tune(plans[0], load_categories(engine, plans[0].holdout), cache, options["params"], tuning)
            options["params"] = tuned.params
        refit_categories = load_refit_categories(engine, refit)
        refit_key = (
            gate_model_key(engine, refit, refit_categories, options, sampling) if settings.reuse_gate_models else None
        )
        # A refit an earlier run kept needs no frame: the last gate week then releases them all.
        refit_frames = [] if refit_key is not None and is_kept(engine, refit_key) else refit.weeks[:-1]
        runs = []
        for i, plan in enumerate(plans):
            # Items never leave the catalogue, so the holdout's categories cover the older weeks'.
            categories = load_categories(engine, plan.holdout)
            progress = (i + 1, len(plans))
            later = [w for p in plans[i + 1 :] for w in (*p.train, *p.validation)] + refit_frames
            key = gate_model_key(engine, plan, categories, options, sampling) if settings.reuse_gate_models else None
            runs.append(
                train_and_evaluate_week(engine, plan, categories, cache, champion, options, progress, later, key)
            )
        pooled = pool_weeks(runs, gate_options, champion)
        model, refit_reused = refit_through_newest_week(
            engine, refit, refit_categories, cache, options["params"], refit_key
        )
        # Stored with the model (its params in the registry); the counts themselves are in its "candidates".
        stored = {"tuning": tuned.record()} if tuned is not None else {}
        stored |= {"allocation": allocated.record()} if allocated is not None else {}
        stored |= {"validation_weeks": [str(w) for w in refit.validation]}
        model = replace(model, params=model.params | stored)
        recipe = store.recipe_key(configs.recipe(settings))
        version, decision, live = register_and_gate(
            engine, settings.model_name, model, refit_categories, plans, refit, pooled, recipe, config, k, margin
        )
    create_markdown_artifact(
        key="training-metrics",
        markdown=report.metrics_markdown(
            version,
            plans,
            refit,
            pooled,
            decision,
            k,
            live.label,
            allocated.record() if allocated is not None else None,
        ),  # fmt: skip
        description=f"Model v{version}, gate over {len(pooled.weeks)} weeks up to {plans[-1].holdout}",
    )
    return {
        "version": version,
        "as_of": str(as_of),
        "holdout": str(plans[-1].holdout),
        "gate_weeks": [str(w) for w in pooled.weeks],
        "training_weeks": [str(w) for w in refit.train],
        "validation_weeks": [str(w) for w in refit.validation],
        "stale_upstream": staleness(plans[-1]),
        "reused_gate_models": [str(r.plan.holdout) for r in runs if r.reused],
        "refit_reused": refit_reused,
        "champion_weeks": [str(w) for w in pooled.champion_weeks],
        "metrics": pooled.metrics,
        "gains": pooled.gains_record(),
        "candidate_recall": pooled.candidate_recall,
        "tuning": tuned.record() if tuned is not None else None,
        "allocation": allocated.record() if allocated is not None else None,
        **asdict(decision),
        "champion": live.label,
    }
