"""The promotion gate's evidence, pooled over several weeks.

For each of the latest labelled weeks a model is trained on that week's past only (the plan
a training run one week later would make), then scored there with the champion and every
baseline on the same users (`train_and_evaluate_week`: the training flow and the weekly
backtest both run it, so their numbers agree): at most RECSYS_GATE_USERS_PER_WEEK of the week's
labelled users, a fixed hash sample (`evaluation.sample_holdout_users`), so a gate week costs the
same at a million users as at twenty thousand. `pool_weeks` stacks the weeks' per-user
NDCG into (user, week) units, micro-averages the metrics and gives the paired bootstrap
interval of the model's relative gain over every other recommender.
"""

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date

import lightgbm as lgb
import polars as pl

from features.collaborative import CollaborativeConfig
from ranking import metrics
from ranking.candidates import CandidateConfig, SnapshotTables
from ranking.registry import ModelRecord
from training import allocation, evaluation
from training.allocation import Allocation
from training.bootstrap import GainEstimate, bootstrap_gain_of_units
from training.evaluation import WeekEvaluation
from training.plan import WeekPlan
from training.ranker import RankerParams, TrainedRanker, train_ranker
from training.tuning import TuningConfig, TuningResult, tune_params

log = logging.getLogger(__name__)

MODEL = "model"
CHAMPION = "champion"


@dataclass(frozen=True)
class WeekRun:
    """A model trained for one gate (or backtest) week and its evaluation on that week's holdout."""

    plan: WeekPlan
    model: TrainedRanker
    categories: list[str]
    evaluation: WeekEvaluation
    train_rows: int
    valid_rows: int
    frames_s: float
    train_s: float
    evaluate_s: float
    reused: bool = False  # the model is an earlier run's for the same plan (`FittedWeek`), not trained here


@dataclass(frozen=True)
class FittedWeek:
    """A gate week's trained model with the sizes of the frames it was fitted on: what a later training run
    needs to reuse it (`training.store.reused_gate_model`) instead of training it again."""

    model: TrainedRanker
    train_rows: int
    valid_rows: int


class FrameCache:
    """Labelled training frames built once per (week, category encoding); `keep` drops the rest."""

    def __init__(self, build: Callable[[date, list[str]], pl.DataFrame]) -> None:
        self._build = build
        self._frames: dict[tuple[date, tuple[str, ...]], pl.DataFrame] = {}

    def get(self, week: date, categories: list[str]) -> pl.DataFrame:
        key = (week, tuple(categories))
        if key not in self._frames:
            self._frames[key] = self._build(week, categories)
        return self._frames[key]

    def keep(self, weeks: Iterable[date]) -> None:
        """Forget every frame of a week not in `weeks` (bounds memory to what later plans need)."""
        wanted = set(weeks)
        self._frames = {key: frame for key, frame in self._frames.items() if key[0] in wanted}


def train_and_evaluate_week(
    plan: WeekPlan,
    categories: list[str],
    *,
    frame_of: Callable[[date, list[str]], pl.DataFrame],
    holdout_of: Callable[[date], tuple[SnapshotTables, pl.DataFrame]],
    params: RankerParams,
    config: CandidateConfig,
    collaborative: CollaborativeConfig,
    k: int,
    champion: tuple[lgb.Booster, ModelRecord] | None,
    batch_users: int,
    max_holdout_users: int | None = None,
    after_training: Callable[[], None] | None = None,
    reused: FittedWeek | None = None,
) -> WeekRun:
    """Train on `plan`'s training weeks (early stopping on its validation weeks pooled), then score the model,
    the champion and every baseline on its holdout week, over at most `max_holdout_users` of its
    labelled users (`evaluation.sample_holdout_users`; all when None). With `reused` (a model an earlier run
    trained for this same plan), no frame is built and nothing is trained: that model is evaluated.

    `frame_of(week, categories)` gives a week's labelled frame, `holdout_of(week)` its snapshot
    tables (all users', or only the sampled users') and labels; the training frames are released
    before the holdout is read, and `after_training()` (when given) is called then, so the caller can
    release what it holds for this week too (the training flow's frame cache).
    """
    started = time.perf_counter()
    if reused is None:
        fitted, frames_s = fit_week(plan, categories, frame_of=frame_of, params=params)
        framed, trained = started + frames_s, time.perf_counter()
    else:
        fitted = reused
        framed = trained = time.perf_counter()
    model, train_rows, valid_rows = fitted.model, fitted.train_rows, fitted.valid_rows
    if after_training is not None:
        after_training()
    tables, labels = holdout_of(plan.holdout)
    scored = evaluation.evaluate_model(
        model, categories, tables, labels, config, k, champion=champion, collaborative=collaborative,
        batch_users=batch_users, max_users=max_holdout_users,
    )  # fmt: skip
    done = time.perf_counter()
    log.info(
        "week %s: model ndcg@%d %.4f on %d users, %d training rows, %s, evaluated in %.1fs",
        plan.holdout, k, scored.metrics[MODEL][f"ndcg@{k}"], scored.metrics[MODEL]["users"], train_rows,
        "model reused" if reused is not None else f"fit {trained - framed:.1f}s", done - trained,
    )  # fmt: skip
    return WeekRun(plan, model, categories, scored, train_rows, valid_rows, framed - started, trained - framed,
                   done - trained, reused=reused is not None)  # fmt: skip


def fit_week(
    plan: WeekPlan,
    categories: list[str],
    *,
    frame_of: Callable[[date, list[str]], pl.DataFrame],
    params: RankerParams,
) -> tuple[FittedWeek, float]:
    """A model trained on `plan`'s training weeks, early-stopped on its validation weeks (refitted on both, by
    `params.refit`), and the seconds its frames took; the frames are released before it returns."""
    started = time.perf_counter()
    train, valid = plan_frames(plan, categories, frame_of)
    framed = time.perf_counter()
    model = train_ranker(train, valid, params)
    return FittedWeek(model, train.height, valid.height), framed - started


