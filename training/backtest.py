"""The weekly backtest behind `recsys evaluate`: train as of each week, score the following week.

For each evaluated `as_of` T (a Monday):

- feature snapshots and labels are computed in memory from the raw events with
  `features.transform`, the code the feature flow runs: snapshot d sees only events
  with ts < d, and the labels of d are the week [d, d+7d);
- the weeks are planned by `training.plan.plan_weeks`, the training flow's rule, for a
  run at T+7d over the weeks T-7d·(training_weeks+validation_weeks) ... T that have labelled
  users: the holdout is T, the model early-stops on the `validation_weeks` weeks before it
  (T-7d, ..., pooled) and trains on the `training_weeks` before those (fewer when the data
  starts later; more, up to `max_training_weeks`, while they hold fewer than
  `min_training_users` labelled users), then refits on both, so every label it learns from
  is complete before T;
- the model and every baseline (popularity, item-kNN, EASE, ALS) are scored on the week
  [T, T+7d) (snapshot T, labels of T) over the same evaluated users, by the protocol of
  design.md, with `training.gate.train_and_evaluate_week`: the training flow's own code.

This is exactly the plan of the training flow run at T+7d, whose holdout is T: a
backtest row and that run's holdout numbers agree. Overall rows micro-average over
(user, week) with `metrics.combine_weeks`; the model's gain over each baseline comes with
a paired bootstrap interval over the same (user, week) units, as the gate computes it.
"""

import logging
import time
from dataclasses import dataclass, replace
from datetime import date

import polars as pl

from features import transform
from features.collaborative import CollaborativeConfig
from features.raw import RawData
from ranking import metrics
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, category_encoding
from recsys.clock import parse_as_of
from training import allocation, evaluation, frames, gate
from training.allocation import Allocation
from training.plan import WEEK, WeekPlan, Widening, plan_weeks, widens
from training.ranker import RankerParams
from training.tuning import TuningConfig

log = logging.getLogger(__name__)

OVERALL = "overall"


@dataclass(frozen=True)
class BacktestResult:
    """Per-week and overall numbers of one backtest run.

    - `metrics`: one row per (week, recommender); week is the ISO date or "overall".
    - `candidate_recall`: one row per week and overall: share of the truth pairs among
      the candidates, for all sources together and for each one.
    - `allocations`: one row per week and overall when the candidates were allocated by recall: the counts,
      the recall on the holdout and the best single source's at the same number of candidates per user.
    - `timings`: one row per week: training rows, best iteration and seconds spent.
    - `gains`: one row per baseline: the model's relative NDCG@k gain over it, overall, with
      its paired bootstrap interval over (user, week) (`low`, `high`) and the units.
    """

    metrics: pl.DataFrame
    candidate_recall: pl.DataFrame
    allocations: pl.DataFrame
    timings: pl.DataFrame
    gains: pl.DataFrame
    k: int
    training_weeks: int
    validation_weeks: int
    confidence: float
    min_training_users: int = 0
    max_training_weeks: int = 0


class _Snapshots:
    """Feature tables and labels computed once per week, on first use."""

    def __init__(self, raw: RawData, options: dict) -> None:
        self._raw = raw
        self._options = options  # transform.build_feature_tables's, as the feature flow passes them
        self._tables: dict[date, SnapshotTables] = {}
        self._labels: dict[date, pl.DataFrame] = {}
        self._users: dict[date, int] = {}
        self.seconds = 0.0

    def tables(self, week: date) -> SnapshotTables:
        if week not in self._tables:
            started = time.perf_counter()
            frames = transform.build_feature_tables(self._raw.events, self._raw.items, week, **self._options)
            self._tables[week] = SnapshotTables.from_frames(frames)
            self.seconds += time.perf_counter() - started
        return self._tables[week]

    def labels(self, week: date) -> pl.DataFrame:
        if week not in self._labels:
            self._labels[week] = transform.build_labels(self._raw.events, week)
        return self._labels[week]

    def week(self, week: date) -> tuple[SnapshotTables, pl.DataFrame]:
        """The week's tables and labels."""
        return self.tables(week), self.labels(week)

    def labelled_users(self, week: date) -> int:
        """The week's labelled users, from the events alone: the snapshot's user features hold exactly the
        users with an event before it, so no week outside a plan has its tables built."""
        if week not in self._users:
            history = self._raw.events.filter(pl.col("ts") < transform.week_start(week)).get_column("user_id")
            self._users[week] = frames.labelled_users(self.labels(week), history.unique()).len()
        return self._users[week]


