"""Raw event sources: one spec string in, validated events and item metadata out.

Spec forms (see `read_source`):

    synthetic                          the generated demo log under synthetic_dir
    parquet:GLOB[;items=PATH]          Parquet event files (+ optional items file)
    csv:GLOB[;items=PATH]              CSV event files (+ optional items file)
    movielens:DIR                      a MovieLens 100K folder (u.data, u.item)
    sql:TABLE[;items=ITEMS_TABLE]      Postgres tables read through the engine

Event files need user_id, item_id, ts (ISO-8601 text, datetime or epoch seconds) and
may carry weight (default 1.0). Item files need item_id and may carry category (or
genre), creator (or artist) and release_ts; what a source lacks becomes "unknown"/null.
"""

import glob
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import polars as pl
import psycopg
import sqlalchemy as sa

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA

log = logging.getLogger(__name__)

SPEC_FORMS = (
    "synthetic",
    "parquet:GLOB[;items=PATH]",
    "csv:GLOB[;items=PATH]",
    "movielens:DIR",
    "sql:TABLE[;items=ITEMS_TABLE]",
)
EVENT_KEY = ["user_id", "item_id", "ts"]
UNKNOWN = "unknown"
ITEM_ALIASES = {"category": ("category", "genre"), "creator": ("creator", "artist")}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
# Tried in order on text timestamps (after "T"/"Z" normalisation), so one file may mix them.
_TS_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M%z",
    "%Y-%m-%dT%H:%M",
)


class RawDataError(ValueError):
    """A raw source is missing, malformed or inconsistent; the message names source and column."""


@dataclass(frozen=True, eq=False)
class RawData:
    """Interaction events (RAW_EVENTS_SCHEMA) and item metadata (RAW_ITEMS_SCHEMA)."""

    events: pl.DataFrame
    items: pl.DataFrame
    duplicates: int = 0  # repeated (user_id, item_id, ts) events dropped while reading


class _Extract(NamedTuple):
    events: pl.DataFrame
    items: pl.DataFrame | None
    source: str  # names the events in messages
    items_source: str  # names the item metadata in messages


def read_source(
    spec: str,
    *,
    before: datetime | None = None,
    engine: sa.Engine | None = None,
    synthetic_dir: Path | None = None,
    now: datetime | None = None,
) -> RawData:
    """Read the source named by `spec`, keep events with ts < before, validate and conform."""
    started = time.perf_counter()
    kind, target, options = _parse_spec(spec)
    before, now = _as_utc(before), _as_utc(now)
    # Readers skip events at or after `before` but keep those after `now`: they are
    # errors in the source, which validation must name rather than silently drop.
    if kind == "synthetic":
        extract = _read_synthetic(synthetic_dir, before, now)
    elif kind in ("parquet", "csv"):
        extract = _read_files(kind, target, options.get("items"), before, now)
    elif kind == "movielens":
        extract = _read_movielens(Path(target), before, now)
    else:
        extract = _read_sql(engine, target, options.get("items"), before, now)
    events, duplicates = validate_events(extract.events, source=extract.source, now=now)
    if before is not None:
        # Typed timestamps were filtered while reading; text ones only parse in validation.
        events = events.filter(pl.col("ts") < before)
        if events.is_empty():
            raise RawDataError(f"source {extract.source}: no events before {before.isoformat()}")
    items = conform_items(extract.items, events, source=extract.items_source)
    log.info(
        "read %d events (%d duplicates dropped), %d items from %s in %.2fs",
        events.height,
        duplicates,
        items.height,
        extract.source,
        time.perf_counter() - started,
    )
    return RawData(events=events, items=items, duplicates=duplicates)


def validate_events(events: pl.DataFrame, *, source: str, now: datetime | None) -> tuple[pl.DataFrame, int]:
    """Check raw events; return them conformed and sorted, and how many duplicates were dropped.

    Raises RawDataError for missing columns, unparseable timestamps, null or non-integer
    ids, null/negative/NaN/infinite weights, events after `now`, or no events at all.
    """
    _require_columns(events.columns, EVENT_KEY, source)
    if events.height == 0:
        raise RawDataError(f"source {source}: no events (after the time filter, if any)")
    if "weight" not in events.columns:
        events = events.with_columns(weight=pl.lit(1.0))
    frame = events.select(
        _cast_ids(events, "user_id", source),
        _cast_ids(events, "item_id", source),
        _parse_timestamps(events, "ts", source),
        _cast_weights(events, source),
    )
    now = _as_utc(now)
    if now is not None:
        future = frame.filter(pl.col("ts") > now)
        if future.height:
            raise RawDataError(
                f"source {source}: column ts: {future.height} events after the run time "
                f"{now.isoformat()}, latest {future['ts'].max()}"
            )
    deduped, duplicates = drop_duplicate_events(frame)
    if duplicates:
        log.info("dropped %d duplicate (user_id, item_id, ts) events from %s", duplicates, source)
    return deduped, duplicates


