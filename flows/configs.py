"""The one mapping from Settings to the pipelines' own configuration objects.

Pipelines take plain parameters and small config objects, never the Settings object; the
flows, the CLI and the benchmarks all map settings through these functions, so training,
evaluation and inference are configured alike.
"""

from features.collaborative import CollaborativeConfig
from features.sources import resolve_synthetic, synthetic_kind
from features.synthetic import SyntheticLogConfig, synthetic_folder
from inference.checks import CheckBounds
from ranking.candidates import CandidateConfig
from recsys.settings import Settings
from training.ranker import RankerParams
from training.tuning import TuningConfig


def candidate_config(settings: Settings) -> CandidateConfig:
    """The candidate generation the settings ask for (training, backtest and inference alike)."""
    return CandidateConfig(recent_items=settings.recent_items_per_user, exclude_consumed=settings.exclude_consumed)


def ranker_params(settings: Settings) -> RankerParams:
    """LightGBM's parameters: seeded and threaded as configured."""
    return RankerParams(seed=settings.seed, num_threads=settings.num_threads)


def tuning_config(settings: Settings) -> TuningConfig:
    """Optuna's budget for the ranker's hyper-parameters (0 seconds: none)."""
    return TuningConfig(seconds=settings.tuning_seconds, trials=settings.tuning_trials)


def collaborative_config(settings: Settings) -> CollaborativeConfig:
    """EASE's and ALS's settings (baselines in evaluation, the gate and serving alike)."""
    return CollaborativeConfig(
        ease_l2=settings.ease_l2,
        ease_max_items=settings.ease_max_items,
        als_factors=settings.als_factors,
        als_regularization=settings.als_regularization,
        als_iterations=settings.als_iterations,
        als_alpha=settings.als_alpha,
        als_seeds=settings.als_seeds,
        seed=settings.seed,
        threads=settings.num_threads,
    )


def gate_options(settings: Settings) -> dict:
    """The keyword arguments of `training.gate.compare` and `training.promotion.decide` that come from Settings."""
    return {
        "margin": settings.promotion_margin,
        "confidence": settings.gate_confidence,
        "resamples": settings.gate_resamples,
        "seed": settings.seed,
    }


def plan_options(settings: Settings) -> dict:
    """The keyword arguments of `training.store.plan_training` beyond the week: which labelled weeks train,
    validate and hold out each gate model."""
    return {
        "training_weeks": settings.training_weeks,
        "gate_weeks": settings.gate_weeks,
        "validation_weeks": settings.validation_weeks,
        "min_training_users": settings.min_training_users,
        "max_training_weeks": settings.max_training_weeks,
    }


def recipe(settings: Settings) -> dict:
    """What a trained model's recipe is, as settings: its weeks' plan, LightGBM's base parameters and their tuning,
    the candidates and their allocation, the frames' sampling, the collaborative features' settings. A model
    trained a week later by an equal recipe is a refresh of it (`training.store.recipe_key`)."""
    return {
        "plan": plan_options(settings) | {"gate_weeks": None},  # how many weeks the gate pools is not the model's
        "params": ranker_params(settings),
        "tuning": tuning_config(settings),
        "candidates": candidate_config(settings),
        "candidates_per_user": settings.candidates_per_user,
        "candidate_bands": settings.candidate_bands,
        "sampling": sampling_options(settings) | {"batch_users": None},  # no model depends on the batch size
        "collaborative": collaborative_config(settings),
    }


def backtest_options(settings: Settings) -> dict:
    """The keyword arguments of `training.backtest.run_backtest` that the training flow takes from Settings."""
    return (
        {
            "config": candidate_config(settings),
            "collaborative": collaborative_config(settings),
            "params": ranker_params(settings),
            "training_weeks": settings.training_weeks,
            "validation_weeks": settings.validation_weeks,
            "min_training_users": settings.min_training_users,
            "max_training_weeks": settings.max_training_weeks,
            "k": settings.eval_k,
            "max_holdout_users": settings.gate_users_per_week,
            "confidence": settings.gate_confidence,
            "resamples": settings.gate_resamples,
            "tuning": tuning_config(settings),
            "candidate_budget": settings.candidates_per_user,
            "candidate_bands": settings.candidate_bands,
        }
        | feature_options(settings)
        | sampling_options(settings)
    )