def plan_backtest_week(
    snapshots: _Snapshots,
    as_of: date,
    training_weeks: int,
    validation_weeks: int,
    min_training_users: int = 0,
    max_training_weeks: int = 0,
) -> WeekPlan:
    """The training flow's plan at as_of + 7d, whose holdout must be as_of itself."""
    if not snapshots.labelled_users(as_of):
        raise ValueError(
            f"backtest week {as_of}: no user with history consumed a new item in [{as_of}, {as_of + WEEK}); "
            "the source has no events there: pick weeks inside the data"
        )
    widened = widens(training_weeks, min_training_users, max_training_weeks)
    widest = max_training_weeks if widened else training_weeks
    window = [as_of - n * WEEK for n in range(widest + validation_weeks, 0, -1)]
    users = {w: snapshots.labelled_users(w) for w in window}
    labelled = [w for w in window if users[w]] + [as_of]
    widening = Widening(users, min_training_users, max_training_weeks) if widened else None
    return plan_weeks(labelled, as_of + WEEK, training_weeks, validation_weeks, widening)


def run_backtest(
    raw: RawData,
    weeks: list[date],
    *,
    config: CandidateConfig,
    collaborative: CollaborativeConfig,
    params: RankerParams,
    training_weeks: int,
    validation_weeks: int,
    min_training_users: int = 0,
    max_training_weeks: int = 0,
    recent_items: int,
    neighbours: int,
    collaborative_items: int,
    negatives_per_user: int,
    seed: int,
    k: int,
    max_users: int | None,
    batch_users: int,
    max_holdout_users: int | None,
    confidence: float,
    resamples: int,
    tuning: TuningConfig | None = None,
    candidate_budget: int = 0,
    candidate_bands: int = 1,
) -> BacktestResult:
    """Train as of each week in `weeks` and score the week that follows, model against baselines.

    The options are the training flow's (`flows.configs.backtest_options`); `seed` seeds
    the negative sampling, LightGBM (it replaces `params.seed`) and the bootstrap. Each week evaluates at
    most `max_holdout_users` of its labelled users, the gate's hash sample. With `tuning`
    enabled, each week's hyper-parameters are tuned on its own plan's validation weeks first. With a
    `candidate_budget`, each week's candidate counts are allocated on its plan's training and validation
    weeks (`training.allocation`; per history band with `candidate_bands` > 1), as the training flow does; 0
    keeps `config`'s counts.
    """
    if not weeks:
        raise ValueError("run_backtest: no weeks given")
    if training_weeks < 1 or validation_weeks < 1:
        raise ValueError(
            f"run_backtest: training_weeks and validation_weeks must be >= 1, got {training_weeks} and "
            f"{validation_weeks}"
        )
    weeks = sorted({parse_as_of(w) for w in weeks})
    params = replace(params, seed=seed)
    snapshots = _Snapshots(
        raw, {"recent_items": recent_items, "neighbours": neighbours, "collaborative": collaborative,
              "collaborative_items": collaborative_items},
    )  # fmt: skip

    def frame_cache(week_config: CandidateConfig) -> gate.FrameCache:
        return gate.FrameCache(
            lambda week, categories: frames.labelled_frame(
                snapshots.tables(week),
                snapshots.labels(week),
                week,
                week_config,
                categories,
                negatives_per_user=negatives_per_user,
                seed=seed,
                max_users=max_users,
                batch_users=batch_users,
            )  # fmt: skip
        )

    cache, cached_config = frame_cache(config), config
    options = {
        "params": params, "collaborative": collaborative, "k": k, "batch_users": batch_users,
        "max_holdout_users": max_holdout_users,
    }  # fmt: skip
    measure = {"week_of": snapshots.week, "max_users": max_users, "seed": seed}

    metric_rows, recall_rows, allocation_rows, timing_rows, evaluations = [], [], [], [], {}
    for as_of in weeks:
        features_before = snapshots.seconds
        plan = plan_backtest_week(
            snapshots, as_of, training_weeks, validation_weeks, min_training_users, max_training_weeks
        )
        for week in plan.weeks:  # the plan's snapshots, built before its frames: features_s and frames_s apart
            snapshots.tables(week)
        # The training flow's allocation: counts measured on the plan's own past, never its holdout.
        allocated = gate.allocate_on_plan(
            plan, config=config, budget=candidate_budget, bands=candidate_bands, **measure
        )
        week_config = allocated.config(config) if allocated is not None else config
        if week_config != cached_config:  # frames are built from the candidates: new counts, new frames
            cache, cached_config = frame_cache(week_config), week_config
        # Known at as_of: the encoding is fixed from the snapshot the model will score.
        categories = category_encoding(snapshots.tables(as_of).item_features)
        week_options, tuned = options, None
        if tuning is not None and tuning.enabled:
            tuned = gate.tune_on_plan(plan, categories, frame_of=cache.get, params=params, tuning=tuning)
            week_options = options | {"params": tuned.params}
        run = gate.train_and_evaluate_week(
            plan, categories, frame_of=cache.get, holdout_of=snapshots.week,
            champion=None, config=week_config, **week_options,
        )  # fmt: skip
        if allocated is not None:
            allocation_rows.append(
                _allocation_row(as_of, allocated, week_config, run.evaluation.candidate_recall, measure)
            )
        features_s = snapshots.seconds - features_before
        evaluations[as_of] = run.evaluation
        metric_rows += [{"week": str(as_of), "recommender": n, **m} for n, m in run.evaluation.metrics.items()]
        recall_rows.append({"week": str(as_of), **run.evaluation.candidate_recall})
        timing_rows.append(
            {
                "week": str(as_of),
                "train_weeks": len(plan.train),
                "train_rows": run.train_rows,
                "valid_rows": run.valid_rows,
                "best_iteration": run.model.best_iteration,
                "features_s": features_s,
                "frames_s": run.frames_s,  # the snapshots were built while planning: pure frame building
                "train_s": run.train_s,
                "evaluate_s": run.evaluate_s,
                "tuning_trials": tuned.trials if tuned else 0,
                "tuned": ", ".join(f"{k}={v:.3g}" for k, v in tuned.chosen.items()) if tuned else "",
            }
        )

    pooled = gate.pool_weeks(evaluations, confidence=confidence, resamples=resamples, seed=seed)
    gains = pl.DataFrame(
        [{"recommender": n, **{c: v for c, v in g.items() if c in ("gain", "low", "high", "units")}}
         for n, g in pooled.gains_record().items()],
        schema={"recommender": pl.Utf8, "gain": pl.Float64, "low": pl.Float64, "high": pl.Float64, "units": pl.Int64},
    )  # fmt: skip
    return BacktestResult(
        metrics=pl.DataFrame(metric_rows + _overall_metrics(metric_rows)),
        candidate_recall=pl.DataFrame(recall_rows + [{"week": OVERALL, **evaluation.combine_recall(recall_rows)}]),
        allocations=pl.DataFrame(allocation_rows + _overall_allocation(allocation_rows), schema=ALLOCATION_SCHEMA),
        timings=pl.DataFrame(timing_rows),
        gains=gains,
        k=k,
        training_weeks=training_weeks,
        validation_weeks=validation_weeks,
        confidence=confidence,
        min_training_users=min_training_users,
        max_training_weeks=max_training_weeks,
    )


