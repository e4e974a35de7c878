"""Test helpers that set up data: a Postgres events table, a written synthetic log, a whole Redis publication."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import redis
import sqlalchemy as sa

from features import transform
from features.collaborative import CollaborativeConfig
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData, RawDataError
from features.sources import _quote_table  # the reader's own quoting: the names round-trip
from features.synthetic import generate_log
from inference import publish
from inference.serving import check_recommendations, encode_items
from ranking.candidates import SnapshotTables, category_encoding


def write_events_table(engine: sa.Engine, table: str, raw: RawData, *, items_table: str | None = None) -> None:
    """Replace Postgres table `table` with raw.events and `items_table` (default `<table>_items`) with raw.items.

    Both are created, then filled with COPY, in one transaction: the tables a `sql:` source reads.
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
        for name, frame in ((events_name, events), (items_name, items)):
            with cursor.copy(f"copy {name} ({', '.join(frame.columns)}) from stdin (format csv)") as copy:
                copy.write(frame.write_csv(include_header=False, datetime_format="%Y-%m-%dT%H:%M:%S%.6f%z"))
        conn.execute(sa.text(f"create index on {events_name} (ts)"))


def read_log(folder: Path) -> RawData:
    """The log `features.synthetic.write_log` wrote under `folder`, as written."""
    paths = [folder / "events.parquet", folder / "items.parquet"]
    if not all(p.exists() for p in paths):
        raise RawDataError(f"source synthetic: no generated log in {folder}; run generate_log + write_log first")
    return RawData(events=pl.read_parquet(paths[0]), items=pl.read_parquet(paths[1]))


def publish_recommendations(
    r: redis.Redis,
    prefix: str,
    as_of: date,
    recs: pl.DataFrame,
    fallback: Sequence[int],
    metadata: dict[str, Any],
    *,
    chunk: int = 2_000,
    keep: int = 2,
) -> publish.PublishResult:
    """Publish a whole recommendations frame in one call: cleanup, begin, write, fallback, finish."""
    check_recommendations(recs)
    encode_items(fallback)
    try:
        publish.cleanup_stale_versions(r, prefix, keep=keep)
    except redis.RedisError as exc:
        raise publish.PublishError(f"publishing as_of {as_of}: removing stale versions failed: {exc}") from exc
    version = publish.begin_publication(r, prefix, as_of)
    publish.write_recommendations(r, prefix, version, recs, chunk=chunk)
    publish.write_fallback(r, prefix, version, fallback)
    return publish.finish_publication(r, prefix, version, expected_users=recs.height, metadata=metadata, keep=keep)


def user_lists(users: int, salt: int = 0) -> pl.DataFrame:
    """Users 0 … users-1, each with a two-item list that depends on the user and `salt` (a week's lists)."""
    return pl.DataFrame(
        {"user_id": list(range(users)), "items": [[salt * 100 + u, salt * 100 + u + 1] for u in range(users)]},
        schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)},
    )


@dataclass(frozen=True)
class NextWeek:
    """A log's week after `as_of` as dense (users, items) matrices, for judging a synthetic world's scorers."""

    past: pl.DataFrame  # the events before as_of, with their items' columns
    seen: np.ndarray  # consumed before as_of
    truth: np.ndarray  # consumed in the week, new to the user
    users: np.ndarray  # users with a past and something new in the week
    popularity: np.ndarray  # items' plays in the 4 weeks before as_of, plus one
    n_users: int
    n_items: int

    def ndcg_at_10(self, scores: np.ndarray) -> float:
        """Mean NDCG@10 over `users` of `scores` (per item, or per user and item), consumed items left out."""
        users, seen, truth = self.users, self.seen, self.truth
        scores = np.where(seen[users], -np.inf, np.broadcast_to(scores, seen.shape)[users])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        gains = np.take_along_axis(truth[users], top, axis=1) / np.log2(np.arange(2, 12))
        ideal = np.cumsum(1 / np.log2(np.arange(2, 12)))[np.minimum(truth[users].sum(1), 10) - 1]
        return float((gains.sum(axis=1) / ideal).mean())


def next_week(raw: RawData, as_of: datetime) -> NextWeek:
    events = raw.events.join(raw.items, on="item_id")
    past, week = events.filter(pl.col("ts") < as_of), events.filter(pl.col("ts") >= as_of)
    n_users, n_items = raw.events["user_id"].max() + 1, raw.items["item_id"].max() + 1
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[past["user_id"].to_numpy(), past["item_id"].to_numpy()] = True
    truth = np.zeros_like(seen)
    truth[week["user_id"].to_numpy(), week["item_id"].to_numpy()] = True
    truth &= ~seen
    users = np.flatnonzero(truth.any(axis=1) & seen.any(axis=1))
    recent = past.filter(pl.col("ts") >= as_of - timedelta(weeks=4))
    popularity = np.bincount(recent["item_id"].to_numpy(), minlength=n_items) + 1.0
    return NextWeek(past, seen, truth, users, popularity, n_users, n_items)


def small_week(
    as_of: date, collaborative: CollaborativeConfig | None = None
) -> tuple[SnapshotTables, pl.DataFrame, list[str]]:
    """A small synthetic week as of `as_of` (300 users, 120 items; EASE and ALS in its collaborative_scores
    when `collaborative` is given): its snapshot tables, labels and category encoding."""
    raw = generate_log(
        n_users=300, n_items=120, n_events=12_000, n_weeks=6, end=transform.week_start(as_of) + timedelta(weeks=1),
        seed=3,
    )  # fmt: skip
    options = {} if collaborative is None else {"collaborative": collaborative}
    tables = SnapshotTables.from_frames(
        transform.build_feature_tables(raw.events, raw.items, as_of, recent_items=10, neighbours=20, **options)
    )
    return tables, transform.build_labels(raw.events, as_of), category_encoding(tables.item_features)
