"""Training's I/O: the labelled weeks and tables it reads from the feature store, and the
registration (with lineage and the gate's decision) it writes to the model registry."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import date
from importlib.metadata import version as package_version

import polars as pl
import sqlalchemy as sa

from features import contracts
from features import store as feature_store
from ranking import registry
from ranking.candidates import CandidateConfig, SnapshotTables
from training import frames, plan, promotion
from training.gate import PooledEvaluation
from training.ranker import TrainedRanker

log = logging.getLogger(__name__)


def plan_training(
    engine: sa.Engine, as_of: date, training_weeks: int, gate_weeks: int, validation_weeks: int
) -> list[plan.WeekPlan]:
    """The gate's plans (`plan.plan_gate`) over the weeks whose user features and labels passed
    validation, the model trained at `as_of` last; warns when the newest of them is older than the
    week that just closed."""
    features = set(feature_store.passed_as_ofs(engine, contracts.USER_FEATURES.name))
    labelled = [d for d in feature_store.passed_as_ofs(engine, contracts.LABELS.name) if d in features]
    plans = plan.plan_gate(labelled, as_of, training_weeks, gate_weeks, validation_weeks)
    if (stale := plan.staleness(plans[-1])) is not None:
        log.warning(stale)
    return plans


def read_tables(engine: sa.Engine, as_of: date, user_ids: Sequence[int] | None = None) -> SnapshotTables:
    """The feature tables (`contracts.FEATURE_TABLES`) of one passed snapshot; with `user_ids`, the
    user-keyed tables hold only those users' rows (item-keyed tables are read whole)."""
    return SnapshotTables.from_frames(
        {
            t.name: feature_store.read_table(
                engine, t.name, as_of, user_ids=user_ids if "user_id" in t.column_names else None
            )
            for t in contracts.FEATURE_TABLES
        }
    )


def read_labels(engine: sa.Engine, as_of: date) -> pl.DataFrame:
    return feature_store.read_table(engine, contracts.LABELS.name, as_of)


def read_sampled_week(
    engine: sa.Engine, as_of: date, sample: Callable[[pl.Series], pl.Series]
) -> tuple[SnapshotTables, pl.DataFrame]:
    """One labelled week restricted to `sample(labelled users)`: its tables (only those users' rows in
    the user-keyed ones) and their labels. The labelled users (a new item that week and history
    before it) come from the labels and the user ids alone, so the week is never read whole.

    `sample` must keep the users it drew when given only them (`frames.sample_users` and
    `evaluation.sample_holdout_users` do): then training frames and evaluations of the restricted
    week equal those of the whole week.
    """
    labels = read_labels(engine, as_of)
    known = feature_store.read_table(engine, contracts.USER_FEATURES.name, as_of, columns=["user_id"])
    users = sample(frames.labelled_users(labels, known))
    labels = labels.join(users.to_frame("user_id"), on="user_id", how="semi")
    return read_tables(engine, as_of, user_ids=users.to_list()), labels


def read_item_features(engine: sa.Engine, as_of: date) -> pl.DataFrame:
    return feature_store.read_table(engine, contracts.ITEM_FEATURES.name, as_of)


def snapshot_digests(engine: sa.Engine, weeks: list[date]) -> dict[str, str]:
    """Lineage: the digest of every passed feature and label table of `weeks`, as `table@as_of`,
    and the raw source each week's features were computed from, as `source@as_of`."""
    summary = pl.concat(
        [feature_store.snapshot_summary(engine, w).with_columns(pl.lit(w).alias("as_of")) for w in weeks]
    )
    digests = {f"{r['table_name']}@{r['as_of']}": r["digest"] for r in summary.iter_rows(named=True) if r["passed"]}
    sources = feature_store.snapshot_sources(engine, weeks)
    return digests | {f"source@{w}": s for w, s in sources.items() if s is not None}


def register_and_gate(
    engine: sa.Engine,
    name: str,
    model: TrainedRanker,
    plans: list[plan.WeekPlan],
    pooled: PooledEvaluation,
    *,
    categories: list[str],
    config: CandidateConfig,
    k: int,
    margin: float,
    flow_run_id: str | None,
) -> tuple[int, promotion.Decision, registry.ModelRecord]:
    """Register the model (trained on the last of `plans`) with the gate's pooled evaluation and its
    lineage and, only if it passes the gate, as champion (one transaction). When the gate leaves a
    baseline to serve, register that baseline as a version and make it champion (one transaction).

    Returns the model's version, the gate's decision and the champion live afterwards.
    """
    held = registry.get_champion(engine, name)
    decision = promotion.decide(
        pooled.metrics,
        pooled.gains,
        metric=f"ndcg@{k}",
        margin=margin,
        champion_baseline=held.params["baseline"] if held is not None and held.kind == "baseline" else None,
        weeks=pooled.weeks,
    )
    week_plan = plans[-1]
    lineage = {
        "as_of": week_plan.as_of,
        "validation_as_of": week_plan.validation[-1],
        "holdout_as_of": week_plan.holdout,
        "feature_snapshots": snapshot_digests(engine, sorted({w for p in plans for w in p.weeks})),
        "flow_run_id": flow_run_id,
        "code_version": package_version("weekly-recs"),
        "actor": "training-flow",
    }
    gate = {"candidate_recall": pooled.candidate_recall, "gains": pooled.gains_record(),
            "gate_weeks": [str(w) for w in pooled.weeks]}  # fmt: skip
    version = registry.register_model(
        engine,
        name=name,
        model_text=model.model_text,
        feature_names=model.feature_names,
        encodings={"category": categories},
        params=model.params | {"best_iteration": model.best_iteration, "candidates": asdict(config)},
        metrics=pooled.metrics | gate,
        training_as_ofs=week_plan.train,
        status="registered" if decision.promote else "rejected",
        decision=decision,
        promote_reason=decision.reason if decision.promote else None,
        **lineage,
    )
    if decision.serve_baseline is not None:
        registry.register_model(
            engine,
            name=name,
            kind="baseline",
            model_text="",
            feature_names=[],
            encodings={},
            params={"baseline": decision.serve_baseline, "candidates": asdict(config)},
            # The version's own numbers under "model", as for a ranker; the rest is the same pooled evaluation.
            metrics=pooled.metrics | gate | {"model": pooled.metrics[decision.serve_baseline]},
            training_as_ofs=[],
            decision=decision,
            promote_reason=decision.reason,
            **lineage,
        )
    return version, decision, registry.get_champion(engine, name)