ALLOCATION_SCHEMA = {
    "week": pl.Utf8,
    "counts": pl.Utf8,
    "allocated_on": pl.Utf8,
    "candidates_per_user": pl.Float64,
    "recall": pl.Float64,
    "best_single_source": pl.Utf8,
    "best_single_recall": pl.Float64,
    "truth_items": pl.Int64,
} | {f"single_{s}": pl.Float64 for s in SOURCES}


def _allocation_row(
    week: date, allocated: Allocation, config: CandidateConfig, recall: dict[str, float], measure: dict
) -> dict:
    """A week's allocation and, on its holdout, the recall of its candidates (`config`) against each source
    alone cut at the same candidates per user (`single_<source>`, the best of them named)."""
    per_user = recall["candidates_per_user"]
    holdout = allocation.measure_weeks([week], config=config, depth=allocated.budget, **measure)
    single = allocation.single_source_recall(holdout, per_user)
    row = {
        "week": str(week),
        "counts": allocation.counts_text(allocated.record()),
        "allocated_on": f"{allocated.weeks[0]} … {allocated.weeks[-1]}",
        "candidates_per_user": per_user,
        "recall": recall["all"],
        "truth_items": recall["truth_items"],
    }
    return row | _best_single({f"single_{s}": v for s, v in single.items()})


def _best_single(single: dict[str, float]) -> dict:
    best = max(SOURCES, key=lambda s: single[f"single_{s}"])
    return single | {"best_single_source": best, "best_single_recall": single[f"single_{best}"]}


