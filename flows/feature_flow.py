"""Feature flow: raw events → point-in-time features and labels → validated → Postgres."""

import logging
import shutil
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import NamedTuple
from uuid import uuid4

import polars as pl
import sqlalchemy as sa
from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.futures import wait
from prefect.states import State
from prefect.task_runners import TaskRunner
from pydantic import SecretStr

from features import contracts, partitioned, report, store, transform, validation
from features.raw import RawData, RawDataError
from features.sources import read_source, synthetic_kind
from features.synthetic import SyntheticLogConfig, ensure_synthetic_log
from features.validation import ValidationFailed, ValidationReport
from flows.common import IO, PURE, current_run_id, partition_runner, resolve_as_of, run_name
from flows.configs import feature_options, history_weeks, source_spec, synthetic_log_config, validation_options
from flows.runs import run_body
from recsys import partitions
from recsys.clock import mondays
from recsys.errors import ExpectedError
from recsys.runtime import release_freed_memory
from recsys.settings import Settings
from recsys.stores import Stores, open_stores, sqlalchemy_url

log = logging.getLogger(__name__)

ARTIFACT_KEY = "feature-validation"


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry I/O failures; a source that is itself wrong fails the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), ExpectedError)


@task(**IO, retry_condition_fn=retry_unless_bad_input)
def plan_weeks(engine, weeks: list[date], source: str, force: bool) -> list[date]:
    """The weeks to compute: all when forced, else those without a complete passed snapshot (from this source)."""
    store.ensure_schema(engine)
    if force:
        return weeks
    store.check_source(engine, weeks, source)
    return store.find_incomplete_weeks(engine, weeks)


@task(**IO, retry_condition_fn=retry_unless_bad_input)
def extract_events(engine, source: str, before: date, now: datetime, synthetic: SyntheticLogConfig) -> RawData:
    """Read and check the raw source; only events before the newest week are ever read."""
    if synthetic_kind(source):
        ensure_synthetic_log(synthetic, before)
    return read_source(
        source, before=transform.week_start(before), engine=engine, synthetic_dir=synthetic.folder, now=now
    )


@task(**PURE)
def compute_snapshot(raw: RawData, week: date, options: dict) -> dict[str, pl.DataFrame]:
    """Features as of `week` and the labels of the week that closed at `week`."""
    return transform.build_week_tables(raw.events, raw.items, week, **options)


class PartitionResult(NamedTuple):
    """One partition's share of a week's snapshot and of what was read for it."""

    tables: partitioned.PartitionTables
    failures: dict[str, list[dict]]  # per user-keyed table, its row checks' failures on these rows
    event_hashes: pl.Series  # store.hash_raw_window of its events
    events: int
    duplicates: int


@task(**IO, retry_condition_fn=retry_unless_bad_input)
def compute_partition(
    database_url: SecretStr,
    spec: str,
    week: date,
    now: datetime,
    synthetic_dir: Path,
    partition: partitions.Partition,
    recent_items: int,
    spill_dir: Path | None = None,
) -> PartitionResult:
    """Read one user partition's events before `week` (over connections of its own, so it runs on any
    worker), compute its share of the snapshot and check its rows of the user-keyed tables. With
    `spill_dir` (a folder of this machine's), its shares of the user tables and transitions wait for the
    merge in Parquet files there (`partitioned.spill_partition_tables`)."""
    engine = sa.create_engine(sqlalchemy_url(database_url.get_secret_value()), poolclass=sa.NullPool)
    try:
        before = transform.week_start(week)
        raw = read_source(spec, before=before, engine=engine, synthetic_dir=synthetic_dir, now=now, partition=partition)
    finally:
        engine.dispose()
    tables = partitioned.build_partition_tables(raw.events, raw.items, week, recent_items=recent_items)
    failures = partitioned.check_partition_tables(tables.tables, week)
    if spill_dir is not None:
        tables = partitioned.spill_partition_tables(tables, spill_dir / str(partition.index))
    hashes = store.hash_raw_window(raw.events, before)
    return PartitionResult(tables, failures, hashes, raw.events.height, raw.duplicates)


@task(**PURE)
def merge_partitions(parts: list[partitioned.PartitionTables], week: date, options: dict) -> dict[str, pl.DataFrame]:
    """The week's snapshot from its partitions' shares (consumed): what compute_snapshot gives for the whole log."""
    merged = {k: options[k] for k in ("neighbours", "collaborative", "collaborative_items")}
    return partitioned.merge_partition_tables(parts, week, **merged)


