"""Inference flow: champion + latest passed features → top-N per user → atomic Redis publish."""

import logging
import time
from datetime import UTC, date, datetime, timedelta

import polars as pl
import sqlalchemy as sa
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.futures import as_completed
from pydantic import SecretStr

from features import store
from features.collaborative import CollaborativeConfig
from flows import configs
from flows.common import TRANSIENT_IO, current_run_id, partition_runner, resolve_as_of, run_name
from flows.runs import run_body
from inference import archive, charts, publications, publish, quality, report, scoring, serving
from inference.checks import CheckBounds
from ranking import registry
from recsys.settings import Settings
from recsys.stores import Stores, advisory_lock, connect_redis, open_stores, redact_url, sqlalchemy_url

log = logging.getLogger(__name__)


@task(**TRANSIENT_IO)
def find_champion(engine, model_name: str) -> registry.ModelRecord:
    """The champion's record, checked before anything is written."""
    return scoring.find_champion(engine, model_name)


@task(**TRANSIENT_IO)
def find_snapshot(engine, as_of: date) -> date:
    """The feature snapshot to score from."""
    return scoring.find_snapshot(engine, as_of)


@task(**TRANSIENT_IO)
def list_users(engine, snapshot: date) -> pl.Series:
    """The users to score."""
    return scoring.list_users(engine, snapshot)


@task(**TRANSIENT_IO)
def fit_served_baseline(
    engine, record: registry.ModelRecord, snapshot: date, collaborative: CollaborativeConfig, options: dict
) -> scoring.ServedBaseline | None:
    """A baseline champion made ready once for every partition (EASE, ALS: the snapshot's stored lists, or
    fitted); None for a trained ranker."""
    return scoring.fit_served_baseline(
        engine, record, snapshot, collaborative, config=options["config"], n=options["n"]
    )


@task(**TRANSIENT_IO)
def start_publication(engine, client, prefix: str, as_of: date, keep: int) -> str:
    """Refuse a stale as_of, drop leftovers of killed runs, allocate a version."""
    return publish.start_publication(engine, client, prefix, as_of, keep=keep)


@task(**TRANSIENT_IO)
def score_partition(
    database_url: SecretStr, redis_url: SecretStr, cluster: bool, users: list[int], options: dict
) -> dict:
    """Score one partition and write its keys over connections of its own, so it runs on any worker."""
    engine = sa.create_engine(sqlalchemy_url(database_url.get_secret_value()), poolclass=sa.NullPool)
    client = connect_redis(redis_url.get_secret_value(), cluster=cluster)
    try:
        return scoring.score_partition(engine, client, users, **options)
    finally:
        client.close()
        engine.dispose()


@task(**TRANSIENT_IO)
def publish_fallback(engine, client, snapshot: date, prefix: str, version: str, n: int) -> list[int]:
    """Write the list that users without a personal list get; the list."""
    items = scoring.read_fallback_items(engine, snapshot, n)
    publish.write_fallback(client, prefix, version, items)
    return items


@task(**TRANSIENT_IO)
def archive_publication(engine, client, prefix: str, version: str, fallback: list[int], keep_weeks: int) -> int:
    """Copy the version's lists from Redis to the Postgres archive, then apply the retention; the list count."""
    archived = archive.archive_lists(engine, version, archive.read_published_lists(client, prefix, version))
    archive.archive_fallback(engine, version, fallback)
    archive.drop_old(engine, keep_weeks)
    return archived


@task(**TRANSIENT_IO)
def measure_quality(engine, week: date, options: dict) -> dict | None:
    """The realized quality of what was served in `week`, stored; None (with a warning) if it cannot be measured yet."""
    try:
        return quality.measure_week(engine, week, **options)
    except (archive.ArchiveMissing, store.SnapshotUnavailable) as missing:
        log.warning("realized quality of week %s not measured: %s", week, missing)
        return None


def report_quality(engine, settings: Settings, row: dict) -> list[str]:
    """The quality artifact with its trend chart and, if the measured week looks degraded, an event; the reasons."""
    week = row["as_of"]
    series = quality.quality_series(engine, max(settings.quality_trailing_weeks + 1, 12))
    reasons = quality.degradation_reasons(
        series, week, share=settings.quality_alert_share, trailing_weeks=settings.quality_trailing_weeks
    )
    create_markdown_artifact(
        key="realized-quality",
        markdown=quality.quality_markdown(series, reasons, charts.draw_quality_trend(series)),
        description=f"Realized quality of the week {week}",
    )
    if reasons:
        version = row["version"]
        emit_event(
            event="recsys.quality.degraded",
            resource={"prefect.resource.id": f"recsys.publication.{version}", "prefect.resource.name": version},
            payload={"week": str(week), "version": version, "model_version": row["model_version"],
                     "reasons": reasons, "ndcg": row["ndcg"], "popular_ndcg": row["popular_ndcg"]},
        )  # fmt: skip
        log.warning("realized quality degraded: %s", "; ".join(reasons))
    return reasons


@task(**TRANSIENT_IO)
def make_live(
    engine, client, prefix: str, version: str, personal: int, metadata: dict, keep: int, bounds: CheckBounds
) -> publish.PublishResult:
    """Verify every user key and the fallback are there, hold lists out of `bounds`, then swap the pointer in."""
    catalogue = publish.read_catalogue(engine, date.fromisoformat(metadata["feature_as_of"]))
    result = publish.finish_publication(
        client, prefix, version, expected_users=personal, metadata=metadata, keep=keep, bounds=bounds,
        catalogue=catalogue,
    )  # fmt: skip
    publications.mark_abandoned(engine, list(result.removed))  # held versions a newer one replaced
    return result