def _overall_allocation(rows: list[dict]) -> list[dict]:
    """The weeks together: recalls weighted by truth pairs, candidates per user averaged over weeks."""
    total = sum(r["truth_items"] for r in rows)
    if not total:
        return []
    columns = ["recall", *[f"single_{s}" for s in SOURCES]]
    weighted = {c: sum(r[c] * r["truth_items"] for r in rows) / total for c in columns}
    per_user = sum(r["candidates_per_user"] for r in rows) / len(rows)
    overall = {"week": OVERALL, "counts": "", "allocated_on": "", "candidates_per_user": per_user, "truth_items": total}
    return [overall | {"recall": weighted.pop("recall")} | _best_single(weighted)]


def _overall_metrics(rows: list[dict]) -> list[dict]:
    recommenders = list(dict.fromkeys(r["recommender"] for r in rows))
    overall = []
    for name in recommenders:
        per_week = [
            {c: v for c, v in r.items() if c not in ("week", "recommender")} for r in rows if r["recommender"] == name
        ]
        overall.append({"week": OVERALL, "recommender": name, **metrics.combine_weeks(per_week)})
    return overall


def ndcg_ratios(result: BacktestResult) -> pl.DataFrame:
    """Per week and overall: the model's NDCG@k, the best baseline's, their ratio, and (overall only)
    the ratio's paired bootstrap interval over (user, week) (`ratio_low`, `ratio_high`)."""
    ndcg = f"ndcg@{result.k}"
    wide = result.metrics.pivot(on="recommender", index="week", values=ndcg, maintain_order=True)
    baseline_names = [n for n in evaluation.BASELINES if n in wide.columns]
    best_value = pl.max_horizontal(baseline_names)
    best_name = pl.coalesce([pl.when(pl.col(n) == best_value).then(pl.lit(n)) for n in baseline_names])
    bounds = result.gains.select(
        pl.lit(OVERALL).alias("week"),
        pl.col("recommender").alias("best_baseline"),
        (1 + pl.col("low")).alias("ratio_low"),
        (1 + pl.col("high")).alias("ratio_high"),
    )
    ratios = wide.select(
        "week",
        pl.col("model"),
        best_name.alias("best_baseline"),
        best_value.alias("best_baseline_ndcg"),
        (pl.col("model") / best_value).alias("ratio"),
    )
    return ratios.join(bounds, on=["week", "best_baseline"], how="left", maintain_order="left")