@task(**PURE)
def check_merged_rows(frames: dict[str, pl.DataFrame], week: date, count: int) -> dict[str, list[dict]]:
    """Row checks of the user-keyed tables built whole from the merged history (collaborative_scores,
    als_user_factors), one user partition at a time, so validation never converts them whole."""
    names = [n for n in (contracts.COLLABORATIVE_SCORES.name, contracts.ALS_USER_FACTORS.name) if n in frames]
    return {name: partitioned.check_merged_rows(frames[name], name, week, count) for name in names}


@task(**IO)
def read_history(engine, tables: list[str], week: date, count: int) -> dict[str, list[dict]]:
    """Per table, the profiles of its last `count` passed snapshots before this one."""
    return store.read_recent_profiles(engine, {t: transform.assign_as_of(t, week) for t in tables}, count)


@task(**PURE)
def validate_snapshot(
    frames: dict[str, pl.DataFrame],
    week: date,
    history: dict[str, list[dict]],
    options: dict,
    checked: dict[str, list[dict]] | None = None,
) -> dict[str, ValidationReport]:
    """Run each table's expectation suite and compare it with its recent passed snapshots (tables in
    `checked` had their rows checked in their partitions: see `validation.validate_tables`)."""
    as_ofs = {name: transform.assign_as_of(name, week) for name in frames}
    return validation.validate_tables(frames, as_ofs=as_ofs, previous=history, checked=checked, **options)


@task(**IO)
def write_snapshot(
    engine, frames: dict[str, pl.DataFrame], reports: dict[str, ValidationReport], source: str, raw_digest: str
) -> dict[str, str]:
    """Write the validated tables (features and labels) and their lineage in one transaction; table -> digest."""
    return store.write_week(engine, frames, reports, flow_run_id=current_run_id(), source=source, raw_digest=raw_digest)


def fail_snapshot(engine, reports: dict[str, ValidationReport], markdown: str) -> None:
    """Record the failed attempt (nothing of it becomes visible), show its report in the UI, raise."""
    store.record_failed_week(engine, reports, flow_run_id=current_run_id())
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown,
        description="Failed feature validation: nothing of that snapshot was written",
    )
    raise ValidationFailed(list(reports.values()))


class Week(NamedTuple):
    """A computed snapshot, ready for validation: its tables, the digest of the raw events it saw, the read."""

    week: date
    frames: dict[str, pl.DataFrame]
    raw_digest: str
    read: str  # report.describe_read
    checked: dict[str, list[dict]] | None = None  # tables whose rows their partitions checked: their failures


def compute_whole_log(
    stores: Stores,
    settings: Settings,
    spec: str,
    todo: list[date],
    weeks: list[date],
    as_of: date,
    now: datetime,
    backfill_history: bool,
) -> Iterator[Week]:
    """The snapshots of `todo` from one read of the whole log, held in this process."""
    raw = extract_events(stores.engine, spec, as_of, now, synthetic_log_config(settings, spec))
    if backfill_history:
        seen = transform.required_weeks(as_of, history_weeks(settings), raw.events.get_column("ts").min())
        todo = [w for w in todo if w in weeks or w in seen]
        if not todo:
            log.info("the missing weeks before %s precede the source's first event: nothing to compute", as_of)
    read = report.describe_read(raw.events.height, raw.duplicates, spec)
    for week in todo:
        frames = compute_snapshot(raw, week, feature_options(settings))
        rows = sum(frame.height for frame in frames.values())
        yield Week(week, frames, store.digest_raw_window(raw.events, transform.week_start(week)), read)
        del frames  # written: not held while the next week is computed
        release_freed_memory(f"feature week {week}", rows=rows)


