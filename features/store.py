"""The feature store in Postgres: tables from the contracts, atomic snapshot writes, reads.

Every function takes a SQLAlchemy engine (psycopg 3 driver). Table names come only from
the contract registry, so identifiers formatted into SQL are never user input.
"""

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any

import polars as pl
import psycopg
import sqlalchemy as sa
from psycopg import Copy
from psycopg.copy import QueuedLibpqWriter

from features.contracts import ALL_TABLES, CONTRACTS, FEATURE_TABLES, LABELS, USER_FEATURES, TableContract
from features.transform import assign_as_of
from features.validation import ValidationFailed, ValidationReport, is_sorted_by
from recsys.errors import ExpectedError

log = logging.getLogger(__name__)

# Advisory lock keys: one for DDL, one namespace (with the as_of ordinal) for writes.
_SCHEMA_LOCK = 72_400_001
_WRITE_LOCK_NAMESPACE = 72_400_002
_COPY_CHUNK_ROWS = 100_000

_SNAPSHOTS_DDL = """
create table if not exists feature_snapshots (
    table_name text not null,
    as_of date not null,
    row_count bigint not null,
    passed boolean not null,
    report jsonb not null,
    profile jsonb,
    digest text,
    created_at timestamptz not null default now(),
    flow_run_id text,
    primary key (table_name, as_of)
)"""

# Lineage, added to stores created before it: the raw source spec and a digest of its window.
_LINEAGE_DDL = (
    "alter table feature_snapshots add column if not exists source text, add column if not exists raw_digest text"
)

_RUNS_DDL = """
create table if not exists feature_validation_runs (
    id bigserial primary key,
    table_name text not null,
    as_of date not null,
    passed boolean not null,
    report jsonb not null,
    created_at timestamptz not null default now(),
    flow_run_id text
)"""

# A passed snapshot always replaces the row; a failed attempt only replaces a failed one,
# so a failed re-run never hides a valid snapshot.
_UPSERT_SNAPSHOT = sa.text("""
insert into feature_snapshots
    (table_name, as_of, row_count, passed, report, profile, digest, flow_run_id, source, raw_digest)
values
    (:table, :as_of, :row_count, :passed, cast(:report as jsonb), cast(:profile as jsonb),
     :digest, :flow_run_id, :source, :raw_digest)
on conflict (table_name, as_of) do update set
    row_count = excluded.row_count, passed = excluded.passed, report = excluded.report,
    profile = excluded.profile, digest = excluded.digest, flow_run_id = excluded.flow_run_id,
    source = excluded.source, raw_digest = excluded.raw_digest, created_at = now()
where excluded.passed or not feature_snapshots.passed
""")

_APPEND_RUN = sa.text("""
insert into feature_validation_runs (table_name, as_of, passed, report, flow_run_id)
values (:table, :as_of, :passed, cast(:report as jsonb), :flow_run_id)
""")


class SnapshotUnavailable(ExpectedError, LookupError):
    """No snapshot that passed validation exists for the requested (table, as_of)."""


class SourceMismatch(ExpectedError, ValueError):
    """A week already has a passed snapshot computed from another raw source."""


