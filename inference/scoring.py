"""Batch scoring: which model, snapshot and users; each partition's top-N lists written to Redis; the fallback.

A trained champion ranks the candidate × feature frame that training built (`ranking.candidates`);
a baseline champion (until a model wins the gate) recommends as `ranking.baselines` does. EASE
and ALS learn from the snapshot's whole history (user_id, item_id only): fitted once per run
(`fit_served_baseline`), the fitted model is handed to every partition, which scores its users
in batches; EASE above `ease_max_items` items is not fitted (memory 8·n² bytes) and recent
popularity serves instead, with a logged reason.
"""

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import lightgbm as lgb
import polars as pl
import redis
import sqlalchemy as sa

from features import contracts, store
from features.collaborative import CollaborativeConfig, FittedScorer
from inference import publish
from ranking import baselines, registry
from ranking.candidates import CandidateConfig, SnapshotTables, candidate_rows, with_stored_counts
from ranking.scoring import CompiledForest, check_model, compile_booster, recommend_with_model, timed, user_batches
from recsys.partitions import all_partitions, in_partition

log = logging.getLogger(__name__)

USER_TABLES = [c for c in contracts.FEATURE_TABLES if "user_id" in c.key]
ITEM_TABLES = [c for c in contracts.FEATURE_TABLES if "user_id" not in c.key]


DEFAULT_BASELINE = "recent_popular"


def find_champion(engine: sa.Engine, model_name: str) -> registry.ModelRecord:
    """The champion's record, after checking a ranker's text's sha256 and that this code can feed it.

    Before any champion exists (no training run succeeded yet), a record of the default
    baseline that is not in the registry: model name `baseline:recent_popular`, no version.
    """
    registry.ensure_schema(engine)  # a database no training run has touched yet has no registry
    if registry.get_champion(engine, model_name) is None:
        log.warning("model %s has no champion yet: serving the baseline %s", model_name, DEFAULT_BASELINE)
        return default_baseline_record()
    _, record = registry.load_model(engine, model_name)
    if record.kind == "ranker":
        check_model(record.feature_names, record.encodings, f"{record.name} v{record.version}")
    return record


def default_baseline_record() -> registry.ModelRecord:
    """What serves before any model version is champion: recent popularity, named as such in the lineage."""
    return registry.ModelRecord(
        name=f"baseline:{DEFAULT_BASELINE}", version=None, created_at=None, status="champion", as_of=None,
        training_as_ofs=[], validation_as_of=None, holdout_as_of=None, feature_snapshots={}, feature_names=[],
        encodings={}, params={"baseline": DEFAULT_BASELINE}, metrics={}, decision=None, model_sha256="",
        flow_run_id=None, code_version=None, kind="baseline",
    )  # fmt: skip


def find_snapshot(engine: sa.Engine, as_of: date) -> date:
    """The latest as_of at or before `as_of` whose every feature table passed validation."""
    passed = set.intersection(*(set(store.passed_as_ofs(engine, c.name)) for c in contracts.FEATURE_TABLES))
    usable = [d for d in passed if d <= as_of]
    if not usable:
        raise store.SnapshotUnavailable(
            f"no feature snapshot at or before {as_of} passed validation for all of "
            f"{[c.name for c in contracts.FEATURE_TABLES]}: run the feature flow first"
        )
    snapshot = max(usable)
    if snapshot < as_of:
        log.warning("latest passed feature snapshot is %s, older than as_of %s: publishing from it", snapshot, as_of)
    return snapshot


def list_users(engine: sa.Engine, snapshot: date) -> pl.Series:
    """The users to score: every user with features in the snapshot."""
    return store.read_table(engine, contracts.USER_FEATURES.name, snapshot, columns=["user_id"])["user_id"]


