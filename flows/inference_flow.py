"""Inference flow: champion + latest passed features → top-N per user → atomic Redis publish."""

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

import polars as pl
import redis
import sqlalchemy as sa
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import SecretStr

from features import contracts, store
from flows import configs
from flows.common import IO, current_run_id, resolve_as_of, run_name
from inference import publications, scoring, serving
from ranking import registry
from ranking.candidates import SnapshotTables
from ranking.scoring import check_model, user_batches
from recsys.settings import Settings
from recsys.stores import advisory_lock, connect_redis, open_stores, redact_url, sqlalchemy_url

log = logging.getLogger(__name__)

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, sa.exc.OperationalError, ConnectionError, TimeoutError)


def is_transient(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a lost or timed-out connection worth retrying."""
    while error is not None:
        if isinstance(error, _TRANSIENT) and not isinstance(error, redis.AuthenticationError):
            return True
        error = error.__cause__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a tampered model, bad input or a lost compare-and-set fails at once."""
    return is_transient(state.result(raise_on_failure=False))


# Retries (with backoff) only when a connection was lost; every other failure is final.
TRANSIENT_IO = IO | {"retry_condition_fn": retry_if_transient}
USER_TABLES = [c for c in contracts.FEATURE_TABLES if "user_id" in c.key]
ITEM_TABLES = [c for c in contracts.FEATURE_TABLES if "user_id" not in c.key]


@task(**TRANSIENT_IO)
def find_champion(engine, model_name: str) -> registry.ModelRecord:
    """The champion's record, after checking its text's sha256 and that this code can feed it."""
    if registry.get_champion(engine, model_name) is None:
        raise registry.ModelNotFoundError(f"model {model_name} has no champion yet: run the training flow first")
    _, record = registry.load_model(engine, model_name)
    check_model(record.feature_names, record.encodings, f"{record.name} v{record.version}")
    return record


@task(**TRANSIENT_IO)
def find_snapshot(engine, as_of: date) -> date:
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


@task(**TRANSIENT_IO)
def list_users(engine, snapshot: date) -> pl.Series:
    return store.read_table(engine, contracts.USER_FEATURES.name, snapshot, columns=["user_id"])["user_id"]


@task(**TRANSIENT_IO)
def start_publication(engine, client, settings: Settings, as_of: date) -> str:
    """Refuse an as_of older than the live one, drop leftovers of killed runs, allocate a version."""
    serving.refuse_stale(client, settings.redis_prefix, as_of)
    removed = serving.cleanup_stale_versions(client, settings.redis_prefix, keep=settings.keep_versions)
    publications.mark_abandoned(engine, removed)
    return serving.begin_publication(client, settings.redis_prefix, as_of)


@task(**TRANSIENT_IO)
def score_partition(
    database_url: SecretStr,
    redis_url: SecretStr,
    settings: Settings,
    record: registry.ModelRecord,
    snapshot: date,
    version: str,
    users: list[int],
) -> dict:
    """Score one partition batch by batch and write its keys; opens its own connections (any worker).

    Reads the item tables once and the user tables one batch of users at a time, so memory
    follows the batch size, not the user count.
    """
    stats = {"users": len(users), "personal": 0, "read_s": 0.0, "score_s": 0.0, "write_s": 0.0, "pid": os.getpid()}
    engine = sa.create_engine(sqlalchemy_url(database_url.get_secret_value()), poolclass=sa.NullPool)
    client = connect_redis(redis_url.get_secret_value(), cluster=settings.redis_cluster)
    try:
        with timing(stats, "read_s"):
            booster, _ = registry.load_model(engine, record.name, record.version)
            items = {c.name: store.read_table(engine, c.name, snapshot) for c in ITEM_TABLES}
        config = configs.candidate_config(settings)
        for batch in user_batches(users, settings.score_batch_users):
            with timing(stats, "read_s"):
                tables = items | {
                    c.name: store.read_table(engine, c.name, snapshot, user_ids=batch) for c in USER_TABLES
                }
            with timing(stats, "score_s"):
                recs = scoring.recommend_users(
                    booster, record.feature_names, record.encodings["category"], SnapshotTables.from_frames(tables),
                    pl.Series("user_id", batch, pl.Int64), config, settings.top_n,
                )  # fmt: skip
            with timing(stats, "write_s"):
                stats["personal"] += serving.write_recommendations(
                    client, settings.redis_prefix, version, recs, chunk=settings.publish_chunk
                )
        log.info(
            "partition of %d users: %d personal lists; read %.1fs, score %.1fs, write %.1fs",
            len(users), stats["personal"], stats["read_s"], stats["score_s"], stats["write_s"],
        )  # fmt: skip
        return stats
    finally:
        client.close()
        engine.dispose()


@task(**TRANSIENT_IO)
def publish_fallback(engine, client, settings: Settings, snapshot: date, version: str) -> list[int]:
    """Write the recent-popularity list that users without a personal list get."""
    items = store.read_table(engine, contracts.ITEM_FEATURES.name, snapshot, columns=["item_id", "popularity_rank_4w"])
    fallback = scoring.fallback_items(items, settings.top_n)
    serving.write_fallback(client, settings.redis_prefix, version, fallback)
    return fallback


@task(**TRANSIENT_IO)
def make_live(client, settings: Settings, version: str, personal: int, metadata: dict) -> serving.PublishResult:
    """Verify every user key and the fallback are there, then compare-and-set the live pointer."""
    return serving.finish_publication(
        client, settings.redis_prefix, version, expected_users=personal, metadata=metadata, keep=settings.keep_versions
    )


@task(**TRANSIENT_IO)
def record_publication(engine, fields: dict) -> None:
    """Insert or complete the publication's lineage row in Postgres."""
    publications.record_publication(engine, **fields)


@task(**TRANSIENT_IO)
def record_pointer_move(engine, prefix: str, result: serving.PublishResult, as_of: date) -> None:
    """Append the pointer move to the publication history (what `recsys publish history` shows)."""
    publications.record_pointer_move(
        engine, prefix=prefix, action="publish", from_version=result.previous, to_version=result.version,
        reason=f"weekly publication as_of {as_of}", actor=f"inference-flow:{current_run_id() or 'no-run'}",
    )  # fmt: skip


def abandon(stores, settings: Settings, version: str, error: Exception) -> None:
    """Record why the publication failed and remove its keys; never hides the original error."""
    status = "stale" if isinstance(error, serving.StalePublication) else "failed"
    try:
        publications.record_publication(
            stores.engine, version=version, status=status, finished_at=datetime.now(UTC), error=str(error)[:2000]
        )
        serving.cleanup_stale_versions(stores.redis, settings.redis_prefix, keep=settings.keep_versions)
    except (redis.RedisError, sa.exc.SQLAlchemyError) as cleanup_error:
        log.warning("could not record or clean up failed publication %s: %s", version, cleanup_error)


@contextmanager
def timing(stats: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `stats[key]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stats[key] += time.perf_counter() - started


def publication_markdown(
    result: serving.PublishResult, record, as_of: date, snapshot: date, stats: dict, samples
) -> str:
    stale = [f"⚠️ the latest passed feature snapshot is {snapshot}, older than as_of {as_of}", ""]
    lines = [
        f"# Published {result.version}",
        "",
        *(stale if snapshot < as_of else []),
        f"- model: {record.name} v{record.version}; feature snapshot {snapshot}; previous version {result.previous}",
        f"- users with personal lists: {stats['personal']}; users on the fallback: {stats['fallback_users']}",
        f"- wall time (s): scoring and writing {stats['partitions_s']:.1f} "
        f"({stats['users_per_s']:.0f} users/s), pointer swap {stats['finish_s']:.2f}, total {stats['total_s']:.1f}",
        f"- summed over partitions (s): read {stats['read_s']:.1f}, score {stats['score_s']:.1f}, "
        f"write {stats['write_s']:.1f}",
        "",
        "| user | items |",
        "|---|---|",
        *[f"| {s.user_id} | {s.items[:10]} |" for s in samples],
    ]
    return "\n".join(lines)


@contextmanager
def partition_runner(settings: Settings) -> Iterator[TaskRunner]:
    """Where the partition tasks run, chosen when the flow runs (so served deployments follow the settings).

    A Dask task runner on `settings.dask_address` if set; else a thread pool running at
    most `settings.partition_workers` partitions at once (default: one per CPU), since
    each running partition holds one batch of candidates in memory.
    """
    if settings.dask_address:
        from prefect_dask import DaskTaskRunner

        log.info("scoring partitions on the Dask cluster at %s", settings.dask_address)
        with DaskTaskRunner(address=settings.dask_address) as runner:
            yield runner
        return
    workers = settings.partition_workers or os.cpu_count() or 1
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        yield runner


def score_partitions(stores, settings: Settings, record, snapshot: date, version: str, users: pl.Series) -> dict:
    """Run one score_partition task per hash partition of the users; their summed stats."""
    started = time.perf_counter()
    urls = SecretStr(stores.database_url), SecretStr(stores.redis_url)
    names = ("database_url", "redis_url", "settings", "record", "snapshot", "version", "users")
    with partition_runner(settings) as runner:
        futures = [
            runner.submit(
                score_partition,
                parameters=dict(zip(names, (*urls, settings, record, snapshot, version, part), strict=True)),
            )
            for part in scoring.partition_users(users, settings.partitions)
        ]
        wait(futures)  # every partition has stopped writing before a failure is handled
        parts = [future.result() for future in futures]
    stats = {key: sum(part[key] for part in parts) for key in ("personal", "read_s", "score_s", "write_s")}
    seconds = time.perf_counter() - started
    return stats | {
        "users": len(users),
        "fallback_users": len(users) - stats["personal"],
        "partitions_s": seconds,
        "users_per_s": len(users) / seconds,
        "worker_pids": sorted({part["pid"] for part in parts}),
    }


def publication_metadata(record: registry.ModelRecord, snapshot: date, stats: dict, settings: Settings, at) -> dict:
    """The metadata hash clients read next to the lists (see inference.serving)."""
    return {
        "model_version": f"{record.name}:{record.version}",
        "generated_at": at.isoformat(),
        "n": settings.top_n,
        "fallback_user_count": stats["fallback_users"],
        "feature_as_of": snapshot.isoformat(),
    }


@flow(name="inference", flow_run_name=run_name("infer"), timeout_seconds=3 * 3600)
def inference_flow(as_of: date | None = None) -> dict:
    """Score every user with the champion and publish the week's recommendations atomically."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    started, started_at = time.perf_counter(), datetime.now(UTC)
    with open_stores(settings) as stores, advisory_lock(stores.engine, f"publish:{settings.redis_prefix}"):
        log.info("publishing to %s under prefix %s", redact_url(stores.redis_url), settings.redis_prefix)
        publications.ensure_schema(stores.engine)
        record = find_champion(stores.engine, settings.model_name)
        snapshot = find_snapshot(stores.engine, as_of)
        users = list_users(stores.engine, snapshot)
        version = start_publication(stores.engine, stores.redis, settings, as_of)
        record_publication(
            stores.engine,
            {"version": version, "as_of": as_of, "model_name": record.name, "model_version": record.version,
             "feature_as_of": snapshot, "n": settings.top_n, "started_at": started_at, "status": "writing",
             "flow_run_id": current_run_id()},
        )  # fmt: skip
        try:
            stats = score_partitions(stores, settings, record, snapshot, version, users)
            publish_fallback(stores.engine, stores.redis, settings, snapshot, version)
            swap_started = time.perf_counter()
            metadata = publication_metadata(record, snapshot, stats, settings, started_at)
            result = make_live(stores.redis, settings, version, stats["personal"], metadata)
        except Exception as error:
            abandon(stores, settings, version, error)
            raise
        stats |= {"finish_s": time.perf_counter() - swap_started, "total_s": time.perf_counter() - started}
        record_publication(
            stores.engine,
            {"version": version, "user_count": stats["personal"], "fallback_user_count": stats["fallback_users"],
             "finished_at": datetime.now(UTC), "timings": stats, "status": "live"},
        )  # fmt: skip
        record_pointer_move(stores.engine, settings.redis_prefix, result, as_of)
        samples = serving.get_recommendations(stores.redis, settings.redis_prefix, users.head(5).to_list())
    create_markdown_artifact(
        key="inference-publication",
        markdown=publication_markdown(result, record, as_of, snapshot, stats, samples),
        description=f"Recommendations {result.version}",
    )
    return {
        "version": result.version,
        "as_of": str(as_of),
        "model_version": record.version,
        "feature_as_of": str(snapshot),
        **stats,
    }
