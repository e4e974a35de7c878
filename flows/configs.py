"""The one mapping from Settings to the pipelines' own configuration objects.

Pipelines take plain parameters and small config objects, never the Settings object; the
flows, the CLI and the benchmarks all map settings through these functions, so training,
evaluation and inference are configured alike.
"""

from ranking.candidates import CandidateConfig
from recsys.settings import Settings
from training.ranker import RankerParams


def candidate_config(settings: Settings) -> CandidateConfig:
    """The candidate generation the settings ask for (training, backtest and inference alike)."""
    return CandidateConfig(recent_items=settings.recent_items_per_user, exclude_consumed=settings.exclude_consumed)


def ranker_params(settings: Settings) -> RankerParams:
    """LightGBM's parameters: seeded and threaded as configured."""
    return RankerParams(seed=settings.seed, num_threads=settings.num_threads)


def backtest_options(settings: Settings) -> dict:
    """The keyword arguments of `training.backtest.run_backtest` that the training flow takes from Settings."""
    return {
        "config": candidate_config(settings),
        "params": ranker_params(settings),
        "training_weeks": settings.training_weeks,
        "recent_items": settings.recent_items_per_user,
        "neighbours": settings.neighbours_per_item,
        "seed": settings.seed,
        "k": settings.eval_k,
        "max_users": settings.training_users_per_week,
        "negatives_per_user": settings.negatives_per_user,
    }