def drop_duplicate_events(events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Sort by (ts, user_id, item_id, weight); keep the first row of each (user_id, item_id, ts)."""
    ordered = events.sort(["ts", "user_id", "item_id", "weight"])
    # Sorted, duplicates are neighbours: a shift compare is linear, unlike a hash-based unique.
    repeat = pl.all_horizontal(pl.col(c) == pl.col(c).shift(1) for c in EVENT_KEY).fill_null(False)
    deduped = ordered.filter(~repeat)
    return deduped, ordered.height - deduped.height


def conform_items(items: pl.DataFrame | None, events: pl.DataFrame, *, source: str) -> pl.DataFrame:
    """Conform item metadata to RAW_ITEMS_SCHEMA, covering every item of `events`.

    What the metadata lacks is "unknown" (category, creator) or null (release_ts). A
    release_ts after the item's first event is moved back to that event.
    """
    if items is None:
        items = events.select("item_id").unique()
    _require_columns(items.columns, ["item_id"], source)
    items = items.rename(
        {
            alias: name
            for name, aliases in ITEM_ALIASES.items()
            for alias in aliases
            if alias in items.columns and name not in items.columns
        }
    )
    given = items.select(
        _cast_ids(items, "item_id", source),
        *(_column_or_null(items, name) for name in ("category", "creator")),
        _parse_timestamps(items, "release_ts", source, nullable=True)
        if "release_ts" in items.columns
        else _column_or_null(items, "release_ts"),
    )
    repeated = given.filter(pl.col("item_id").is_duplicated())["item_id"]
    if repeated.len():
        raise RawDataError(
            f"source {source}: column item_id: {repeated.n_unique()} item ids appear more than "
            f"once in the items, e.g. {repeated[0]}"
        )
    first_play = events.group_by("item_id").agg(first_ts=pl.col("ts").min())
    merged = given.join(first_play, on="item_id", how="full", coalesce=True)
    # An item is out by its first play at the latest: release dates given only to the year
    # (MovieLens: "01-Jan-1998" for films rated in 1997) would otherwise come after their plays.
    after_first = pl.col("release_ts") > pl.col("first_ts")
    if late := merged.filter(after_first).height:
        log.info("moved release_ts back to the first event for %d items of %s", late, source)
    return (
        merged.select(
            "item_id",
            pl.col("category").fill_null(UNKNOWN),
            pl.col("creator").fill_null(UNKNOWN),
            release_ts=pl.when(after_first).then("first_ts").otherwise("release_ts"),
        )
        .cast(RAW_ITEMS_SCHEMA)
        .sort("item_id")
    )


def _parse_timestamps(frame: pl.DataFrame, column: str, source: str, *, nullable: bool = False) -> pl.Series:
    """`column` as Datetime(us, UTC); raise naming an example value that does not parse."""
    raw = frame[column]
    if raw.dtype == pl.Utf8:
        parsed = _parse_text_timestamps(raw)
    else:
        parsed = frame.select(_timestamp_expr(raw.dtype, column, source)).to_series()
    bad = raw.filter(parsed.is_null() & raw.is_not_null())
    if bad.len():
        raise RawDataError(
            f"source {source}: column {column}: {bad.len()} unparseable timestamps, "
            f"e.g. {bad[0]!r} (expected ISO-8601 text, a datetime, or epoch seconds)"
        )
    if not nullable and raw.null_count():
        raise RawDataError(f"source {source}: column {column}: {raw.null_count()} null timestamps")
    return parsed.alias(column)


def _parse_text_timestamps(values: pl.Series) -> pl.Series:
    """ISO-8601 text to Datetime(us, UTC), trying formats in turn until every value parsed."""
    text = values.str.strip_chars().str.replace(" ", "T", literal=True).str.replace("Z$", "+00:00")
    parsed = None
    for fmt in _TS_FORMATS:
        attempt = text.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        parsed = attempt if parsed is None else parsed.fill_null(attempt)
        # A uniform file takes one pass; only mixed ones pay for further formats.
        if parsed.null_count() == values.null_count():
            break
    return parsed


def write_events_table(engine: sa.Engine, table: str, raw: RawData, *, items_table: str | None = None) -> None:
    """Replace Postgres table `table` with raw.events and `items_table` with raw.items.

    `items_table` defaults to `<table>_items`. Tables are created, then filled with COPY,
    in one transaction; used to exercise the `sql:` source.
    """
    items_table = items_table or f"{table}_items"
    events_name, items_name = _quote_table(engine, table), _quote_table(engine, items_table)
    events = raw.events.cast(RAW_EVENTS_SCHEMA).select(list(RAW_EVENTS_SCHEMA))
    items = raw.items.cast(RAW_ITEMS_SCHEMA).select(list(RAW_ITEMS_SCHEMA))
    with engine.begin() as conn:
        conn.execute(sa.text(f"drop table if exists {events_name}"))
        conn.execute(sa.text(f"drop table if exists {items_name}"))
        conn.execute(
            sa.text(
                f"create table {events_name} (user_id bigint not null, item_id bigint not null, "
                "ts timestamptz not null, weight double precision not null)"
            )
        )
        conn.execute(
            sa.text(
                f"create table {items_name} (item_id bigint primary key, category text not null, "
                "creator text not null, release_ts timestamptz)"
            )
        )
        cursor = conn.connection.driver_connection.cursor()
        _copy_frame(cursor, events_name, events)
        _copy_frame(cursor, items_name, items)
        conn.execute(sa.text(f"create index on {events_name} (ts)"))
    log.info("wrote %d events to %s and %d items to %s", events.height, table, items.height, items_table)


def _parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    head, *parts = spec.strip().split(";")
    kind, _, target = head.partition(":")
    forms = ", ".join(SPEC_FORMS)
    if kind not in ("synthetic", "parquet", "csv", "movielens", "sql"):
        raise RawDataError(f"source {spec!r}: unknown source kind {kind!r}; valid forms: {forms}")
    if (kind == "synthetic") == bool(target):
        raise RawDataError(
            f"source {spec!r}: {kind} {'takes no' if target else 'needs a'} target; valid forms: {forms}"
        )
    options = dict(part.partition("=")[::2] for part in parts)
    allowed = {"items"} if kind in ("parquet", "csv", "sql") else set()
    if unknown := set(options) - allowed:
        raise RawDataError(f"source {spec!r}: unknown options {sorted(unknown)}; valid forms: {forms}")
    return kind, target, options


def _read_synthetic(folder: Path | None, before: datetime | None, now: datetime | None) -> _Extract:
    if folder is None:
        raise RawDataError("source synthetic: no synthetic_dir given")
    events_path, items_path = folder / "events.parquet", folder / "items.parquet"
    if not (events_path.exists() and items_path.exists()):
        raise RawDataError(
            f"source synthetic: no generated log in {folder}; generate it first "
            "(features.synthetic.generate_log + write_log)"
        )
    return _read_files("parquet", str(events_path), str(items_path), before, now)


def _read_files(
    kind: str, pattern: str, items_path: str | None, before: datetime | None, now: datetime | None
) -> _Extract:
    if not glob.glob(pattern, recursive=True):
        raise RawDataError(f"source {pattern}: no {kind} files match")
    scan = pl.scan_parquet if kind == "parquet" else pl.scan_csv
    events = _collect(lambda: _filter_before(scan(pattern), before, now, pattern), pattern)
    if items_path is None:
        return _Extract(events, None, pattern, pattern)
    if not Path(items_path).exists():
        raise RawDataError(f"source {items_path}: items file not found")
    scan = pl.scan_parquet if items_path.endswith(".parquet") else pl.scan_csv
    return _Extract(events, _collect(lambda: scan(items_path), items_path), pattern, items_path)


def _collect(build: Callable[[], pl.LazyFrame], source: str) -> pl.DataFrame:
    try:
        return build().collect()
    except pl.exceptions.PolarsError as error:
        raise RawDataError(f"source {source}: cannot read: {error}") from error


def _read_movielens(folder: Path, before: datetime | None, now: datetime | None) -> _Extract:
    ratings, titles, genre_list = folder / "u.data", folder / "u.item", folder / "u.genre"
    for path in (ratings, titles, genre_list):
        if not path.exists():
            raise RawDataError(f"source {path}: MovieLens 100K file not found")
    lazy = pl.scan_csv(
        ratings,
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "weight", "ts"],
    )
    events = _filter_before(lazy, before, now, str(ratings)).collect()
    genres = [line.split("|")[0] for line in genre_list.read_text("latin-1").splitlines() if line]
    # u.item is latin-1 and titles contain quotes: decode first, never treat quotes specially.
    rows = pl.read_csv(
        io.StringIO(titles.read_bytes().decode("latin-1")),
        separator="|",
        has_header=False,
        quote_char=None,
        infer_schema=False,
        new_columns=["item_id", "title", "release", "video_release", "url", *genres],
    )
    first_genre = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genres]
    items = rows.select(
        "item_id",
        category=pl.coalesce([*first_genre, pl.lit(UNKNOWN)]),
        # MovieLens names no director or studio: "unknown" rather than an invented creator.
        creator=pl.lit(UNKNOWN),
        release_ts=pl.col("release").str.to_datetime("%d-%b-%Y", strict=False, time_unit="us", time_zone="UTC"),
    )
    return _Extract(events, items, str(ratings), str(titles))


def _read_sql(
    engine: sa.Engine | None, table: str, items_table: str | None, before: datetime | None, now: datetime | None
) -> _Extract:
    source = f"sql:{table}"
    if engine is None:
        raise RawDataError(f"source {source}: no database engine given")
    columns = _table_columns(engine, table)
    _require_columns(list(columns), EVENT_KEY, source)
    if not isinstance(columns["ts"], sa.DateTime):
        raise RawDataError(f"source {source}: column ts: type {columns['ts']} is not timestamp or timestamptz")
    wanted = {name: columns[name] for name in RAW_EVENTS_SCHEMA if name in columns}
    if before is None:
        events = _copy_out(engine, table, wanted)
    else:
        # Both ranges can use an index on ts; the time window is applied by the database.
        if now is None:
            events = _copy_out(engine, table, wanted, "where ts < %(before)s", {"before": before})
        else:
            where = "where ts < %(before)s or ts > %(now)s"
            events = _copy_out(engine, table, wanted, where, {"before": before, "now": now})
    if items_table is None:
        return _Extract(events, None, source, source)
    item_columns = _table_columns(engine, items_table)
    known = ["item_id", "release_ts", *(a for aliases in ITEM_ALIASES.values() for a in aliases)]
    items = _copy_out(engine, items_table, {c: item_columns[c] for c in known if c in item_columns})
    return _Extract(events, items, source, f"sql:{items_table}")


def _table_columns(engine: sa.Engine, table: str) -> dict[str, sa.types.TypeEngine]:
    _check_identifier(table)
    schema, _, name = table.rpartition(".")
    inspector = sa.inspect(engine)
    if not inspector.has_table(name, schema=schema or None):
        raise RawDataError(f"source sql:{table}: table not found")
    return {c["name"]: c["type"] for c in inspector.get_columns(name, schema=schema or None)}


def _copy_out(
    engine: sa.Engine,
    table: str,
    columns: dict[str, sa.types.TypeEngine],
    where: str = "",
    params: dict[str, object] | None = None,
) -> pl.DataFrame:
    """Rows of `table` through COPY TO as CSV; timestamps travel as exact epoch microseconds."""
    quote = engine.dialect.identifier_preparer.quote
    stamps = [name for name, kind in columns.items() if isinstance(kind, sa.DateTime)]
    select = ", ".join(
        f"(extract(epoch from {quote(name)}) * 1000000)::bigint" if name in stamps else quote(name) for name in columns
    )
    # psycopg binds `params` into COPY client-side with proper quoting (COPY takes no $n).
    statement = f"copy (select {select} from {_quote_table(engine, table)} {where}) to stdout (format csv)"
    buffer = io.BytesIO()
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(statement, params) as copy:
            for block in copy:
                buffer.write(block)
    schema = {name: _polars_type(kind) for name, kind in columns.items()}
    frame = (
        pl.read_csv(buffer.getvalue(), has_header=False, new_columns=list(columns), schema=schema)
        if buffer.tell()
        else pl.DataFrame(schema=schema)
    )
    return frame.with_columns(pl.from_epoch(name, time_unit="us").dt.replace_time_zone("UTC") for name in stamps)


def _polars_type(kind: sa.types.TypeEngine) -> pl.DataType:
    if isinstance(kind, sa.DateTime | sa.Integer):
        return pl.Int64()
    return pl.Float64() if isinstance(kind, sa.Float | sa.Numeric) else pl.Utf8()


def _check_identifier(table: str) -> None:
    if not _IDENTIFIER.match(table):
        raise RawDataError(
            f"source sql:{table}: table name is not an identifier (letters, digits and _, optionally schema.table)"
        )


def _quote_table(engine: sa.Engine, table: str) -> str:
    _check_identifier(table)
    preparer = engine.dialect.identifier_preparer
    return ".".join(preparer.quote(part) for part in table.split("."))


def _copy_frame(cursor: psycopg.Cursor, table: str, frame: pl.DataFrame, chunk: int = 500_000) -> None:
    columns = ", ".join(frame.columns)
    with cursor.copy(f"copy {table} ({columns}) from stdin (format csv)") as copy:
        for offset in range(0, frame.height, chunk):
            part = frame.slice(offset, chunk)
            copy.write(part.write_csv(include_header=False, datetime_format="%Y-%m-%dT%H:%M:%S%.6f%z"))


def _filter_before(lazy: pl.LazyFrame, before: datetime | None, now: datetime | None, source: str) -> pl.LazyFrame:
    if before is None:
        return lazy
    schema = lazy.collect_schema()
    if "ts" not in schema or schema["ts"] == pl.Utf8:
        return lazy  # read_source filters once validation has parsed (or named) the column
    ts = _timestamp_expr(schema["ts"], "ts", source)
    # Unparseable rows are kept so validation can name them instead of silently dropping them.
    keep = ts.is_null() | (ts < before)
    return lazy.filter(keep if now is None else keep | (ts > now))


def _timestamp_expr(dtype: pl.DataType, column: str, source: str) -> pl.Expr:
    """Expression converting a typed (not text) timestamp column to Datetime(us, UTC)."""
    col = pl.col(column)
    target = RAW_EVENTS_SCHEMA["ts"]
    if dtype == target:
        return col  # untouched, so Parquet scans can skip row groups by their statistics
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return col.dt.replace_time_zone("UTC").cast(target)
        return col.dt.convert_time_zone("UTC").cast(target)
    if isinstance(dtype, pl.Date):
        return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_integer():
        return (col.cast(pl.Int64) * 1_000_000).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_float():
        micros = (col * 1_000_000).round()
        micros = pl.when(micros.is_finite()).then(micros).cast(pl.Int64, strict=False)
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    raise RawDataError(
        f"source {source}: column {column}: type {dtype} is not a timestamp "
        "(expected ISO-8601 text, a datetime, or epoch seconds)"
    )


def _cast_ids(frame: pl.DataFrame, column: str, source: str) -> pl.Series:
    values = frame[column]
    if not (values.dtype.is_numeric() or values.dtype in (pl.Utf8, pl.Null)) or values.dtype == pl.Boolean:
        raise RawDataError(f"source {source}: column {column}: type {values.dtype} is not an integer id")
    if values.null_count():
        raise RawDataError(f"source {source}: column {column}: {values.null_count()} null ids")
    ids = values.cast(pl.Int64, strict=False)
    invalid = ids.is_null()
    if values.dtype.is_float():
        invalid = invalid | (values != values.floor())
    bad = values.filter(invalid)
    if bad.len():
        raise RawDataError(f"source {source}: column {column}: {bad.len()} ids are not integers, e.g. {bad[0]!r}")
    return ids


def _cast_weights(frame: pl.DataFrame, source: str) -> pl.Series:
    values = frame["weight"]
    if not (values.dtype.is_numeric() or values.dtype == pl.Null):
        raise RawDataError(f"source {source}: column weight: type {values.dtype} is not numeric")
    weights = values.cast(pl.Float64)
    problems = {
        "null": weights.is_null().sum(),
        "NaN": weights.is_nan().sum(),
        "infinite": weights.is_infinite().sum(),
        "negative": (weights < 0).sum(),
    }
    found = [f"{count} {kind}" for kind, count in problems.items() if count]
    if found:
        raise RawDataError(f"source {source}: column weight: {', '.join(found)} weights (must be finite and >= 0)")
    return weights


def _column_or_null(frame: pl.DataFrame, column: str) -> pl.Expr:
    if column not in frame.columns:
        return pl.lit(None, RAW_ITEMS_SCHEMA[column]).alias(column)
    return pl.col(column).cast(RAW_ITEMS_SCHEMA[column])


def _require_columns(found: list[str], required: list[str], source: str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise RawDataError(f"source {source}: missing columns {missing}; found columns {list(found)}")


def _as_utc(moment: datetime | None) -> datetime | None:
    """Naive datetimes are taken as UTC; aware ones are converted."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