def ensure_schema(engine: sa.Engine) -> None:
    """Create every contract table (partitioned by as_of) and the snapshot bookkeeping tables if missing."""
    with engine.begin() as conn:
        # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalogue.
        conn.execute(sa.text("select pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        for contract in ALL_TABLES:
            conn.execute(sa.text(_table_ddl(contract)))
        conn.execute(sa.text(_SNAPSHOTS_DDL))
        conn.execute(sa.text(_RUNS_DDL))
        conn.execute(sa.text(_LINEAGE_DDL))
        _check_columns(conn)


def write_snapshot(
    engine: sa.Engine,
    as_of: date,
    frames: dict[str, pl.DataFrame],
    reports: dict[str, ValidationReport],
    *,
    flow_run_id: str | None,
    source: str | None = None,
    raw_digest: str | None = None,
) -> dict[str, str]:
    """Replace the as_of partition of each table in one transaction; return table -> digest.

    Each frame is loaded into a new table, indexed, then swapped in for the table's as_of
    partition, so a re-run writes as fast as the first run and leaves no dead rows.
    Refuses (writes nothing) unless every frame has a passed report for this as_of. The
    digest is the sha256 of the conformed frame, sorted by key, as CSV with its header:
    the same rows give the same digest in any process. `source` and `raw_digest` (see
    `digest_raw_window`) record what the tables were computed from.
    """
    snapshots = {as_of: (frames, reports)}
    return write_snapshots(engine, snapshots, flow_run_id=flow_run_id, source=source, raw_digest=raw_digest)[as_of]


def write_snapshots(
    engine: sa.Engine,
    snapshots: dict[date, tuple[dict[str, pl.DataFrame], dict[str, ValidationReport]]],
    *,
    flow_run_id: str | None,
    source: str | None = None,
    raw_digest: str | None = None,
) -> dict[date, dict[str, str]]:
    """`write_snapshot` for several as_ofs (e.g. a week's features and last week's labels), all in one transaction."""
    if not snapshots:
        raise ValueError("write_snapshots: no snapshots given")
    for as_of, (frames, reports) in snapshots.items():
        _check_writable(as_of, frames, reports)
    conformed = {
        as_of: {t: _conform_sorted(CONTRACTS[t], f, as_of) for t, f in frames.items()}
        for as_of, (frames, _) in snapshots.items()
    }
    started = time.perf_counter()
    digests: dict[date, dict[str, str]] = {}
    with engine.begin() as conn:
        # In as_of order, so two writers of overlapping as_ofs cannot deadlock.
        for as_of in sorted(snapshots):
            conn.execute(
                sa.text("select pg_advisory_xact_lock(cast(:ns as integer), cast(:key as integer))"),
                {"ns": _WRITE_LOCK_NAMESPACE, "key": as_of.toordinal()},
            )
        for as_of in sorted(snapshots):
            digests[as_of] = {t: _load_partition(conn, CONTRACTS[t], f, as_of) for t, f in conformed[as_of].items()}
        # Swapping locks the live tables against readers until commit: all loads come first.
        for as_of in sorted(snapshots):
            reports = snapshots[as_of][1]
            for table, frame in conformed[as_of].items():
                _swap_partition(conn, CONTRACTS[table], as_of)
                lineage = {"source": source, "raw_digest": raw_digest}
                _record_attempt(conn, reports[table], frame.height, digests[as_of][table], flow_run_id, lineage)
    log.info(
        "wrote snapshot %s in %.2fs",
        "; ".join(
            f"as_of={as_of}: " + ", ".join(f"{t}={f.height} rows" for t, f in frames.items())
            for as_of, frames in conformed.items()
        ),
        time.perf_counter() - started,
    )
    return digests


def write_week(
    engine: sa.Engine,
    frames: dict[str, pl.DataFrame],
    reports: dict[str, ValidationReport],
    *,
    flow_run_id: str | None,
    source: str | None = None,
    raw_digest: str | None = None,
) -> dict[str, str]:
    """Write one week's validated tables (features and the labels that closed) in one transaction; table -> digest."""
    snapshots = {as_of: ({t: frames[t] for t in same}, same) for as_of, same in _group_by_as_of(reports).items()}
    written = write_snapshots(engine, snapshots, flow_run_id=flow_run_id, source=source, raw_digest=raw_digest)
    return {table: digest for digests in written.values() for table, digest in digests.items()}


def record_failed_week(engine: sa.Engine, reports: dict[str, ValidationReport], *, flow_run_id: str | None) -> None:
    """`record_failed_validation` for one week's reports, whatever as_of each table has."""
    for as_of, same in sorted(_group_by_as_of(reports).items()):
        record_failed_validation(engine, as_of, same, flow_run_id=flow_run_id)


def record_failed_validation(
    engine: sa.Engine,
    as_of: date,
    reports: dict[str, ValidationReport],
    *,
    flow_run_id: str | None,
) -> None:
    """Log the failed reports; mark (table, as_of) failed only where no passed snapshot exists."""
    failed = [r for r in reports.values() if not r.success]
    for report in failed:
        _contract(report.table)
        if report.as_of != as_of:
            raise ValueError(f"report for {report.table} is as_of={report.as_of}, not {as_of}")
    with engine.begin() as conn:
        for report in failed:
            _record_attempt(conn, report, report.row_count, None, flow_run_id)
    log.info("recorded failed validation as_of=%s: %s", as_of, [r.table for r in failed])


def read_table(
    engine: sa.Engine,
    table: str,
    as_of: date,
    *,
    user_ids: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One table's passed snapshot as_of, in contract types, ordered by key."""
    contract = _contract(table)
    names = contract.column_names if columns is None else list(columns)
    unknown = [n for n in names if n not in contract.column_names]
    if unknown or not names:
        raise ValueError(f"table {table} has no columns {unknown}; it has {contract.column_names}")
    where, params = "as_of = %(as_of)s", {"as_of": as_of}
    if user_ids is not None:
        if "user_id" not in contract.column_names:
            raise ValueError(f"table {table} has no user_id column to filter on")
        # Typed, so the planner uses the primary key (an untyped literal makes it scan).
        where += " and user_id = any(cast(%(user_ids)s as bigint[]))"
        params["user_ids"] = [int(u) for u in user_ids]
    query = (
        f"copy (select {_column_list(names)} from {_quote(table)} where {where} "
        f"order by {_column_list(contract.key)}) to stdout (format csv, header)"
    )
    started = time.perf_counter()
    buffer = io.BytesIO()
    with engine.connect() as conn:
        # One snapshot for the passed-check and the data: a concurrent rewrite is invisible.
        conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            state = _snapshot_state(conn, table, as_of)
            if state is not True:
                why = "never written" if state is None else "its last validation failed"
                raise SnapshotUnavailable(
                    f"table {table} has no passed snapshot as_of={as_of} ({why}); "
                    "run the feature flow for that as_of or pick a passed one"
                )
            with _copy(conn, query, params) as copy:
                for data in copy:
                    buffer.write(data)
    frame = _parse_csv(contract, names, buffer)
    log.info(
        "read %s as_of=%s: %d rows in %.2fs",
        table,
        as_of,
        frame.height,
        time.perf_counter() - started,
    )
    return frame


def passed_as_ofs(engine: sa.Engine, table: str) -> list[date]:
    """Every as_of whose snapshot of table passed, oldest first."""
    rows = _query(
        engine,
        "select as_of from feature_snapshots where table_name = :table and passed order by as_of",
        table=_contract(table).name,
    )
    return [r[0] for r in rows]


def count_labelled_users(engine: sa.Engine, as_ofs: Sequence[date], at_most: int | None = None) -> dict[date, int]:
    """Per as_of: the users with a new item in its labels and a user_features row (history before it), the
    users a model learns from that week, counted up to `at_most` (a large week stops there, read through
    the keys); as_ofs without any are left out. Read where both snapshots passed."""
    labels, users = _quote(LABELS.name), _quote(USER_FEATURES.name)
    limit, params = ("", {}) if at_most is None else (" limit :at_most", {"at_most": at_most})
    rows = _query(
        engine,
        f"select w.as_of, (select count(*) from (select l.user_id from {labels} l join {users} u"
        " on u.as_of = l.as_of and u.user_id = l.user_id where l.as_of = w.as_of and l.is_new"
        f" group by l.user_id{limit}) t) from unnest(cast(:as_ofs as date[])) w(as_of)",
        as_ofs=list(as_ofs),
        **params,
    )
    return {r[0]: r[1] for r in rows if r[1]}


def read_recent_profiles(engine: sa.Engine, as_ofs: dict[str, date], count: int) -> dict[str, list[dict[str, Any]]]:
    """Per table, the profiles of its last `count` passed snapshots before its as_of, newest first.

    What a week's validation compares with (see `features.validation.validate_table`).
    """
    query = (
        "select profile from feature_snapshots where table_name = :table and passed"
        " and as_of < :before order by as_of desc limit :count"
    )
    return {
        table: [r[0] for r in _query(engine, query, table=_contract(table).name, before=as_of, count=count)]
        for table, as_of in as_ofs.items()
    }


def snapshot_passed(engine: sa.Engine, as_of: date, tables: Sequence[str]) -> bool:
    """Whether every one of tables has a passed snapshot as_of."""
    names = sorted({_contract(t).name for t in tables})
    if not names:
        raise ValueError(f"snapshot_passed as_of={as_of}: no tables given")
    rows = _query(
        engine,
        "select count(*) from feature_snapshots where as_of = :as_of and passed and table_name = any(:tables)",
        as_of=as_of,
        tables=names,
    )
    return bool(rows) and rows[0][0] == len(names)


def max_in_snapshot(engine: sa.Engine, table: str, as_of: date, column: str) -> int:
    """The largest value of an integer `column` of `table`'s rows as_of (0 when it has none), e.g. how many
    items per user `collaborative_scores` ranks for a model."""
    contract = _contract(table)
    if column not in contract.column_names:
        raise ValueError(f"max_in_snapshot: {contract.name} has no column {column!r}; it has {contract.column_names}")
    with engine.connect() as conn:
        query = sa.text(f"select coalesce(max({_quote(column)}), 0) from {_quote(contract.name)} where as_of = :as_of")
        return int(conn.execute(query, {"as_of": as_of}).scalar_one())


def find_incomplete_weeks(engine: sa.Engine, weeks: Sequence[date]) -> list[date]:
    """The weeks whose snapshot is not complete: features not passed, or labels due but not passed.

    The labels that close at a week are due once the week before has its own snapshot.
    """
    return [week for week in weeks if not _snapshot_complete(engine, week)]


def snapshot_summary(engine: sa.Engine, as_of: date) -> pl.DataFrame:
    """One row per table recorded for as_of: table_name, row_count, passed, digest."""
    rows = _query(
        engine,
        "select table_name, row_count, passed, digest from feature_snapshots where as_of = :as_of order by table_name",
        as_of=as_of,
    )
    return pl.DataFrame(
        [tuple(r) for r in rows],
        schema={
            "table_name": pl.Utf8,
            "row_count": pl.Int64,
            "passed": pl.Boolean,
            "digest": pl.Utf8,
        },
        orient="row",
    )


def _snapshot_complete(engine: sa.Engine, week: date) -> bool:
    if not snapshot_passed(engine, week, [t.name for t in FEATURE_TABLES]):
        return False
    last_week = assign_as_of(LABELS.name, week)
    labels_due = snapshot_passed(engine, last_week, [USER_FEATURES.name])
    return not labels_due or snapshot_passed(engine, last_week, [LABELS.name])


def snapshot_sources(engine: sa.Engine, as_ofs: Sequence[date]) -> dict[date, str | None]:
    """Lineage: the raw source spec each as_of's passed feature snapshot was computed from (None: not recorded)."""
    rows = _query(
        engine,
        "select as_of, source from feature_snapshots where table_name = :table and passed and as_of = any(:as_ofs)",
        table=USER_FEATURES.name,
        as_ofs=list(as_ofs),
    )
    return {as_of: source for as_of, source in rows}


def check_source(engine: sa.Engine, weeks: Sequence[date], source: str) -> None:
    """Refuse to reuse a passed snapshot computed from another source than `source` (SourceMismatch)."""
    other = {
        week: recorded for week, recorded in snapshot_sources(engine, weeks).items() if recorded not in (None, source)
    }
    if other:
        weeks_text = ", ".join(f"{week} from {recorded!r}" for week, recorded in sorted(other.items()))
        raise SourceMismatch(
            f"feature snapshots already passed for week(s) {weeks_text}, not from the requested source {source!r}: "
            f"pass --force (force=True) to recompute them from {source!r}, or run with the source they came from"
        )


def digest_raw_window(events: pl.DataFrame, before: datetime) -> str:
    """Lineage: `<rows>:<sha256>` of the events before `before`, in any row order (same polars version)."""
    return digest_event_hashes([hash_raw_window(events, before)])


def hash_raw_window(events: pl.DataFrame, before: datetime) -> pl.Series:
    """One hash per event before `before`: what `digest_raw_window` digests, computable per partition."""
    return events.filter(pl.col("ts") < before).select("user_id", "item_id", "ts", "weight").hash_rows(seed=0)


def digest_event_hashes(parts: Sequence[pl.Series]) -> str:
    """`digest_raw_window` of the union of disjoint event sets, from each set's `hash_raw_window`."""
    hashes = pl.concat(parts).sort()
    return f"{hashes.len()}:{hashlib.sha256(hashes.to_numpy().tobytes()).hexdigest()}"


def digest_table(table: str, frame: pl.DataFrame, as_of: date) -> str:
    """The digest `write_snapshot` records for `frame` as the `as_of` partition of `table`, without writing it."""
    digest = hashlib.sha256()
    for chunk in _csv_chunks(_conform_sorted(CONTRACTS[table], frame, as_of)):
        digest.update(chunk)
    return digest.hexdigest()


def _group_by_as_of(reports: dict[str, ValidationReport]) -> dict[date, dict[str, ValidationReport]]:
    grouped: dict[date, dict[str, ValidationReport]] = {}
    for table, report in reports.items():
        grouped.setdefault(report.as_of, {})[table] = report
    return grouped


def _contract(table: str) -> TableContract:
    contract = CONTRACTS.get(table)
    if contract is None:
        raise ValueError(f"unknown feature table {table!r}; known tables: {sorted(CONTRACTS)}")
    return contract


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _column_list(names: Sequence[str]) -> str:
    return ", ".join(_quote(n) for n in names)


def _table_ddl(contract: TableContract) -> str:
    columns = [f"{_quote(c.name)} {c.sql_type}{'' if c.nullable else ' not null'}" for c in contract.columns]
    return (
        f"create table if not exists {_quote(contract.name)} "
        f"({', '.join(columns)}, primary key ({_column_list(contract.key)})) partition by list (as_of)"
    )


def _check_columns(conn: sa.Connection) -> None:
    rows = conn.execute(
        sa.text(
            "select table_name, column_name from information_schema.columns"
            " where table_schema = current_schema() and table_name = any(:tables)"
        ),
        {"tables": list(CONTRACTS)},
    )
    actual: dict[str, set[str]] = {}
    for table, column in rows:
        actual.setdefault(table, set()).add(column)
    for contract in ALL_TABLES:
        if actual.get(contract.name) != set(contract.column_names):
            raise RuntimeError(
                f"table {contract.name} in Postgres has columns "
                f"{sorted(actual.get(contract.name, []))} but its contract has "
                f"{contract.column_names}: migrate or drop the table"
            )


def _check_writable(as_of: date, frames: dict[str, pl.DataFrame], reports: dict[str, ValidationReport]) -> None:
    if not frames:
        raise ValueError(f"write_snapshot as_of={as_of}: no frames given")
    for table in frames:
        _contract(table)
    if set(frames) != set(reports):
        raise ValueError(
            f"write_snapshot as_of={as_of}: frames {sorted(frames)} and reports {sorted(reports)}"
            " must name the same tables"
        )
    for table, report in reports.items():
        if (report.table, report.as_of, report.row_count) != (table, as_of, frames[table].height):
            raise ValueError(
                f"write_snapshot as_of={as_of}: report under {table!r} is for {report.table} "
                f"as_of={report.as_of} with {report.row_count} rows, the frame has "
                f"{frames[table].height}: validate the frame being written"
            )
    failed = [r for r in reports.values() if not r.success]
    if failed:
        raise ValidationFailed(failed)


def _conform_sorted(contract: TableContract, frame: pl.DataFrame, as_of: date) -> pl.DataFrame:
    conformed = contract.conform(frame)
    other = conformed.filter(pl.col("as_of") != as_of).height
    if other:
        raise ValueError(f"table {contract.name}: {other} rows have an as_of other than {as_of}")
    # Every row has this as_of, so the rest of the key orders them; frames from
    # features.transform arrive sorted, and checking costs far less than sorting.
    entity = [k for k in contract.key if k != "as_of"]
    return conformed if is_sorted_by(conformed, entity) else conformed.sort(entity)


def _csv_chunks(frame: pl.DataFrame) -> Iterator[bytes]:
    """The frame as CSV (header first) in chunks: the COPY payload and the digest input."""
    for offset in range(0, max(frame.height, 1), _COPY_CHUNK_ROWS):
        buffer = io.BytesIO()
        frame.slice(offset, _COPY_CHUNK_ROWS).write_csv(buffer, include_header=offset == 0)
        yield buffer.getvalue()


@contextmanager
def _copy(
    conn: sa.Connection, statement: str, params: dict[str, Any] | None = None, *, queued: bool = False
) -> Iterator[Copy]:
    """A psycopg COPY on the connection's own DBAPI connection, inside its transaction.

    `queued` sends the data from a background thread, so encoding the next chunk
    overlaps with the server ingesting the last one. Errors are raised as SQLAlchemy's
    (e.g. IntegrityError), like those of statements run through the connection.
    """
    try:
        with conn.connection.driver_connection.cursor() as cursor:
            writer = QueuedLibpqWriter(cursor) if queued else None
            with cursor.copy(statement, params, writer=writer) as copy:
                yield copy
    except psycopg.Error as error:
        raise sa.exc.DBAPIError.instance(statement, params, error, psycopg.Error) from error


def _partition_name(contract: TableContract, as_of: date) -> str:
    return f"{contract.name}__{as_of:%Y%m%d}"


def _load_partition(conn: sa.Connection, contract: TableContract, frame: pl.DataFrame, as_of: date) -> str:
    """COPY the frame into a new table shaped like the as_of partition; return the frame's digest.

    The table is new in this transaction, so COPY FREEZE writes its rows already frozen,
    and the primary key is built once after the load (faster than row by row).
    """
    stage = _quote(f"{_partition_name(contract, as_of)}__stage")
    conn.execute(sa.text(f"create table {stage} (like {_quote(contract.name)} including defaults)"))
    statement = f"copy {stage} ({_column_list(contract.column_names)}) from stdin (format csv, header, freeze)"
    digest = hashlib.sha256()
    with _copy(conn, statement, queued=True) as copy:
        for chunk in _csv_chunks(frame):
            digest.update(chunk)
            copy.write(chunk)
    _constrain_partition(conn, contract, stage.strip('"'), as_of)
    conn.execute(sa.text(f"analyze {stage}"))  # statistics for the planner from the first read on
    return digest.hexdigest()


def _constrain_partition(conn: sa.Connection, contract: TableContract, table: str, as_of: date) -> None:
    """The primary key, and a check that lets ATTACH PARTITION skip scanning the rows."""
    conn.execute(
        sa.text(
            f"alter table {_quote(table)} add constraint {_quote(f'{table}_as_of')} check (as_of = '{as_of}'),"
            f" add constraint {_quote(f'{table}_pkey')} primary key ({_column_list(contract.key)})"
        )
    )


def _swap_partition(conn: sa.Connection, contract: TableContract, as_of: date) -> None:
    """Put the loaded table in place of the as_of partition (dropping the old one), in the caller's transaction."""
    part = _partition_name(contract, as_of)
    stage = f"{part}__stage"
    conn.execute(sa.text(f"drop table if exists {_quote(part)}"))
    conn.execute(sa.text(f"alter table {_quote(stage)} rename to {_quote(part)}"))
    # Index and constraint names must not collide with the next re-run's staging table.
    conn.execute(sa.text(f"alter index {_quote(f'{stage}_pkey')} rename to {_quote(f'{part}_pkey')}"))
    conn.execute(
        sa.text(f"alter table {_quote(part)} rename constraint {_quote(f'{stage}_as_of')} to {_quote(f'{part}_as_of')}")
    )
    conn.execute(
        sa.text(f"alter table {_quote(contract.name)} attach partition {_quote(part)} for values in ('{as_of}')")
    )


def _record_attempt(
    conn: sa.Connection,
    report: ValidationReport,
    row_count: int,
    digest: str | None,
    flow_run_id: str | None,
    lineage: dict[str, str | None] | None = None,
) -> None:
    document = report.to_dict()
    params = {
        "table": report.table,
        "as_of": report.as_of,
        "passed": report.success,
        "report": json.dumps(document, allow_nan=False),
        "flow_run_id": flow_run_id,
    }
    conn.execute(_APPEND_RUN, params)
    profile = json.dumps(document["profile"], allow_nan=False)
    lineage = lineage or {"source": None, "raw_digest": None}
    conn.execute(_UPSERT_SNAPSHOT, {**params, "row_count": row_count, "profile": profile, "digest": digest, **lineage})


def _snapshot_state(conn: sa.Connection, table: str, as_of: date) -> bool | None:
    """True if passed, False if recorded as failed, None if never recorded."""
    if not _store_exists(conn):
        return None
    return conn.execute(
        sa.text("select passed from feature_snapshots where table_name = :table and as_of = :as_of"),
        {"table": table, "as_of": as_of},
    ).scalar_one_or_none()


def _store_exists(conn: sa.Connection) -> bool:
    return bool(conn.execute(sa.text("select to_regclass('feature_snapshots') is not null")).scalar())


def _query(engine: sa.Engine, sql: str, **params: Any) -> list[sa.Row]:
    """Rows of a feature_snapshots query; none before ensure_schema ever ran."""
    with engine.connect() as conn:
        if not _store_exists(conn):
            return []
        return list(conn.execute(sa.text(sql), params))


def _parse_csv(contract: TableContract, names: list[str], buffer: io.BytesIO) -> pl.DataFrame:
    schema = {n: contract.schema[n] for n in names}
    # Postgres writes booleans as t/f, which the CSV reader does not parse.
    read_types = {n: pl.Utf8() if t == pl.Boolean else t for n, t in schema.items()}
    buffer.seek(0)
    frame = pl.read_csv(buffer, schema=read_types)
    return frame.with_columns((pl.col(n) == "t").alias(n) for n, t in schema.items() if t == pl.Boolean)