def partition_users(user_ids: pl.Series, partitions: int) -> list[list[int]]:
    """The users of each of `partitions` partitions (`recsys.partitions`, as the feature flow splits them), sorted."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    users = pl.DataFrame({"user_id": user_ids.cast(pl.Int64)}).unique().sort("user_id")
    return [users.filter(in_partition("user_id", part))["user_id"].to_list() for part in all_partitions(partitions)]


def recommend_users(
    booster: lgb.Booster | CompiledForest,
    feature_names: list[str],
    categories: list[str],
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    n: int,
    *,
    steps: dict[str, float] | None = None,
) -> pl.DataFrame:
    """Each user's top-n item ids as one list per user (user_id, items), best first.

    Users without any candidate (e.g. every item already consumed) get no row. `steps`
    adds each step's seconds (frame, predict, top_n, lists).
    """
    ranked = recommend_with_model(booster, feature_names, tables, users, config, categories, n, steps=steps)
    with timed(steps, "lists"):
        return (
            ranked.sort("user_id", "rank")
            .group_by("user_id", maintain_order=True)
            .agg(pl.col("item_id").alias("items"))
        )


def recommend_baseline(
    baseline: str,
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    n: int,
    fitted: dict[str, baselines.CollaborativeLists] | None = None,
) -> pl.DataFrame:
    """Each user's top-n item ids by the named baseline, as `recommend_users` returns them (user_id, items).

    EASE and ALS need `fitted`: `baselines.fit_collaborative` on the snapshot's whole history, or the
    snapshot's stored lists (`ServedBaseline.lists`)."""
    _check_baseline(baseline)
    top = baselines.recommend(baseline, tables, users, n, config, fitted or {})
    return top.sort("user_id", "rank").group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("items"))


@dataclass(frozen=True)
class ServedBaseline:
    """The baseline a run serves and, for EASE or ALS, where its lists come from: the snapshot's
    `collaborative_scores`, read with each batch's users (`stored_depth` items per user kept there), or
    the model fitted on the snapshot's history (`fitted`)."""

    name: str
    fitted: dict[str, FittedScorer]
    stored_depth: int | None = None

    def lists(self, tables: SnapshotTables) -> dict[str, baselines.CollaborativeLists]:
        """The collaborative source `recommend_baseline` takes for a batch's `tables`."""
        if self.stored_depth is None:
            return self.fitted
        lists = baselines.stored_lists(tables.collaborative_scores, self.name)
        return {self.name: baselines.StoredLists(self.name, lists, self.stored_depth)}


def fit_served_baseline(
    engine: sa.Engine,
    record: registry.ModelRecord,
    snapshot: date,
    collaborative: CollaborativeConfig,
    *,
    config: CandidateConfig,
    n: int,
) -> ServedBaseline | None:
    """The baseline champion of `record` ready to serve `n` items per user, once per run for every partition;
    None for a trained ranker. EASE's or ALS's lists are read from the snapshot's `collaborative_scores` when
    it covers them (consumed items excluded, at least `n` items kept per user: the same lists as the
    fitted model's); otherwise the model is fitted on the snapshot's history, and recent popularity serves
    when EASE's catalogue bound refuses it (logged)."""
    if record.kind != "baseline":
        return None
    baseline = record.params["baseline"]
    _check_baseline(baseline)
    if baseline not in baselines.COLLABORATIVE:
        return ServedBaseline(baseline, {})
    if config.exclude_consumed:
        depth = store.max_in_snapshot(engine, contracts.COLLABORATIVE_SCORES.name, snapshot, f"{baseline}_rank")
        if baseline == "als":  # kept as factors: its lists are computed as deep as the snapshot asked
            factors = store.max_in_snapshot(engine, contracts.ALS_ITEM_FACTORS.name, snapshot, "items_per_user")
            depth = max(depth, factors)
        if depth >= n:
            log.info("champion baseline %s served from collaborative_scores of %s (%d items per user kept)",
                     baseline, snapshot, depth)  # fmt: skip
            return ServedBaseline(baseline, {}, depth)
        log.info("champion baseline %s fitted: collaborative_scores of %s keeps %d items per user, %d served",
                 baseline, snapshot, depth, n)  # fmt: skip
    history = store.read_table(engine, contracts.USER_ITEM_HISTORY.name, snapshot, columns=["user_id", "item_id"])
    fitted = baselines.fit_collaborative(history, collaborative, names=[baseline])
    if baseline not in fitted:
        log.warning("champion baseline %s cannot be fitted on snapshot %s: serving %s", baseline, snapshot,
                    DEFAULT_BASELINE)  # fmt: skip
        return ServedBaseline(DEFAULT_BASELINE, {})
    return ServedBaseline(baseline, fitted)


