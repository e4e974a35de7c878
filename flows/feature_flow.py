"""Feature flow: raw events → point-in-time features and labels → validated → Postgres."""

import logging
from datetime import UTC, date, datetime, timedelta

import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from features import contracts, store, transform
from features.sources import RawData, read_source
from features.synthetic import generate_log, write_log
from features.validation import ValidationFailed, ValidationReport, validate_table
from flows.common import IO, PURE, current_run_id, resolve_as_of, run_name
from recsys.clock import parse_as_of
from recsys.settings import Settings
from recsys.stores import open_stores

log = logging.getLogger(__name__)


def snapshot_weeks(as_of: date, backfill_from: date | None) -> list[date]:
    """Every week boundary from `backfill_from` (default: `as_of` alone) to `as_of`."""
    start = as_of if backfill_from is None else parse_as_of(backfill_from)
    if start > as_of:
        raise ValueError(f"backfill_from {start} is after as_of {as_of}")
    return [start + timedelta(weeks=k) for k in range((as_of - start).days // 7 + 1)]


def ensure_synthetic_log(settings: Settings, end: date) -> None:
    """Generate the demo log once (deterministic from the seed) if the data folder has none."""
    folder = settings.data_dir / "synthetic"
    if (folder / "events.parquet").exists():
        return
    raw = generate_log(
        n_users=settings.synthetic_users,
        n_items=settings.synthetic_items,
        n_events=settings.synthetic_events,
        n_weeks=settings.synthetic_weeks,
        end=transform.week_start(end),
        seed=settings.seed,
    )
    write_log(raw, folder)


@task(**IO)
def extract_events(settings: Settings, engine, source: str, before: date, now: datetime) -> RawData:
    """Read and check the raw source; only events before the newest week are ever read."""
    if source == "synthetic":
        ensure_synthetic_log(settings, before)
    return read_source(
        source,
        before=transform.week_start(before),
        engine=engine,
        synthetic_dir=settings.data_dir / "synthetic",
        now=now,
    )


@task(**PURE)
def compute_snapshot(raw: RawData, week: date, settings: Settings) -> dict[str, pl.DataFrame]:
    """Features as of `week` and the labels of the week that closed at `week`."""
    frames = transform.build_feature_tables(
        raw.events,
        raw.items,
        week,
        recent_items=settings.recent_items_per_user,
        neighbours=settings.neighbours_per_item,
    )
    labels = transform.build_labels(raw.events, week - timedelta(weeks=1))
    if labels.height:
        frames[contracts.LABELS.name] = labels
    return frames


@task(**PURE)
def validate_snapshot(engine, frames: dict[str, pl.DataFrame], settings: Settings) -> dict[str, ValidationReport]:
    """Run each table's expectation suite against the previous passed snapshot."""
    reports = {}
    for name, frame in frames.items():
        contract = contracts.CONTRACTS[name]
        table_as_of = frame.get_column("as_of")[0] if frame.height else None
        reports[name] = validate_table(
            contract,
            frame,
            as_of=table_as_of,
            previous=store.previous_profile(engine, name, table_as_of),
            min_rows_ratio=settings.min_rows_ratio,
            drift_threshold=settings.drift_threshold,
            drift_blocks=settings.drift_blocks,
        )
    return reports


@task(**IO)
def load_snapshot(engine, frames: dict[str, pl.DataFrame], reports: dict[str, ValidationReport]) -> dict[str, str]:
    """Write the validated tables, each as_of partition replaced in one transaction."""
    digests = {}
    for table_as_of in sorted({r.as_of for r in reports.values()}):
        names = [n for n, r in reports.items() if r.as_of == table_as_of]
        digests |= store.write_snapshot(
            engine,
            table_as_of,
            {n: frames[n] for n in names},
            {n: reports[n] for n in names},
            flow_run_id=current_run_id(),
        )
    return digests


def record_failure(engine, reports: dict[str, ValidationReport]) -> None:
    """Log the failed attempt (nothing becomes visible) and show its report in the UI."""
    for table_as_of in sorted({r.as_of for r in reports.values()}):
        same = {n: r for n, r in reports.items() if r.as_of == table_as_of}
        store.record_failed_validation(engine, table_as_of, same, flow_run_id=current_run_id())
    create_markdown_artifact(
        key="feature-validation",
        markdown="# Feature validation FAILED\n\n" + "\n\n".join(r.to_markdown() for r in reports.values()),
        description="Failed feature validation: nothing was written",
    )


def summarise(week: date, reports: dict[str, ValidationReport]) -> str:
    rows = "\n".join(
        f"| {r.table} | {r.as_of} | {r.row_count} | {'passed' if r.success else 'FAILED'} | "
        f"{'; '.join(r.warnings) or '-'} |"
        for r in reports.values()
    )
    return f"## Snapshot {week}\n\n| table | as_of | rows | validation | drift |\n|---|---|---|---|---|\n{rows}\n"


@flow(name="features", flow_run_name=run_name("features"), timeout_seconds=3 * 3600, log_prints=False)
def feature_flow(
    as_of: date | None = None,
    source: str | None = None,
    backfill_from: date | None = None,
    force: bool = False,
) -> dict[str, dict[str, str]]:
    """Compute, validate and store the feature snapshot(s) as of Monday `as_of` (and labels)."""
    settings = Settings()
    as_of = resolve_as_of(as_of)
    now = datetime.now(UTC)
    if transform.week_start(as_of) > now:
        raise ValueError(f"as_of {as_of} is in the future: its features would need events not seen yet")
    weeks = snapshot_weeks(as_of, backfill_from)
    written: dict[str, dict[str, str]] = {}
    with open_stores(settings) as stores:
        store.ensure_schema(stores.engine)
        todo = [w for w in weeks if force or not snapshot_complete(stores.engine, w)]
        log.info("feature snapshots to compute: %s (skipping %d already passed)", todo, len(weeks) - len(todo))
        if not todo:
            return written
        raw = extract_events(settings, stores.engine, source or settings.source, as_of, now)
        summaries = []
        for week in todo:
            frames = compute_snapshot(raw, week, settings)
            reports = validate_snapshot(stores.engine, frames, settings)
            if not all(r.success for r in reports.values()):
                record_failure(stores.engine, reports)
                raise ValidationFailed([r for r in reports.values() if not r.success])
            written[str(week)] = load_snapshot(stores.engine, frames, reports)
            summaries.append(summarise(week, reports))
        create_markdown_artifact(
            key="feature-validation",
            markdown="# Feature validation passed\n\n" + "\n".join(summaries),
            description=f"Feature snapshots {todo[0]} … {todo[-1]}",
        )
    return written


def snapshot_complete(engine, week: date) -> bool:
    """Whether `week`'s features (and the labels of the week before it) already passed."""
    names = [t.name for t in contracts.FEATURE_TABLES]
    if not store.snapshot_passed(engine, week, names):
        return False
    last_week = week - timedelta(weeks=1)
    labels_due = store.snapshot_passed(engine, last_week, [contracts.USER_FEATURES.name])
    return not labels_due or store.snapshot_passed(engine, last_week, [contracts.LABELS.name])