def compute_in_partitions(
    stores: Stores, settings: Settings, spec: str, todo: list[date], weeks: list[date], as_of: date, now: datetime
) -> Iterator[Week]:
    """The snapshots of `todo`, each from `settings.feature_partitions` user partitions that read their
    own events (tasks on threads or a Dask cluster), merged here: no process holds the whole log.

    On threads, the partitions' shares wait for the merge on disk, under `RECSYS_DATA_DIR/feature-shares`
    (removed once merged): held in memory, they were the whole snapshot's user tables and more before its
    merge began (6.4 GB at a million users). On Dask they come back as frames, as a worker's disk is not
    this process's."""
    synthetic, options = synthetic_log_config(settings, spec), feature_options(settings)
    if synthetic_kind(spec):
        ensure_synthetic_log(synthetic, as_of)  # once, before partitions read it
    connection = {"database_url": SecretStr(stores.database_url), "spec": spec, "now": now,
                  "synthetic_dir": synthetic.folder, "recent_items": options["recent_items"]}  # fmt: skip
    spill_root = None if settings.dask_address else settings.data_dir.resolve() / "feature-shares" / uuid4().hex
    with partition_runner(settings) as runner:
        for week in todo:
            spill_dir = spill_root / week.isoformat() if spill_root is not None else None
            try:
                parameters = connection | {"week": week, "spill_dir": spill_dir}
                parts = run_partitions(runner, parameters, settings.feature_partitions)
                events, duplicates = sum(p.events for p in parts), sum(p.duplicates for p in parts)
                if not events:
                    if week in weeks:
                        raise RawDataError(f"source {spec}: no events before {transform.week_start(week).isoformat()}")
                    log.info("week %s precedes the source's first event: nothing to compute", week)
                    continue
                raw_digest = store.digest_event_hashes([p.event_hashes for p in parts])
                shares = [p.tables for p in parts]
                checked = {name: validation.merge_failures([p.failures[name] for p in parts])
                           for name in shares[0].tables}  # fmt: skip
                del parts  # the event hashes go; the shares leave one table at a time as they are merged
                frames = merge_partitions(shares, week, options)
                del shares
            finally:
                if spill_dir is not None:
                    shutil.rmtree(spill_root, ignore_errors=True)  # merged or failed: the run's shares go
            checked = {name: failures for name, failures in checked.items() if name in frames}  # empty labels go
            checked |= check_merged_rows(frames, week, settings.feature_partitions)
            rows = sum(frame.height for frame in frames.values())
            yield Week(week, frames, raw_digest, report.describe_read(events, duplicates, spec), checked)
            del frames  # written: not held while the next week's partitions run
            release_freed_memory(f"feature week {week}", rows=rows)


def run_partitions(runner: TaskRunner, parameters: dict, count: int) -> list[PartitionResult]:
    """One compute_partition task per user partition on `runner`; their results once all have stopped."""
    futures = [
        runner.submit(compute_partition, parameters=parameters | {"partition": partition})
        for partition in partitions.all_partitions(count)
    ]
    wait(futures)  # every partition has stopped before a failure is raised
    return [future.result() for future in futures]


@flow(name="features", flow_run_name=run_name("features"), timeout_seconds=3 * 3600, log_prints=False)
@run_body
def feature_flow(
    as_of: date | None = None,
    source: str | None = None,
    backfill_from: date | None = None,
    force: bool = False,
    backfill_history: bool = False,
) -> dict[str, dict[str, str]]:
    """Compute, validate and store the feature snapshot(s) as of Monday `as_of` (and labels).

    With `backfill_history` (the scheduled run), also the missing weeks training needs before
    `as_of`, from the source's first event on; `force` redoes only the weeks asked for."""
    settings = Settings()
    spec, check_options = source_spec(settings, source), validation_options(settings)
    as_of, now = resolve_as_of(as_of), datetime.now(UTC)
    if transform.week_start(as_of) > now:
        raise ValueError(f"as_of {as_of} is in the future: its features would need events not seen yet")
    written: dict[str, dict[str, str]] = {}
    sections: list[str] = []
    with open_stores(settings) as stores:
        weeks = mondays(backfill_from or as_of, as_of)
        todo = plan_weeks(stores.engine, weeks, spec, force)
        if backfill_history:
            needed = [w for w in transform.required_weeks(as_of, history_weeks(settings)) if w not in weeks]
            todo = sorted({*todo, *plan_weeks(stores.engine, needed, spec, False)})
        log.info("feature snapshots to compute: %s", todo)
        if not todo:
            create_markdown_artifact(
                key=ARTIFACT_KEY, markdown=report.render_nothing_to_do(weeks, spec), description="Nothing to compute"
            )
            return written
        if settings.feature_partitions == 1:
            snapshots = compute_whole_log(stores, settings, spec, todo, weeks, as_of, now, backfill_history)
        else:
            snapshots = compute_in_partitions(stores, settings, spec, todo, weeks, as_of, now)
        # Not enumerate(): it keeps its last item (this week's tables) until the generator has
        # computed the next week, so two snapshots would be held at once.
        done = 0
        for week, frames, raw_digest, read, checked in snapshots:
            done += 1  # noqa: SIM113 (see above)
            history = read_history(stores.engine, list(frames), week, settings.min_rows_weeks)
            reports = validate_snapshot(frames, week, history, check_options, checked)
            if not all(r.success for r in reports.values()):
                fail_snapshot(stores.engine, reports, report.render_failed(read, reports, sections))
            written[str(week)] = write_snapshot(stores.engine, frames, reports, spec, raw_digest)
            sections.append(report.summarise_week(week, reports))
            del frames  # the next week is computed without this one's tables
            log.info("feature week %s written", week, extra={"progress": ("feature weeks", done, len(todo))})
        if written:
            weeks_written = sorted(written)
            create_markdown_artifact(
                key=ARTIFACT_KEY,
                markdown=report.render_passed(read, sections),
                description=f"Feature snapshots {weeks_written[0]} … {weeks_written[-1]}",
            )
    return written
