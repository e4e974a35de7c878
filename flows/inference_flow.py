"""Inference flow: champion + latest passed features → top-N per user → atomic Redis publish."""

import logging
import time
from datetime import UTC, date, datetime

import polars as pl
import redis
import sqlalchemy as sa
from prefect import Flow, flow, task
from prefect.artifacts import create_markdown_artifact

from features import contracts, store
from flows.common import IO, current_run_id, resolve_as_of, run_name
from inference import publications, scoring, serving
from recsys.settings import Settings
from recsys.stores import advisory_lock, open_stores, sqlalchemy_url
from training import registry
from training.candidates import CandidateConfig, SnapshotTables

log = logging.getLogger(__name__)


@task(**IO)
def find_champion(engine, settings: Settings) -> registry.ModelRecord:
    """The champion's record, after checking its text hash and that this code can feed it."""
    if registry.get_champion(engine, settings.model_name) is None:
        raise LookupError(f"model {settings.model_name} has no champion yet: run the training flow first")
    _, record = registry.load_model(engine, settings.model_name)
    scoring.check_model_features(record.feature_names, f"{record.name} v{record.version}")
    return record


@task(**IO)
def find_snapshot(engine, as_of: date) -> date:
    """The latest passed feature snapshot at or before `as_of` (says so when it is older)."""
    snapshot = store.latest_passed_as_of(engine, contracts.USER_FEATURES.name, at_or_before=as_of)
    if snapshot is None:
        raise LookupError(f"no passed feature snapshot at or before {as_of}: run the feature flow first")
    if snapshot < as_of:
        log.warning("latest passed feature snapshot is %s, older than as_of %s: publishing from it", snapshot, as_of)
    return snapshot


@task(**IO)
def list_users(engine, snapshot: date) -> pl.Series:
    return store.read_table(engine, contracts.USER_FEATURES.name, snapshot, columns=["user_id"])["user_id"]


@task(**IO)
def score_partition(
    database_url: str,
    redis_url: str,
    settings: Settings,
    record: registry.ModelRecord,
    snapshot: date,
    version: str,
    users: list[int],
) -> dict:
    """Score one partition of users and write their keys; opens its own connections (any worker)."""
    started = time.perf_counter()
    engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        booster, _ = registry.load_model(engine, record.name, record.version)
        frames = {
            c.name: store.read_table(engine, c.name, snapshot, user_ids=users if "user_id" in c.key else None)
            for c in contracts.FEATURE_TABLES
        }
        loaded = time.perf_counter()
        config = CandidateConfig(
            recent_items=settings.recent_items_per_user, exclude_consumed=settings.exclude_consumed
        )
        recs = scoring.recommend_users(
            booster, record.feature_names, record.encodings["category"], SnapshotTables.from_frames(frames),
            pl.Series("user_id", users, pl.Int64), config, settings.top_n,
        )  # fmt: skip
        scored = time.perf_counter()
        written = serving.write_recommendations(
            client, settings.redis_prefix, version, recs, chunk=settings.publish_chunk
        )
        return {
            "users": len(users), "written": written, "personal": recs.height,
            "read_s": loaded - started, "score_s": scored - loaded, "write_s": time.perf_counter() - scored,
        }  # fmt: skip
    finally:
        client.close()
        engine.dispose()


@task(**IO)
def publish_fallback(engine, client, settings: Settings, snapshot: date, version: str) -> list[int]:
    items = store.read_table(engine, contracts.ITEM_FEATURES.name, snapshot, columns=["item_id", "popularity_rank_4w"])
    fallback = scoring.fallback_items(items, settings.top_n)
    serving.write_fallback(client, settings.redis_prefix, version, fallback)
    return fallback


def publication_markdown(result: serving.PublishResult, record, snapshot: date, stats: dict, samples) -> str:
    lines = [
        f"# Published {result.version}",
        "",
        f"- model: {record.name} v{record.version}; feature snapshot {snapshot}; previous version {result.previous}",
        f"- users with personal lists: {stats['personal']}; users on the fallback: {stats['fallback_users']}",
        f"- timings (s): read {stats['read_s']:.1f}, score {stats['score_s']:.1f}, write {stats['write_s']:.1f}, "
        f"total {stats['total_s']:.1f}",
        "",
        "| user | items |",
        "|---|---|",
        *[f"| {s.user_id} | {s.items[:10]} |" for s in samples],
    ]
    return "\n".join(lines)


@flow(name="inference", flow_run_name=run_name("infer"), timeout_seconds=3 * 3600)
def inference_flow(as_of: date | None = None) -> dict:
    """Score every user with the champion and publish the week's recommendations atomically."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    started = time.perf_counter()
    started_at = datetime.now(UTC)
    with open_stores(settings) as stores, advisory_lock(stores.engine, f"publish:{settings.redis_prefix}"):
        publications.ensure_schema(stores.engine)
        record = find_champion(stores.engine, settings)
        snapshot = find_snapshot(stores.engine, as_of)
        users = list_users(stores.engine, snapshot)
        serving.cleanup_stale_versions(stores.redis, settings.redis_prefix, keep=settings.keep_versions)
        version = serving.begin_publication(stores.redis, settings.redis_prefix, as_of)
        futures = [
            score_partition.submit(stores.database_url, stores.redis_url, settings, record, snapshot, version, part)
            for part in scoring.partition_users(users, settings.partitions)
        ]
        parts = [f.result() for f in futures]
        publish_fallback(stores.engine, stores.redis, settings, snapshot, version)
        written = sum(p["personal"] for p in parts)
        stats = {k: sum(p[k] for p in parts) for k in ("personal", "read_s", "score_s", "write_s")}
        stats |= {"fallback_users": users.len() - written, "total_s": time.perf_counter() - started}
        result = serving.finish_publication(
            stores.redis, settings.redis_prefix, version, expected_users=written, keep=settings.keep_versions,
            metadata={"model_version": f"{record.name}:{record.version}", "generated_at": started_at.isoformat(),
                      "n": settings.top_n, "fallback_user_count": stats["fallback_users"],
                      "feature_as_of": snapshot.isoformat()},
        )  # fmt: skip
        publications.record_publication(
            stores.engine, version=result.version, as_of=as_of, model_name=record.name,
            model_version=record.version, feature_as_of=snapshot, user_count=written,
            fallback_user_count=stats["fallback_users"], n=settings.top_n, started_at=started_at,
            finished_at=datetime.now(UTC), timings=stats, status="live", flow_run_id=current_run_id(),
        )  # fmt: skip
        samples = serving.get_recommendations(stores.redis, settings.redis_prefix, users.head(5).to_list())
    create_markdown_artifact(
        key="inference-publication",
        markdown=publication_markdown(result, record, snapshot, stats, samples),
        description=f"Recommendations {result.version}",
    )
    return {"version": result.version, "as_of": str(as_of), "model_version": record.version, **stats}


def inference_flow_for(settings: Settings) -> Flow:
    """The inference flow on a Dask cluster when `dask_address` is set, else on local threads."""
    if not settings.dask_address:
        return inference_flow
    from prefect_dask import DaskTaskRunner

    return inference_flow.with_options(task_runner=DaskTaskRunner(address=settings.dask_address))
