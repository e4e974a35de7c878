"""Raw event sources: one spec string in, validated events and item metadata out.

Spec forms (see `read_source`):

    synthetic[:KIND]                   a generated synthetic log under synthetic_dir; KIND is a world of
                                       features.synthetic.KINDS (demo, sequential); bare: the demo
                                       (entry points read a bare spec as RECSYS_SYNTHETIC_KIND: `resolve_synthetic`)
    parquet:GLOB[;items=PATH]          Parquet event files (+ optional items file)
    csv:GLOB[;items=PATH]              CSV event files (+ optional items file)
    movielens:DIR                      a MovieLens 100K folder (u.data, u.item)
    sql:TABLE[;items=ITEMS_TABLE]      Postgres tables read through the engine

What the events and item metadata must hold is the raw-data contract in `features.raw`.
"""

import glob
import io
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import polars as pl
import sqlalchemy as sa

from features.contracts import RAW_EVENTS_SCHEMA, require_columns
from features.raw import (
    EVENT_KEY,
    ITEM_ALIASES,
    UNKNOWN,
    RawData,
    RawDataError,
    as_utc,
    conform_items,
    timestamp_expr,
    validate_events,
)
from features.synthetic import DEFAULT_KIND, folder_kind
from features.synthetic import KINDS as SYNTHETIC_KINDS
from recsys.partitions import Partition, in_partition, partition_sql

log = logging.getLogger(__name__)

SPEC_FORMS = (
    "synthetic[:KIND]",
    "parquet:GLOB[;items=PATH]",
    "csv:GLOB[;items=PATH]",
    "movielens:DIR",
    "sql:TABLE[;items=ITEMS_TABLE]",
)
_KINDS = ("synthetic", "parquet", "csv", "movielens", "sql")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


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
    partition: Partition | None = None,
) -> RawData:
    """Read the source named by `spec`, keep events with ts < before, validate and conform.

    With `partition`, only the events of that partition's users (`features.partitioned`),
    which may be none: Parquet and CSV scans and SQL queries filter while reading, so
    the other partitions' events are never held; MovieLens is filtered after loading.
    """
    started = time.perf_counter()
    kind, target, options = _parse_spec(spec)
    before, now = as_utc(before), as_utc(now)
    # Readers skip events at or after `before` but keep those after `now`: they are
    # errors in the source, which validation must name rather than silently drop.
    if kind == "synthetic":
        extract = _read_synthetic(synthetic_dir, before, now, partition, target or DEFAULT_KIND)
    elif kind in ("parquet", "csv"):
        extract = _read_files(kind, target, options.get("items"), before, now, partition)
    elif kind == "movielens":
        extract = _read_movielens(Path(target), before, now)
    else:
        extract = _read_sql(engine, target, options.get("items"), before, now, partition)
    empty_ok = partition is not None  # one partition may have no users; the merge checks the whole
    events, duplicates = validate_events(extract.events, source=extract.source, now=now, allow_empty=empty_ok)
    if partition is not None:
        # Ids that were text or untyped in the source are only known as integers now.
        events = events.filter(in_partition("user_id", partition))
    if before is not None:
        # Typed timestamps were filtered while reading; text ones only parse in validation.
        events = events.filter(pl.col("ts") < before)
        if events.is_empty() and not empty_ok:
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


def check_source_spec(spec: str) -> None:
    """Check what can be checked of `spec` without reading data; raise RawDataError naming it.

    The kind and options are known, a file glob matches files (and the items file exists),
    a MovieLens folder holds u.data, table names are identifiers.
    """
    kind, target, options = _parse_spec(spec)
    items = options.get("items")
    if kind in ("parquet", "csv"):
        if not glob.glob(target, recursive=True):
            raise RawDataError(f"source {spec!r}: no {kind} files match {target}")
        if items is not None and not Path(items).exists():
            raise RawDataError(f"source {spec!r}: items file {items} not found")
    elif kind == "movielens" and not (Path(target) / "u.data").exists():
        raise RawDataError(f"source {spec!r}: {Path(target) / 'u.data'} not found: not a MovieLens 100K folder")
    elif kind == "sql":
        for table in (target, items or target):
            _check_identifier(table, repr(spec))


def _parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    head, *parts = spec.strip().split(";")
    kind, _, target = head.partition(":")
    forms = ", ".join(SPEC_FORMS)
    if kind not in _KINDS:
        raise RawDataError(f"source {spec!r}: unknown source kind {kind!r}; valid forms: {forms}")
    if kind == "synthetic" and target:
        if target not in SYNTHETIC_KINDS:
            raise RawDataError(
                f"source {spec!r}: unknown synthetic kind {target!r}; allowed kinds: {', '.join(SYNTHETIC_KINDS)}"
            )
    elif (kind == "synthetic") == bool(target):
        raise RawDataError(
            f"source {spec!r}: {kind} {'takes no' if target else 'needs a'} target; valid forms: {forms}"
        )
    options = dict(part.partition("=")[::2] for part in parts)
    allowed = {"items"} if kind in ("parquet", "csv", "sql") else set()
    if unknown := set(options) - allowed:
        raise RawDataError(f"source {spec!r}: unknown options {sorted(unknown)}; valid forms: {forms}")
    return kind, target, options