def format_table(result: BacktestResult) -> str:
    """The backtest as markdown: NDCG per week and overall against every baseline, all
    overall metrics, candidate recall and timings."""
    k = result.k
    ndcg = f"ndcg@{k}"
    wide = result.metrics.pivot(on="recommender", index="week", values=ndcg, maintain_order=True)
    users = result.metrics.filter(pl.col("recommender") == "model").select("week", "users")
    table = wide.join(users, on="week", maintain_order="left").join(ndcg_ratios(result), on="week", suffix="_r")
    names = ["model", *[n for n in evaluation.BASELINES if n in wide.columns]]
    weeks = [w for w in table["week"] if w != OVERALL]

    widening = (
        f", more (up to {result.max_training_weeks}) while they hold under {result.min_training_users} labelled users"
        if widens(result.training_weeks, result.min_training_users, result.max_training_weeks)
        else ""
    )
    lines = [
        f"Weekly backtest, {weeks[0]} … {weeks[-1]} ({len(weeks)} weeks): trained as of each week on up to "
        f"{result.training_weeks} labelled weeks{widening} (early stopping on the {_weeks(result.validation_weeks)} "
        "before it), "
        "scored on the week that follows; overall = micro-average over (user, week), with the "
        f"{result.confidence:.0%} paired bootstrap interval of the ratio over those units.",
        "",
        f"NDCG@{k}:",
        "",
        _markdown_row(["week", "users", *names, "best baseline", "model / best"]),
        _markdown_row(["---"] * (len(names) + 4)),
    ]
    for row in table.iter_rows(named=True):
        week = f"**{OVERALL}**" if row["week"] == OVERALL else row["week"]
        cells = [
            week,
            str(row["users"]),
            *[_number(row[n]) for n in names],
            row["best_baseline"],
            f"{row['ratio']:.2f}×"
            + ("" if row["ratio_low"] is None else f" [{row['ratio_low']:.2f}×, {row['ratio_high']:.2f}×]"),
        ]
        lines.append(_markdown_row(cells))

    units = result.gains["units"].max() if result.gains.height else 0
    lines += [
        "",
        f"The model against every baseline, {OVERALL}: NDCG@{k} ratio and relative gain with "
        f"{result.confidence:.0%} paired bootstrap intervals over {units} (user, week) units:",
        "",
        _markdown_row(["baseline", "model / baseline", f"{result.confidence:.0%} interval", "gain", "interval"]),
        _markdown_row(["---"] * 5),
    ]
    for row in result.gains.iter_rows(named=True):
        lines.append(
            _markdown_row(
                [
                    row["recommender"],
                    f"{1 + row['gain']:.2f}×",
                    f"[{1 + row['low']:.2f}×, {1 + row['high']:.2f}×]",
                    f"{row['gain']:+.1%}",
                    f"[{row['low']:+.1%}, {row['high']:+.1%}]",
                ]
            )
        )

    metric_columns = [f"{m}@{k}" for m in metrics.METRIC_NAMES]
    lines += ["", f"All metrics, {OVERALL}:", "", _markdown_row(["recommender", *metric_columns])]
    lines.append(_markdown_row(["---"] * (len(metric_columns) + 1)))
    for row in result.metrics.filter(pl.col("week") == OVERALL).iter_rows(named=True):
        lines.append(_markdown_row([row["recommender"], *[_number(row[c]) for c in metric_columns]]))

    recall_columns = list(evaluation.RECALL_KEYS)
    lines += [
        "",
        "Candidate recall (share of next-week new items among the candidates), per source and together:",
        "",
        _markdown_row(["week", *recall_columns, "candidates / user", "truth items"]),
        _markdown_row(["---"] * (len(recall_columns) + 3)),
    ]
    for row in result.candidate_recall.iter_rows(named=True):
        cells = [row["week"], *[f"{row[c]:.3f}" for c in recall_columns]]
        lines.append(_markdown_row([*cells, f"{row['candidates_per_user']:.0f}", str(row["truth_items"])]))
    if not result.allocations.is_empty():
        lines += _allocation_lines(result.allocations)

    timing_columns = ["train_weeks", "train_rows", "best_iteration", "features_s", "frames_s", "train_s", "evaluate_s"]
    lines += ["", "Timings (seconds; features are computed once per snapshot and reused):", ""]
    lines += [_markdown_row(["week", *timing_columns]), _markdown_row(["---"] * (len(timing_columns) + 1))]
    for row in result.timings.iter_rows(named=True):
        cells = [row["week"], *[str(row[c]) for c in timing_columns[:3]]]
        lines.append(_markdown_row(cells + [f"{row[c]:.1f}" for c in timing_columns[3:]]))
    tuned = result.timings.filter(pl.col("tuning_trials") > 0)
    if not tuned.is_empty():
        lines += ["", "Hyper-parameters tuned on each week's validation weeks (Optuna):", ""]
        lines += [_markdown_row(["week", "trials", "chosen"]), _markdown_row(["---"] * 3)]
        lines += [_markdown_row([r["week"], str(r["tuning_trials"]), r["tuned"]]) for r in tuned.iter_rows(named=True)]
    return "\n".join(lines) + "\n"


def _allocation_lines(allocations: pl.DataFrame) -> list[str]:
    """The counts each week's candidates were allocated, and their recall against the best source alone."""
    lines = [
        "",
        "Candidates allocated by measured recall (counts per user chosen on each plan's training and validation "
        "weeks; recall on the holdout, against each source alone cut at the same candidates per user):",
        "",
        _markdown_row(
            [
                "week",
                "counts",
                "allocated on",
                "candidates / user",
                "recall",
                "best single source",
                "its recall",
                "gain",
            ]
        ),  # fmt: skip
        _markdown_row(["---"] * 8),
    ]
    for row in allocations.iter_rows(named=True):
        gain = row["recall"] - row["best_single_recall"]
        cells = [row["week"], row["counts"], row["allocated_on"], f"{row['candidates_per_user']:.0f}"]
        cells += [f"{row['recall']:.3f}", row["best_single_source"], f"{row['best_single_recall']:.3f}", f"{gain:+.3f}"]
        lines.append(_markdown_row(cells))
    return lines


def _weeks(n: int) -> str:
    return "week" if n == 1 else f"{n} weeks"


def _number(value: float | None) -> str:
    """A metric cell; '–' where the recommender did not run that week (EASE above its catalogue bound)."""
    return "–" if value is None else f"{value:.4f}"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