def scoring_options(settings: Settings) -> dict:
    """The keyword arguments of `inference.scoring.score_partition` that the inference flow takes from Settings."""
    return {
        "config": candidate_config(settings),
        "n": settings.top_n,
        "batch_users": settings.score_batch_users,
        "prefix": settings.redis_prefix,
        "chunk": settings.publish_chunk,
        # compiled models kept between runs (a model is compiled once, not once per run and process)
        "compiled_dir": settings.data_dir / "compiled-models",
    }


def synthetic_log_config(settings: Settings, spec: str | None = None) -> SyntheticLogConfig:
    """Where the synthetic log of the world `spec` names lives (a folder per kind under the data folder),
    its sizes and seed; a bare or absent spec is the RECSYS_SYNTHETIC_KIND world."""
    kind = synthetic_kind(resolve_synthetic(spec or "synthetic", settings.synthetic_kind)) or settings.synthetic_kind
    return SyntheticLogConfig(
        folder=synthetic_folder(settings.data_dir, kind),
        n_users=settings.synthetic_users,
        n_items=settings.synthetic_items,
        n_events=settings.synthetic_events,
        n_weeks=settings.synthetic_weeks,
        seed=settings.seed,
        kind=kind,
    )


def source_spec(settings: Settings, source: str | None = None) -> str:
    """The raw source spec a run uses: `source` or RECSYS_SOURCE, a bare `synthetic` resolved to the
    RECSYS_SYNTHETIC_KIND world (`features.sources.resolve_synthetic`)."""
    return resolve_synthetic(source or settings.source, settings.synthetic_kind)


def feature_options(settings: Settings) -> dict:
    """The keyword arguments of `features.transform.build_week_tables` that come from Settings."""
    return {
        "recent_items": settings.recent_items_per_user,
        "neighbours": settings.neighbours_per_item,
        "collaborative": collaborative_config(settings),
        "collaborative_items": settings.collaborative_items_per_user,
    }


def validation_options(settings: Settings) -> dict:
    """The keyword arguments of `features.validation.validate_tables` that come from Settings."""
    return {
        "min_rows_ratio": settings.min_rows_ratio,
        "drift_threshold": settings.drift_threshold,
        "drift_blocks": settings.drift_blocks,
    }


def sampling_options(settings: Settings) -> dict:
    """The keyword arguments of `training.frames.labelled_frame` beyond the week: which users and
    negatives become training rows, built how many users at a time (training flow and backtest alike)."""
    return {
        "negatives_per_user": settings.negatives_per_user,
        "seed": settings.seed,
        "max_users": settings.training_users_per_week,
        "batch_users": settings.gate_batch_users,
    }


def quality_options(settings: Settings) -> dict:
    """The keyword arguments of `inference.quality.measure_week` beyond the week: measured as training evaluates."""
    return {
        "prefix": settings.redis_prefix,
        "config": candidate_config(settings),
        "k": settings.eval_k,
        "batch_users": settings.score_batch_users,
    }


def publication_bounds(settings: Settings) -> CheckBounds:
    """What a new publication's lists may look like before it goes live (`inference.checks`)."""
    return CheckBounds(
        max_top_item_share=settings.publish_max_top_item_share,
        max_unknown_items=settings.publish_max_unknown_items,
        min_list_length=settings.publish_min_list_length,
        max_fallback_share=settings.publish_max_fallback_share,
        hold_unchanged=settings.publish_hold_unchanged,
    )


def history_weeks(settings: Settings) -> int:
    """How many weeks before as_of a scheduled feature run makes sure exist: what training needs
    (its training and validation weeks before each of the gate's holdout weeks)."""
    return settings.training_weeks + settings.validation_weeks + settings.gate_weeks
