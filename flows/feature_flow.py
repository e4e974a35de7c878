"""Feature flow: raw events → point-in-time features and labels → validated → Postgres."""

import logging
from datetime import UTC, date, datetime, timedelta

import polars as pl
from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from features import contracts, store, transform, validation
from features.sources import RawData, RawDataError, read_source
from features.synthetic import generate_log, write_log
from features.validation import ValidationFailed, ValidationReport
from flows.common import IO, PURE, current_run_id, resolve_as_of, run_name
from recsys.clock import parse_as_of
from recsys.settings import Settings
from recsys.stores import open_stores

log = logging.getLogger(__name__)

ARTIFACT_KEY = "feature-validation"


def snapshot_weeks(as_of: date, backfill_from: date | None) -> list[date]:
    """Every week boundary from `backfill_from` (default: `as_of` alone) to `as_of`."""
    start = as_of if backfill_from is None else parse_as_of(backfill_from)
    if start > as_of:
        raise ValueError(f"backfill_from {start} is after as_of {as_of}")
    return [start + timedelta(weeks=k) for k in range((as_of - start).days // 7 + 1)]


def table_as_of(table: str, week: date) -> date:
    """The as_of of `table` in the snapshot computed at `week`: labels close the week before."""
    return week - timedelta(weeks=1) if table == contracts.LABELS.name else week


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


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry I/O failures; a source that is itself wrong fails the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), RawDataError)


@task(**IO, retry_condition_fn=retry_unless_bad_input)
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
    labels = transform.build_labels(raw.events, table_as_of(contracts.LABELS.name, week))
    if labels.height:
        frames[contracts.LABELS.name] = labels
    return frames


@task(**PURE)
def validate_snapshot(
    engine, frames: dict[str, pl.DataFrame], week: date, settings: Settings
) -> dict[str, ValidationReport]:
    """Run each table's expectation suite, comparing with its previous passed snapshot."""
    as_ofs = {name: table_as_of(name, week) for name in frames}
    return validation.validate_tables(
        frames,
        as_ofs=as_ofs,
        previous={name: store.previous_profile(engine, name, as_ofs[name]) for name in frames},
        min_rows_ratio=settings.min_rows_ratio,
        drift_threshold=settings.drift_threshold,
        drift_blocks=settings.drift_blocks,
    )


@task(**IO)
def load_snapshot(engine, frames: dict[str, pl.DataFrame], reports: dict[str, ValidationReport]) -> dict[str, str]:
    """Write the validated tables (features and labels) in one transaction; return table -> digest."""
    snapshots: dict[date, tuple[dict, dict]] = {}
    for name, report in reports.items():
        part = snapshots.setdefault(report.as_of, ({}, {}))
        part[0][name], part[1][name] = frames[name], report
    written = store.write_snapshots(engine, snapshots, flow_run_id=current_run_id())
    return {table: digest for digests in written.values() for table, digest in digests.items()}


def record_failure(engine, reports: dict[str, ValidationReport], read: str, written: list[str]) -> None:
    """Log the failed attempt (nothing of it becomes visible) and show its report in the UI."""
    for as_of in sorted({r.as_of for r in reports.values()}):
        same = {n: r for n, r in reports.items() if r.as_of == as_of}
        store.record_failed_validation(engine, as_of, same, flow_run_id=current_run_id())
    earlier = ["", "## Written before the failure", "", *written] if written else []
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown="\n".join(
            ["# Feature validation FAILED", "", read, "", *(r.to_markdown() for r in reports.values()), *earlier]
        ),
        description="Failed feature validation: nothing of that snapshot was written",
    )


def summarise(week: date, reports: dict[str, ValidationReport]) -> str:
    """A markdown section for one written snapshot: rows and drift warnings per table."""
    rows = [
        f"| {r.table} | {r.as_of} | {r.row_count} | {'passed' if r.success else 'FAILED'} | {len(r.warnings)} |"
        for r in reports.values()
    ]
    warnings = [f"- ⚠️ {w}" for r in reports.values() for w in r.warnings]
    return "\n".join(
        [
            f"## Snapshot {week}",
            "",
            "| table | as_of | rows | validation | drift warnings |",
            "|---|---|---|---|---|",
            *rows,
            *(["", "Drift (warnings, not blocking):", "", *warnings] if warnings else []),
            "",
        ]
    )


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
        spec = source or settings.source
        raw = extract_events(settings, stores.engine, spec, as_of, now)
        read = f"Read {raw.events.height} events ({raw.duplicates} duplicates dropped) from `{spec}`."
        summaries: list[str] = []
        for week in todo:
            frames = compute_snapshot(raw, week, settings)
            reports = validate_snapshot(stores.engine, frames, week, settings)
            if not all(r.success for r in reports.values()):
                record_failure(stores.engine, reports, read, summaries)
                raise ValidationFailed(list(reports.values()))
            written[str(week)] = load_snapshot(stores.engine, frames, reports)
            summaries.append(summarise(week, reports))
        create_markdown_artifact(
            key=ARTIFACT_KEY,
            markdown="\n".join(["# Feature validation passed", "", read, "", *summaries]),
            description=f"Feature snapshots {todo[0]} … {todo[-1]}",
        )
    return written


def snapshot_complete(engine, week: date) -> bool:
    """Whether `week`'s features (and the labels of the week before it) already passed."""
    names = [t.name for t in contracts.FEATURE_TABLES]
    if not store.snapshot_passed(engine, week, names):
        return False
    last_week = table_as_of(contracts.LABELS.name, week)
    labels_due = store.snapshot_passed(engine, last_week, [contracts.USER_FEATURES.name])
    return not labels_due or store.snapshot_passed(engine, last_week, [contracts.LABELS.name])