def tune_on_plan(
    plan: WeekPlan,
    categories: list[str],
    *,
    frame_of: Callable[[date, list[str]], pl.DataFrame],
    params: RankerParams,
    tuning: TuningConfig,
) -> TuningResult:
    """Hyper-parameters tuned on `plan`'s training weeks, scored on its validation weeks pooled (never its holdout)."""
    return tune_params(*plan_frames(plan, categories, frame_of), params, tuning)


def plan_frames(
    plan: WeekPlan, categories: list[str], frame_of: Callable[[date, list[str]], pl.DataFrame]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The labelled frames of `plan`'s training weeks and of its validation weeks, each stacked: the
    validation frame's (week, user) groups are scored together, so early stopping and tuning judge the
    model on every validation week at once."""
    train = pl.concat([frame_of(w, categories) for w in plan.train])
    return train, pl.concat([frame_of(w, categories) for w in plan.validation])


def allocate_on_plan(
    plan: WeekPlan,
    *,
    week_of: Callable[[date], tuple[SnapshotTables, pl.DataFrame]],
    config: CandidateConfig,
    budget: int,
    max_users: int | None,
    seed: int,
    bands: int = 1,
) -> Allocation | None:
    """Candidate counts per source measured on `plan`'s training and validation weeks (never its holdout;
    `week_of(week)`: tables and labels), within `budget` candidates per user (`training.allocation`), per
    history band when `bands` > 1 (edges from those weeks too); None when the budget is 0 (fixed counts)."""
    if budget == 0:
        return None
    measured = allocation.measure_weeks(
        [*plan.train, *plan.validation], week_of=week_of, config=config, depth=budget, max_users=max_users,
        seed=seed,
    )  # fmt: skip
    chosen = allocation.allocate(measured, budget, bands=bands)
    best, best_recall = chosen.best_single_source
    log.info(
        "candidates allocated on %s: %s; recall %.3f at %.0f per user (best single source %s: %.3f)",
        ", ".join(str(w) for w in chosen.weeks), allocation.counts_text(chosen.record()), chosen.recall,
        chosen.candidates_per_user, best, best_recall,
    )  # fmt: skip
    return chosen


@dataclass(frozen=True)
class PooledEvaluation:
    """Several weeks' evaluations as one: metrics micro-averaged over (user, week), the units, and the
    model's gain over every other recommender with its paired bootstrap interval."""

    weeks: list[date]
    metrics: dict[str, dict[str, float]]
    candidate_recall: dict[str, float]
    units: pl.DataFrame  # week, user_id, then each recommender's NDCG@k (the champion's null on its training weeks)
    gains: dict[str, GainEstimate]
    champion_weeks: list[date] = field(default_factory=list)  # the weeks the champion was compared on

    def gains_record(self) -> dict[str, dict[str, float]]:
        """The gains as the registry stores them (JSON): per recommender the gain, its interval and the
        units; an unbounded value (one unit, or a recommender scoring 0) is None."""
        return {
            name: {
                "gain": _finite(g.relative_gain),
                "low": _finite(g.relative_gain_low),
                "high": _finite(g.relative_gain_high),
                "units": g.units,
                "confidence": g.confidence,
                "model": g.mean_a,
                "other": g.mean_b,
            }  # fmt: skip
            for name, g in self.gains.items()
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def pool_weeks(
    evaluations: dict[date, WeekEvaluation],
    *,
    confidence: float,
    resamples: int,
    seed: int,
    champion_after: date | None = None,
) -> PooledEvaluation:
    """Pool weekly evaluations into (user, week) units; recommenders missing from a week (e.g. EASE
    above its catalogue bound) are left out of the pool, so every comparison is paired. With
    `champion_after` (the last week the champion trained on), the champion is pooled and compared only
    on the weeks after it (`champion_weeks`; its units of earlier weeks are null), and left out when none is."""
    if not evaluations:
        raise ValueError("pool_weeks: no weekly evaluations to pool")
    weeks = sorted(evaluations)
    names = [n for n in evaluations[weeks[0]].metrics if all(n in evaluations[w].metrics for w in weeks)]
    if MODEL not in names:
        raise ValueError(f"pool_weeks: every week needs the model's results, got {names}")
    champion_weeks = [w for w in weeks if champion_after is None or w > champion_after]
    if CHAMPION in names and not champion_weeks:
        names.remove(CHAMPION)
    units = pl.concat([evaluations[w].per_user.select(pl.lit(w).alias("week"), "user_id", *names) for w in weeks]).sort(
        "week", "user_id"
    )
    pooled = {
        n: metrics.combine_weeks([evaluations[w].metrics[n] for w in (champion_weeks if n == CHAMPION else weeks)])
        for n in names
    }
    recall = evaluation.combine_recall([evaluations[w].candidate_recall for w in weeks])
    gains = {}
    if CHAMPION in names:  # the champion's own training weeks are no evidence for or against it
        units = units.with_columns(pl.when(pl.col("week").is_in(champion_weeks)).then(pl.col(CHAMPION)))
    if units.height:
        for name in names:
            if name == MODEL:
                continue
            pair = units.select("week", "user_id", a=pl.col(MODEL), b=pl.col(name))
            if name == CHAMPION:
                pair = pair.filter(pl.col("week").is_in(champion_weeks))
            if pair.height:
                gains[name] = bootstrap_gain_of_units(pair, confidence=confidence, resamples=resamples, seed=seed)
    return PooledEvaluation(weeks, pooled, recall, units, gains, champion_weeks if CHAMPION in names else [])
