"""Every publication's lists archived in Postgres, to answer what a user was served in a past week.

Table `published_lists` (version, user_id, items bigint[], best first), LIST-partitioned by
the publication version: each version's lists are COPYed (FREEZE) into a new table that is
then attached as that version's partition, so archiving a version again replaces it whole,
and retention drops partitions. Table `published_fallbacks` (version, as_of, items) holds the
list every user without a personal list got.

Which version a week was served from comes from the live pointer's moves
(`inference.publications.pointer_history`): see `select_served_version`.
"""

import io
import logging
import time as timer
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple

import polars as pl
import psycopg
import redis
import sqlalchemy as sa

from inference import publications
from inference.serving import Recommendation, check_recommendations, check_version, client_keys
from ranking import registry
from ranking.candidates import CandidateConfig, with_stored_counts

log = logging.getLogger(__name__)

_READ_CHUNK = 5_000
_LOCK_SPACE = "weekly-recs.archive"
_LISTS = "published_lists"
_LISTS_DDL = f"""
create table if not exists {_LISTS} (
    version text not null,
    user_id bigint not null,
    items bigint[] not null,
    primary key (version, user_id)
) partition by list (version)"""
_FALLBACKS_DDL = """
create table if not exists published_fallbacks (
    version text primary key,
    as_of date not null,
    items bigint[] not null,
    archived_at timestamptz not null default now()
)"""


class ArchiveMissing(LookupError):
    """The archive holds no lists for a week or a version."""


class ServedList(NamedTuple):
    """What one user was shown: the publication version, its items best first, and whether it was the fallback."""

    version: str
    items: list[int]
    is_fallback: bool


def ensure_schema(engine: sa.Engine) -> None:
    """Create `published_lists` (partitioned by version) and `published_fallbacks` if missing."""
    with engine.begin() as conn:
        _lock(conn, "schema")
        conn.execute(sa.text(_LISTS_DDL))
        conn.execute(sa.text(_FALLBACKS_DDL))


def archive_lists(engine: sa.Engine, version: str, lists: pl.DataFrame) -> int:
    """Archive a publication's personal lists (user_id, items), replacing any earlier archive of `version`.

    One transaction: COPY FREEZE into a new table, then the old partition is dropped, the
    key built and the table attached, so readers never see a partial version. Returns the row count.
    """
    check_version(version)
    check_recommendations(lists)
    part, stage = _partition(version), _quote(f"{_LISTS}__{version}__stage")
    rows = lists.select(
        pl.lit(version).alias("version"),
        pl.col("user_id").cast(pl.Int64),
        pl.concat_str(pl.lit("{"), pl.col("items").cast(pl.List(pl.String)).list.join(","), pl.lit("}")),
    )
    started = timer.perf_counter()
    with engine.begin() as conn:
        _lock(conn, version)
        conn.execute(sa.text(f"create table {stage} (like {_LISTS})"))
        cursor = conn.connection.driver_connection.cursor()
        try:
            # The table is new in this transaction: FREEZE writes its rows already frozen.
            with cursor.copy(f"copy {stage} (version, user_id, items) from stdin (format csv, freeze)") as copy:
                copy.write(rows.write_csv(include_header=False))
        except psycopg.Error as error:
            raise sa.exc.DBAPIError.instance("copy", None, error, psycopg.Error) from error
        # The old partition goes first so the new key can take its index name; from here the
        # parent stays locked until commit, but the slow COPY is already done.
        conn.execute(sa.text(f"drop table if exists {part}"))
        conn.execute(
            sa.text(
                f"alter table {stage} add constraint {_quote(f'{_LISTS}__{version}_version')}"
                f" check (version = '{version}'),"
                f" add constraint {_quote(f'{_LISTS}__{version}_pkey')} primary key (version, user_id)"
            )
        )
        conn.execute(sa.text(f"alter table {stage} rename to {part}"))
        conn.execute(sa.text(f"alter table {_LISTS} attach partition {part} for values in ('{version}')"))
    log.info("archived %d lists of %s in %.2fs", rows.height, version, timer.perf_counter() - started)
    return rows.height