@task(**TRANSIENT_IO)
def record_publication(engine, fields: dict) -> None:
    """Insert or complete the publication's lineage row in Postgres."""
    publications.record_publication(engine, **fields)


@task(**TRANSIENT_IO)
def record_pointer_move(engine, prefix: str, result: publish.PublishResult, as_of: date) -> None:
    """Append the pointer move to the publication history (what `recsys publish history` shows)."""
    publications.record_pointer_move(
        engine, prefix=prefix, action="publish", from_version=result.previous, to_version=result.version,
        reason=f"weekly publication as_of {as_of}", actor=f"inference-flow:{current_run_id() or 'no-run'}",
    )  # fmt: skip


def score_partitions(stores: Stores, settings: Settings, users: pl.Series, options: dict) -> dict:
    """Run one score_partition task per hash partition of the users; the run's stats."""
    started = time.perf_counter()
    connections = {
        "database_url": SecretStr(stores.database_url),
        "redis_url": SecretStr(stores.redis_url),
        "cluster": settings.redis_cluster,
    }
    with partition_runner(settings) as runner:
        futures = [
            runner.submit(score_partition, parameters=connections | {"users": part, "options": options})
            for part in scoring.partition_users(users, settings.partitions)
        ]
        # Every partition has stopped writing before a failure is handled.
        for done, _ in enumerate(as_completed(futures), 1):
            log.info("partition finished", extra={"progress": ("scoring partitions", done, len(futures))})
        parts = [future.result() for future in futures]
    return scoring.combine_partition_stats(parts, len(users), time.perf_counter() - started)


@flow(name="inference", flow_run_name=run_name("infer"), timeout_seconds=3 * 3600)
@run_body
def inference_flow(as_of: date | None = None) -> dict:
    """Score every user with the champion and publish the week's recommendations atomically."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    prefix, keep, n = settings.redis_prefix, settings.keep_versions, settings.top_n
    started, started_at = time.perf_counter(), datetime.now(UTC)
    with open_stores(settings) as stores, advisory_lock(stores.engine, f"publish:{prefix}"):
        engine, client = stores.engine, stores.redis
        log.info("publishing to %s under prefix %s", redact_url(stores.redis_url), prefix)
        publications.ensure_schema(engine)
        archive.ensure_schema(engine)
        quality.ensure_schema(engine)
        record = find_champion(engine, settings.model_name)
        snapshot = find_snapshot(engine, as_of)
        source = store.snapshot_sources(engine, [snapshot]).get(snapshot)
        users = list_users(engine, snapshot)
        version = start_publication(engine, client, prefix, as_of, keep)
        record_publication(
            engine,
            {"version": version, "as_of": as_of, "model_name": record.name, "model_version": record.version,
             "model_kind": record.kind,
             "feature_as_of": snapshot, "feature_source": source, "n": n, "started_at": started_at, "status": "writing",
             "flow_run_id": current_run_id()},
        )  # fmt: skip
        try:
            options = configs.scoring_options(settings)
            baseline = fit_served_baseline(engine, record, snapshot, configs.collaborative_config(settings), options)
            options |= {"record": record, "snapshot": snapshot, "version": version, "baseline": baseline}
            stats = score_partitions(stores, settings, users, options)
            fallback = publish_fallback(engine, client, snapshot, prefix, version, n)
            archive_publication(engine, client, prefix, version, fallback, settings.archive_weeks)
            swap_started = time.perf_counter()
            metadata = publish.publication_metadata(
                record, snapshot, n=n, fallback_users=stats["fallback_users"], generated_at=started_at
            )
            bounds = configs.publication_bounds(settings)
            result = make_live(engine, client, prefix, version, stats["personal"], metadata, keep, bounds)
        except Exception as error:
            publish.abandon_publication(engine, client, prefix, version, error, keep=keep)
            raise
        stats |= {"finish_s": time.perf_counter() - swap_started, "total_s": time.perf_counter() - started}
        record_publication(
            engine,
            {"version": version, "user_count": stats["personal"], "fallback_user_count": stats["fallback_users"],
             "finished_at": datetime.now(UTC), "timings": stats, "status": "live", "checks": result.checks.as_dict()},
        )  # fmt: skip
        record_pointer_move(engine, prefix, result, as_of)
        samples = serving.get_recommendations(client, prefix, users.head(5).to_list())
    create_markdown_artifact(
        key="inference-publication",
        markdown=report.publication_markdown(result, record, as_of, snapshot, stats, samples, source=source),
        description=f"Recommendations {result.version}",
    )
    # The week that just closed: its labels were written by this Monday's feature run.
    with open_stores(settings) as stores:
        measured = measure_quality(stores.engine, as_of - timedelta(weeks=1), configs.quality_options(settings))
        alerts = report_quality(stores.engine, settings, measured) if measured else []
    return {
        "version": result.version,
        "as_of": str(as_of),
        "model_version": record.version,
        "model": record.label,
        "feature_as_of": str(snapshot),
        **stats,
        "realized_quality": measured,
        "quality_alerts": alerts,
    }
