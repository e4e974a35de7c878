"""Feature flow: raw events → point-in-time features and labels → validated → Postgres."""

import logging
from datetime import UTC, date, datetime

import polars as pl
from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from features import report, store, transform, validation
from features.raw import RawData
from features.sources import read_source
from features.synthetic import SyntheticLogConfig, ensure_synthetic_log
from features.validation import ValidationFailed, ValidationReport
from flows.common import IO, PURE, current_run_id, resolve_as_of, run_name
from flows.configs import feature_options, history_weeks, synthetic_log_config, validation_options
from flows.runs import run_body
from recsys.clock import mondays
from recsys.errors import ExpectedError
from recsys.settings import Settings
from recsys.stores import open_stores

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
    if source == "synthetic":
        ensure_synthetic_log(synthetic, before)
    return read_source(
        source, before=transform.week_start(before), engine=engine, synthetic_dir=synthetic.folder, now=now
    )


@task(**PURE)
def compute_snapshot(raw: RawData, week: date, options: dict) -> dict[str, pl.DataFrame]:
    """Features as of `week` and the labels of the week that closed at `week`."""
    return transform.build_week_tables(raw.events, raw.items, week, **options)


@task(**IO)
def read_history(engine, tables: list[str], week: date, count: int) -> dict[str, list[dict]]:
    """Per table, the profiles of its last `count` passed snapshots before this one."""
    return store.read_recent_profiles(engine, {t: transform.assign_as_of(t, week) for t in tables}, count)


@task(**PURE)
def validate_snapshot(
    frames: dict[str, pl.DataFrame], week: date, history: dict[str, list[dict]], options: dict
) -> dict[str, ValidationReport]:
    """Run each table's expectation suite and compare it with its recent passed snapshots."""
    as_ofs = {name: transform.assign_as_of(name, week) for name in frames}
    return validation.validate_tables(frames, as_ofs=as_ofs, previous=history, **options)


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
    spec, synthetic = source or settings.source, synthetic_log_config(settings)
    compute_options, check_options = feature_options(settings), validation_options(settings)
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
        raw = extract_events(stores.engine, spec, as_of, now, synthetic)
        if backfill_history:
            seen = transform.required_weeks(as_of, history_weeks(settings), raw.events.get_column("ts").min())
            todo = [w for w in todo if w in weeks or w in seen]
            if not todo:
                log.info("the missing weeks before %s precede the source's first event: nothing to compute", as_of)
                return written
        read = report.describe_read(raw, spec)
        for done, week in enumerate(todo, 1):
            frames = compute_snapshot(raw, week, compute_options)
            history = read_history(stores.engine, list(frames), week, settings.min_rows_weeks)
            reports = validate_snapshot(frames, week, history, check_options)
            if not all(r.success for r in reports.values()):
                fail_snapshot(stores.engine, reports, report.render_failed(read, reports, sections))
            raw_digest = store.digest_raw_window(raw.events, transform.week_start(week))
            written[str(week)] = write_snapshot(stores.engine, frames, reports, spec, raw_digest)
            sections.append(report.summarise_week(week, reports))
            log.info("feature week %s written", week, extra={"progress": ("feature weeks", done, len(todo))})
        create_markdown_artifact(
            key=ARTIFACT_KEY,
            markdown=report.render_passed(read, sections),
            description=f"Feature snapshots {todo[0]} … {todo[-1]}",
        )
    return written