def score_partition(
    engine: sa.Engine,
    client: redis.Redis,
    users: list[int],
    *,
    record: registry.ModelRecord,
    snapshot: date,
    version: str,
    config: CandidateConfig,
    n: int,
    batch_users: int,
    prefix: str,
    chunk: int,
    baseline: ServedBaseline | None = None,
    compiled_dir: Path | None = None,
) -> dict:
    """Score `users` with the model of `record` (a ranker, or `baseline`: its champion baseline as
    `fit_served_baseline` made it ready) and write their keys of `version`; counts and seconds per step.

    Reads the item tables once and the user tables `batch_users` users at a time, so memory
    follows the batch size, not the user count. The ranker is compiled to native code when the
    partition is large enough to pay for it (`ranking.scoring.compile_booster`; kept in `compiled_dir`
    when given), with the same scores.
    """
    if record.kind == "baseline" and baseline is None:
        raise ValueError(
            f"score_partition: {record.label} serves a baseline: pass baseline=fit_served_baseline(...), "
            "fitted once per run"
        )
    config = with_stored_counts(config, record.params)  # the candidates the model was trained on
    stats = {"users": len(users), "personal": 0, "read_s": 0.0, "score_s": 0.0, "write_s": 0.0, "pid": os.getpid()}
    steps: dict[str, float] = {}
    with _timing(stats, "read_s"):
        booster = None if record.kind == "baseline" else registry.load_model(engine, record.name, record.version)[0]
        items = {c.name: store.read_table(engine, c.name, snapshot) for c in ITEM_TABLES}
    if booster is not None:
        with _timing(stats, "score_s"), timed(steps, "compile"):
            booster = compile_booster(booster, rows=candidate_rows(len(users), config), cache_dir=compiled_dir)
    for batch in user_batches(users, batch_users):
        with _timing(stats, "read_s"):
            tables = items | {c.name: store.read_table(engine, c.name, snapshot, user_ids=batch) for c in USER_TABLES}
        with _timing(stats, "score_s"):
            snapshot_tables, batch_ids = SnapshotTables.from_frames(tables), pl.Series("user_id", batch, pl.Int64)
            if booster is None:
                lists = baseline.lists(snapshot_tables)
                recs = recommend_baseline(baseline.name, snapshot_tables, batch_ids, config, n, lists)
            else:
                recs = recommend_users(
                    booster, record.feature_names, record.encodings["category"], snapshot_tables, batch_ids,
                    config, n, steps=steps,
                )  # fmt: skip
        with _timing(stats, "write_s"):
            stats["personal"] += publish.write_recommendations(client, prefix, version, recs, chunk=chunk)
    log.info(
        "partition of %d users: %d personal lists; read %.1fs, score %.1fs (%s), write %.1fs",
        len(users), stats["personal"], stats["read_s"], stats["score_s"],
        ", ".join(f"{step} {seconds:.1f}s" for step, seconds in steps.items()), stats["write_s"],
    )  # fmt: skip
    return stats | {"score_steps": steps}


def combine_partition_stats(parts: list[dict], users: int, seconds: float) -> dict:
    """The run's stats from its partitions' (summed counts and step seconds), its wall time and rate.

    Scored users who got no personal list (no candidate left) read the fallback.
    """
    stats = {key: sum(part[key] for part in parts) for key in ("personal", "read_s", "score_s", "write_s")}
    steps: dict[str, float] = {}
    for part in parts:
        for step, step_s in part.get("score_steps", {}).items():
            steps[step] = steps.get(step, 0.0) + step_s
    return stats | {
        "score_steps": steps,
        "users": users,
        "fallback_users": users - stats["personal"],
        "partitions_s": seconds,
        "users_per_s": users / seconds,
        "worker_pids": sorted({part["pid"] for part in parts}),
    }


def fallback_items(item_features: pl.DataFrame, n: int) -> list[int]:
    """The list for users without personal recommendations: recent popularity, ties by item id."""
    return item_features.sort("popularity_rank_4w", "item_id").head(n).get_column("item_id").to_list()


def read_fallback_items(engine: sa.Engine, snapshot: date, n: int) -> list[int]:
    """`fallback_items` of the snapshot's item features."""
    columns = ["item_id", "popularity_rank_4w"]
    return fallback_items(store.read_table(engine, contracts.ITEM_FEATURES.name, snapshot, columns=columns), n)


def _check_baseline(baseline: str) -> None:
    if baseline not in baselines.NAMES:
        raise ValueError(
            f"unknown baseline {baseline!r}: expected one of {', '.join(baselines.NAMES)};"
            " promote another model version"
        )


@contextmanager
def _timing(stats: dict, key: str) -> Iterator[None]:
    """Add the seconds the block takes to `stats[key]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stats[key] += time.perf_counter() - started