def read_published_lists(r: redis.Redis, prefix: str, version: str) -> pl.DataFrame:
    """Every personal list of `version` in Redis, (user_id, items): what `archive_lists` takes.

    SCAN, then GETs in pipelines (one per slot on a cluster): about 0.8 s per 100k users here.
    """
    keys = client_keys(r, prefix)
    names = list(r.scan_iter(match=keys.user(check_version(version), "*"), count=_READ_CHUNK))
    values: list[str] = []
    for start in range(0, len(names), _READ_CHUNK):
        pipe = r.pipeline(transaction=False)
        for name in names[start : start + _READ_CHUNK]:
            pipe.get(name)
        values += pipe.execute()
    user = len(keys.user(version, ""))
    frame = pl.DataFrame({"key": names, "value": values}, schema={"key": pl.String, "value": pl.String})
    return frame.select(
        pl.col("key").str.slice(user).cast(pl.Int64).alias("user_id"),
        pl.col("value").str.json_decode(pl.List(pl.Int64)).alias("items"),
    ).sort("user_id")


def archive_fallback(engine: sa.Engine, version: str, items: list[int]) -> None:
    """Archive (or replace) the fallback list of `version`."""
    if not items:
        raise ValueError(f"archive_fallback: the fallback list of {version} is empty")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "insert into published_fallbacks (version, as_of, items) values (:version, :as_of, :items)"
                " on conflict (version) do update set as_of = excluded.as_of, items = excluded.items,"
                " archived_at = now()"
            ),
            {"version": version, "as_of": version_as_of(version), "items": [int(i) for i in items]},
        )


def drop_old(engine: sa.Engine, keep_weeks: int) -> list[str]:
    """Drop the versions whose as_of is `keep_weeks` weeks or more before the newest archived as_of; their ids.

    Measured from the newest archive rather than the clock, so a paused job keeps its history.
    """
    if keep_weeks < 1:
        raise ValueError(f"drop_old: keep_weeks must be >= 1, got {keep_weeks}")
    versions = archived_versions(engine)
    if not versions:
        return []
    cutoff = max(version_as_of(v) for v in versions) - timedelta(weeks=keep_weeks)
    old = [v for v in versions if version_as_of(v) <= cutoff]
    with engine.begin() as conn:
        for version in old:
            _lock(conn, version)
            conn.execute(sa.text(f"drop table if exists {_partition(version)}"))
        conn.execute(sa.text("delete from published_fallbacks where version = any(:old)"), {"old": old})
    if old:
        log.info("dropped %d archived versions older than %s: %s", len(old), cutoff, old)
    return old


def archived_versions(engine: sa.Engine) -> list[str]:
    """Every version with archived lists or a fallback, oldest first."""
    query = sa.text(
        "select substr(c.relname, :skip) from pg_inherits i join pg_class c on c.oid = i.inhrelid"
        " where i.inhparent = to_regclass(:parent) union select version from published_fallbacks"
    )
    with engine.connect() as conn:
        rows = conn.execute(query, {"skip": len(_LISTS) + 3, "parent": _LISTS}).scalars()
        return sorted(rows)


def read_lists(engine: sa.Engine, version: str) -> pl.DataFrame:
    """The archived personal lists of `version`: (user_id, items), by user."""
    check_version(version)
    _require_archived(engine, version)
    query = (
        f"copy (select user_id, array_to_string(items, ',') from {_partition(version)} order by user_id)"
        " to stdout (format csv)"
    )
    buffer = io.BytesIO()
    with engine.connect() as conn, conn.connection.driver_connection.cursor().copy(query) as copy:
        for data in copy:
            buffer.write(data)
    schema = {"user_id": pl.Int64, "items": pl.String}
    if not buffer.tell():  # a version whose every user got the fallback
        return pl.DataFrame(schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)})
    buffer.seek(0)
    frame = pl.read_csv(buffer, has_header=False, schema=schema)
    return frame.with_columns(pl.col("items").str.split(",").cast(pl.List(pl.Int64)))