def synthetic_kind(spec: str) -> str | None:
    """The world kind a synthetic `spec` names (bare `synthetic`: the demo); None for any other source."""
    kind, target, _ = _parse_spec(spec)
    return (target or DEFAULT_KIND) if kind == "synthetic" else None


def resolve_synthetic(spec: str, default_kind: str) -> str:
    """`spec` with a bare `synthetic` read as the `default_kind` world (RECSYS_SYNTHETIC_KIND), written
    canonically: `synthetic` for the demo, `synthetic:KIND` otherwise; other specs unchanged.

    Entry points resolve once, so lineage (the spec stored with each snapshot) names the world.
    """
    kind, target, _ = _parse_spec(spec)
    if kind != "synthetic":
        return spec
    world = target or default_kind
    if world not in SYNTHETIC_KINDS:
        raise RawDataError(f"synthetic kind {world!r} is unknown; allowed kinds: {', '.join(SYNTHETIC_KINDS)}")
    return "synthetic" if world == DEFAULT_KIND else f"synthetic:{world}"


def _read_synthetic(
    folder: Path | None,
    before: datetime | None,
    now: datetime | None,
    partition: Partition | None = None,
    kind: str = DEFAULT_KIND,
) -> _Extract:
    if folder is None:
        raise RawDataError("source synthetic: no synthetic_dir given")
    events_path, items_path = folder / "events.parquet", folder / "items.parquet"
    if not (events_path.exists() and items_path.exists()):
        raise RawDataError(
            f"source synthetic: no generated log in {folder}; generate it first "
            "(features.synthetic.generate_world + write_log)"
        )
    if (found := folder_kind(folder)) != kind:
        raise RawDataError(f"source synthetic:{kind}: {folder} holds a {found} log, not a {kind} one")
    return _read_files("parquet", str(events_path), str(items_path), before, now, partition)


def _read_files(
    kind: str,
    pattern: str,
    items_path: str | None,
    before: datetime | None,
    now: datetime | None,
    partition: Partition | None = None,
) -> _Extract:
    if not glob.glob(pattern, recursive=True):
        raise RawDataError(f"source {pattern}: no {kind} files match")
    scan = pl.scan_parquet if kind == "parquet" else pl.scan_csv
    events = _collect(lambda: _keep_partition(_filter_before(scan(pattern), before, now, pattern), partition), pattern)
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
    engine: sa.Engine | None,
    table: str,
    items_table: str | None,
    before: datetime | None,
    now: datetime | None,
    partition: Partition | None = None,
) -> _Extract:
    source = f"sql:{table}"
    if engine is None:
        raise RawDataError(f"source {source}: no database engine given")
    columns = _table_columns(engine, table)
    require_columns(list(columns), EVENT_KEY, f"source {source}", RawDataError)
    if not isinstance(columns["ts"], sa.DateTime):
        raise RawDataError(f"source {source}: column ts: type {columns['ts']} is not timestamp or timestamptz")
    wanted = {name: columns[name] for name in RAW_EVENTS_SCHEMA if name in columns}
    conditions, params = [], {"before": before, "now": now}
    if before is not None:
        # Both ranges can use an index on ts; the time window is applied by the database.
        conditions.append("(ts < %(before)s)" if now is None else "(ts < %(before)s or ts > %(now)s)")
    if partition is not None and isinstance(columns["user_id"], sa.Integer):
        # Other id types are filtered once validation has made them integers (or named them).
        user_id = engine.dialect.identifier_preparer.quote("user_id")
        conditions.append(f"{partition_sql(user_id, partition.count)} = {partition.index}")
    where = f"where {' and '.join(conditions)}" if conditions else ""
    events = _copy_out(engine, table, wanted, where, params if conditions else None)
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


def _check_identifier(table: str, spec: str | None = None) -> None:
    if not _IDENTIFIER.match(table):
        raise RawDataError(
            f"source {spec or f'sql:{table}'}: table name is not an identifier "
            f"(letters, digits and _, optionally schema.table): {table!r}"
        )


def _quote_table(engine: sa.Engine, table: str) -> str:
    _check_identifier(table)
    preparer = engine.dialect.identifier_preparer
    return ".".join(preparer.quote(part) for part in table.split("."))


def _keep_partition(lazy: pl.LazyFrame, partition: Partition | None) -> pl.LazyFrame:
    """The scan keeps only `partition`'s rows, if its user ids are integers (read_source filters the others)."""
    if partition is None or not lazy.collect_schema().get("user_id", pl.Utf8).is_integer():
        return lazy
    return lazy.filter(in_partition("user_id", partition))


def _filter_before(lazy: pl.LazyFrame, before: datetime | None, now: datetime | None, source: str) -> pl.LazyFrame:
    if before is None:
        return lazy
    schema = lazy.collect_schema()
    if "ts" not in schema or schema["ts"] == pl.Utf8:
        return lazy  # read_source filters once validation has parsed (or named) the column
    ts = timestamp_expr(schema["ts"], "ts", source)
    # Unparseable rows are kept so validation can name them instead of silently dropping them.
    keep = ts.is_null() | (ts < before)
    return lazy.filter(keep if now is None else keep | (ts > now))
