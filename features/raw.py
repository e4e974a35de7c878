"""The raw-data contract: what every source must deliver, checked and conformed.

Events need user_id, item_id, ts (ISO-8601 text, datetime or epoch seconds) and may carry
weight (default 1.0). Item metadata needs item_id and may carry category (or genre),
creator (or artist) and release_ts; what a source lacks becomes "unknown"/null.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA, require_columns
from recsys.errors import ExpectedError

log = logging.getLogger(__name__)

EVENT_KEY = ["user_id", "item_id", "ts"]
UNKNOWN = "unknown"
ITEM_ALIASES = {"category": ("category", "genre"), "creator": ("creator", "artist")}

# Tried in order on text timestamps (after "T"/"Z" normalisation), so one file may mix them.
_TS_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M%z",
    "%Y-%m-%dT%H:%M",
)


class RawDataError(ExpectedError, ValueError):
    """A raw source is missing, malformed or inconsistent; the message names source and column."""


@dataclass(frozen=True, eq=False)
class RawData:
    """Interaction events (RAW_EVENTS_SCHEMA) and item metadata (RAW_ITEMS_SCHEMA)."""

    events: pl.DataFrame
    items: pl.DataFrame
    duplicates: int = 0  # repeated (user_id, item_id, ts) events dropped while reading


def validate_events(
    events: pl.DataFrame, *, source: str, now: datetime | None, allow_empty: bool = False
) -> tuple[pl.DataFrame, int]:
    """Check raw events; return them conformed and sorted, and how many duplicates were dropped.

    Raises RawDataError for missing columns, unparseable timestamps, null or non-integer
    ids, null/negative/NaN/infinite weights, events after `now`, or no events at all
    (unless `allow_empty`: one user partition of a source may have none).
    """
    require_columns(events.columns, EVENT_KEY, f"source {source}", RawDataError)
    if events.height == 0 and not allow_empty:
        raise RawDataError(f"source {source}: no events (after the time filter, if any)")
    if "weight" not in events.columns:
        events = events.with_columns(weight=pl.lit(1.0))
    frame = events.select(
        _cast_ids(events, "user_id", source),
        _cast_ids(events, "item_id", source),
        _parse_timestamps(events, "ts", source),
        _cast_weights(events, source),
    )
    now = as_utc(now)
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
    require_columns(items.columns, ["item_id"], f"source {source}", RawDataError)
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
        parsed = frame.select(timestamp_expr(raw.dtype, column, source)).to_series()
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


def timestamp_expr(dtype: pl.DataType, column: str, source: str) -> pl.Expr:
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


def as_utc(moment: datetime | None) -> datetime | None:
    """`moment` in UTC: naive datetimes are taken as UTC; aware ones are converted."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
