"""The ranker's hyper-parameters chosen on the validation weeks by Optuna, within a time budget.

Tuning fits the ranker on a plan's training weeks and scores it on that plan's validation weeks
pooled (LightGBM's NDCG@10 on their sampled frames, the number early stopping watches), never on
a holdout. The training flow tunes on the earliest plan of its gate, whose validation weeks come
before every holdout the gate scores, and trains every gate model with the chosen values; the
backtest tunes each week on its own plan. The first trial is always the configured parameters, so
tuning never picks values that did worse on the validation weeks than the untuned ones.
"""

import logging
import time
from dataclasses import dataclass, replace

import optuna
import polars as pl

from recsys.settings import default_of
from training.ranker import RankerParams, train_ranker

log = logging.getLogger(__name__)

# name: (low, high, log scale); integers where the parameter is one.
SEARCH_SPACE: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.02, 0.2, True),
    "num_leaves": (3, 31, False),
    "min_child_samples": (10, 200, True),
    "colsample_bytree": (0.5, 1.0, False),
}
_INTEGERS = {"num_leaves", "min_child_samples"}


@dataclass(frozen=True)
class TuningConfig:
    """Optuna's budget: stop after `trials` fits or `seconds` of wall time, whichever comes first
    (0 seconds: no tuning). With a time limit the number of trials, and so the result, depends on
    the machine's speed; a `trials` limit reached first keeps a run reproducible for its seed."""

    seconds: float = default_of("tuning_seconds")
    trials: int = default_of("tuning_trials")

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.trials < 1:
            raise ValueError(f"tuning needs seconds >= 0 and trials >= 1, got {self.seconds} and {self.trials}")

    @property
    def enabled(self) -> bool:
        return self.seconds > 0


@dataclass(frozen=True)
class TuningResult:
    """The chosen parameters and how they were found (stored with the model)."""

    params: RankerParams
    trials: int
    seconds: float
    untuned_ndcg: float
    best_ndcg: float
    chosen: dict

    def record(self) -> dict:
        return {
            "trials": self.trials,
            "seconds": round(self.seconds, 1),
            "validation_ndcg@10_untuned": self.untuned_ndcg,
            "validation_ndcg@10_tuned": self.best_ndcg,
            "chosen": self.chosen,
        }


def tune_params(train: pl.DataFrame, valid: pl.DataFrame, params: RankerParams, config: TuningConfig) -> TuningResult:
    """Search SEARCH_SPACE with Optuna's seeded TPE sampler, each trial a fit on `train` scored on `valid`."""
    if not config.enabled:
        raise ValueError("tune_params: tuning is disabled (RECSYS_TUNING_SECONDS is 0)")
    untuned = {name: getattr(params, name) for name in SEARCH_SPACE}

    def objective(trial: optuna.Trial) -> float:
        chosen = {name: _suggest(trial, name) for name in SEARCH_SPACE}
        # A trial is judged by the early-stopped fit's validation score: its refit would not change it.
        return train_ranker(train, valid, replace(params, refit=False, **chosen)).validation_ndcg

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=params.seed))
    study.enqueue_trial(untuned)
    started = time.perf_counter()
    study.optimize(objective, n_trials=config.trials, timeout=config.seconds)
    seconds = time.perf_counter() - started
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial
    chosen = {name: best.params[name] for name in SEARCH_SPACE}
    log.info(
        "tuning: %d trials in %.0fs, validation ndcg@10 %.4f untuned -> %.4f with %s",
        len(completed), seconds, completed[0].value, best.value, chosen,
    )  # fmt: skip
    return TuningResult(
        params=replace(params, **chosen),
        trials=len(completed),
        seconds=seconds,
        untuned_ndcg=completed[0].value,
        best_ndcg=best.value,
        chosen=chosen,
    )


def _suggest(trial: optuna.Trial, name: str) -> float | int:
    low, high, log_scale = SEARCH_SPACE[name]
    if name in _INTEGERS:
        return trial.suggest_int(name, int(low), int(high), log=log_scale)
    return trial.suggest_float(name, low, high, log=log_scale)