def read_fallback(engine: sa.Engine, version: str) -> list[int]:
    """The archived fallback list of `version`."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("select items from published_fallbacks where version = :version"), {"version": version}
        ).scalar_one_or_none()
    if found is None:
        raise ArchiveMissing(f"version {version} has no archived fallback list: run archive_fallback for it")
    return found


def served_version(engine: sa.Engine, week: date, *, prefix: str) -> str:
    """The version live the longest during `week` under `prefix` (see `select_served_version`)."""
    moves = publications.pointer_history(engine, prefix)
    version = select_served_version(moves, week)
    if version is None:
        weeks = sorted({version_as_of(v) for v in moves["to_version"]})
        nearby = [str(w) for w in weeks if abs((w - week).days) <= 28] or [str(w) for w in weeks[-3:]]
        raise ArchiveMissing(
            f"week {week} was never published under prefix {prefix!r}; published weeks nearby: {nearby or 'none'}"
        )
    return version


def served_list(engine: sa.Engine, user_id: int, week: date, *, prefix: str) -> ServedList:
    """What `user_id` was shown during `week`: their personal list of the version served then, else its fallback."""
    version = served_version(engine, week, prefix=prefix)
    try:
        _require_archived(engine, version)
    except ArchiveMissing as missing:
        raise ArchiveMissing(f"user {user_id}, week {week}: {missing}") from None
    with engine.connect() as conn:
        items = conn.execute(
            sa.text(f"select items from {_partition(version)} where user_id = :user"), {"user": int(user_id)}
        ).scalar_one_or_none()
    if items is not None:
        return ServedList(version, items, False)
    return ServedList(version, read_fallback(engine, version), True)


def served_recommendations(
    engine: sa.Engine, user_ids: Sequence[int], week: date, *, prefix: str
) -> list[Recommendation]:
    """`served_list` of each user, as the `Recommendation` a client read from Redis then (`recsys recs --week`)."""
    served = [served_list(engine, user_id, week, prefix=prefix) for user_id in user_ids]
    models = {s.version: model_version_of(engine, s.version) for s in served}
    models = {version: "" if model is None else str(model) for version, model in models.items()}
    return [
        Recommendation(
            user_id=int(user_id), items=s.items, model_version=models[s.version],
            as_of=version_as_of(s.version), version=s.version, is_fallback=s.is_fallback,
        )
        for user_id, s in zip(user_ids, served, strict=True)
    ]  # fmt: skip


def model_version_of(engine: sa.Engine, version: str) -> int | None:
    """The model version that produced a publication, from its lineage row (None if it has none)."""
    table = publications.publications
    with engine.connect() as conn:
        return conn.execute(sa.select(table.c.model_version).where(table.c.version == version)).scalar_one_or_none()


def served_candidates(engine: sa.Engine, version: str, config: CandidateConfig) -> CandidateConfig:
    """`config` with the candidate counts of the model that produced a publication (as it was trained);
    `config` itself when the publication has no model lineage or the model is no longer registered."""
    table = publications.publications
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(table.c.model_name, table.c.model_version).where(table.c.version == version)
        ).one_or_none()
    if row is None or row.model_name is None or row.model_version is None:
        return config
    try:
        record = registry.get_model(engine, row.model_name, row.model_version)
    except registry.ModelNotFoundError:
        return config
    return with_stored_counts(config, record.params)


def select_served_version(moves: pl.DataFrame, week: date) -> str | None:
    """Of the pointer `moves` (at, to_version; oldest first), the version live the longest in [week, week+7d).

    None unless a version of as_of `week` went live before the week ended: a week whose own
    publication never went live counts as never published, even if an older version stayed live.
    A mid-week rollback or re-publication means users saw two lists; the one live the longest
    is what the week is measured on (on a tie, the first live). A version that first went live
    only after its own week ended (a replay of history, a late backfill) counts as live from its
    Monday: it is what that week was served.
    """
    start = datetime.combine(week, time(), UTC)
    end = start + timedelta(days=7)
    timeline, seen = [], set()
    for at, version in moves.sort("at", maintain_order=True).select("at", "to_version").iter_rows():
        monday = datetime.combine(version_as_of(version), time(), UTC)
        timeline.append((monday if version not in seen and at >= monday + timedelta(days=7) else at, version))
        seen.add(version)
    live, since, seconds, published = None, start, {}, False
    for at, version in sorted(timeline, key=lambda move: move[0]):
        if at >= end:
            break
        published = published or version_as_of(version) == week
        if at > start and live is not None:
            seconds[live] = seconds.get(live, 0.0) + (at - since).total_seconds()
        live, since = version, max(at, start)
    if live is not None:
        seconds[live] = seconds.get(live, 0.0) + (end - since).total_seconds()
    return max(seconds, key=seconds.__getitem__) if published else None


def version_as_of(version: str) -> date:
    """The as_of a version id starts with (`20261123-000007` → 2026-11-23)."""
    return datetime.strptime(check_version(version)[:8], "%Y%m%d").date()


def _require_archived(engine: sa.Engine, version: str) -> None:
    with engine.connect() as conn:
        exists = conn.execute(sa.text("select to_regclass(:name) is not null"), {"name": _partition(version)}).scalar()
    if not exists:
        raise ArchiveMissing(
            f"version {version} has no archived lists: it was dropped by retention (RECSYS_ARCHIVE_WEEKS) "
            "or published before archiving began"
        )


def _partition(version: str) -> str:
    return _quote(f"{_LISTS}__{check_version(version)}")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lock(conn: sa.Connection, key: str) -> None:
    conn.execute(
        sa.text("select pg_advisory_xact_lock(hashtext(:space), hashtext(:key))"), {"space": _LOCK_SPACE, "key": key}
    )
