"""Replay: the weekly job for every Monday of a past span, in order, on the real stores, resumable.

Each week runs the three flows as their schedules would (features, then training, then
inference), each seeing only its past. A stage that finishes is recorded in the table
`replay_weeks`; running the same replay again skips what was recorded (`force` redoes it),
so a replay stopped anywhere continues where it stopped.
"""

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from features.sources import synthetic_kind
from features.synthetic import ensure_synthetic_log
from flows.configs import source_spec, synthetic_log_config
from flows.feature_flow import feature_flow
from flows.inference_flow import inference_flow
from flows.training_flow import training_flow
from inference import publications, quality
from recsys.clock import mondays, week_floor
from recsys.errors import ExpectedError
from recsys.settings import Settings
from recsys.stores import open_stores

log = logging.getLogger(__name__)

STAGES = ("features", "training", "inference")
FINISHED = ("done", "skipped")


class ReplayStopped(ExpectedError, RuntimeError):
    """A stage failed in a way the next stages cannot work around (bad source, failed validation, ...)."""


# --- The replay state: one row per (source, week, stage) that ended, in Postgres (SQLAlchemy Core) ---

_metadata = sa.MetaData()
replay_weeks = sa.Table(
    "replay_weeks",
    _metadata,
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("as_of", sa.Date, primary_key=True),
    sa.Column("stage", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),  # done, skipped (an expected failure it went past) or failed
    sa.Column("detail", sa.Text, nullable=False),  # what the stage did, or why it was skipped or failed
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
)


def ensure_state_schema(engine: sa.Engine) -> None:
    """Create the `replay_weeks` table if missing; safe when several replays start at once."""
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(hashtext('weekly-recs.replay'), 0)"))
        _metadata.create_all(conn)


def read_state(engine: sa.Engine, source: str) -> dict[tuple[date, str], dict]:
    """The recorded stages of `source`'s replay: (week, stage) -> row."""
    query = sa.select(replay_weeks).where(replay_weeks.c.source == source)
    with engine.connect() as conn:
        return {(row.as_of, row.stage): dict(row._mapping) for row in conn.execute(query)}


def record_stage(engine: sa.Engine, source: str, week: date, stage: str, status: str, detail: str) -> None:
    """Insert or replace the row of one stage of one week."""
    row = {"source": source, "as_of": week, "stage": stage, "status": status, "detail": detail}
    statement = postgresql.insert(replay_weeks).values(**row, finished_at=datetime.now(UTC))
    changed = {name: statement.excluded[name] for name in ("status", "detail", "finished_at")}
    with engine.begin() as conn:
        conn.execute(statement.on_conflict_do_update(index_elements=["source", "as_of", "stage"], set_=changed))


# --- The replay ---


def replay(
    settings: Settings,
    first: date,
    last: date,
    source: str,
    *,
    force: bool = False,
    on_week: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the weekly job for every Monday from `first` to `last`; the table of the weeks (see `describe_weeks`).

    After each week, `on_week` gets {as_of, position, weeks, stages: {stage: {status, detail,
    ran}}, quality: the realized quality row of the week before, or None}.
    """
    weeks = mondays(first, last)
    source = source_spec(settings, source)
    if synthetic_kind(source):  # the synthetic log must reach the last week, or later weeks would have no events
        ensure_synthetic_log(synthetic_log_config(settings, source), last)
    with open_stores(settings) as stores:
        engine = stores.engine
        ensure_state_schema(engine)
        publications.ensure_schema(engine)
        quality.ensure_schema(engine)
        state = {} if force else read_state(engine, source)
        for position, week in enumerate(weeks, 1):
            stages = {}
            for stage in STAGES:
                done = state.get((week, stage))
                if done and done["status"] in FINISHED:
                    stages[stage] = {"status": done["status"], "detail": done["detail"], "ran": False}
                    continue
                status, detail = run_stage(stage, week, source, force=force)
                record_stage(engine, source, week, stage, status, detail)
                if status == "failed":
                    raise ReplayStopped(
                        f"replay stopped at week {week} ({position}/{len(weeks)}), {stage}: {detail}. "
                        "Fix the cause and run the same replay again: the weeks before are kept"
                    )
                stages[stage] = {"status": status, "detail": detail, "ran": True}
            log.info("replayed week %s (%d/%d)", week, position, len(weeks))
            if on_week:
                before = week - timedelta(weeks=1)
                measured = read_quality(engine, [before]).get(before)
                on_week(
                    {"as_of": week, "position": position, "weeks": len(weeks), "stages": stages, "quality": measured}
                )
        return describe_weeks(engine, weeks)


def run_stage(stage: str, week: date, source: str, *, force: bool) -> tuple[str, str]:
    """Run one flow for `week`; (status, detail). Training's expected failures are skipped: inference still serves."""
    try:
        if stage == "features":
            # As scheduled: also the missing earlier weeks training needs (the first week's backfill).
            written = feature_flow(as_of=week, source=source, force=force, backfill_history=True)
            return "done", f"{len(written)} snapshot{'' if len(written) == 1 else 's'}"
        if stage == "training":
            trained = training_flow(as_of=week)
            return "done", f"model v{trained['version']} ({'champion' if trained['promote'] else 'rejected'})"
        published = inference_flow(as_of=week)
        return "done", f"published {published['version']} ({published['model']})"
    except Exception as error:  # recorded, then the replay stops or, for training's expected failures, goes on
        line = f"{type(error).__name__}: {' '.join(str(error).split())}"
        return ("skipped" if stage == "training" and isinstance(error, ExpectedError) else "failed"), line


def read_quality(engine: sa.Engine, weeks: list[date]) -> dict[date, dict]:
    """The stored realized quality rows of `weeks` (week -> row), those measured."""
    # One row per measured week and none after this week: this many rows reach back to the oldest.
    count = (week_floor(datetime.now(UTC)) - min(weeks)).days // 7 + 1
    rows = quality.quality_series(engine, count).to_dicts()
    return {row["as_of"]: row for row in rows if row["as_of"] in set(weeks)}


def describe_weeks(engine: sa.Engine, weeks: list[date]) -> list[dict]:
    """One row per week: its realized quality row if measured, else the publication and model that served it."""
    measured = read_quality(engine, weeks)
    live = publications.list_publications(engine).filter(status="live")
    # Oldest first: a week published again (forced) shows its newest publication.
    served = {row["as_of"]: row for row in live.select("as_of", "version", "model_version").iter_rows(named=True)}
    return [measured.get(week) or served.get(week) or {"as_of": week} for week in weeks]
