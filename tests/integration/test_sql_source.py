"""The sql: source against a real Postgres: round trip, time-window pushdown, safe table names."""

from datetime import UTC, datetime

import polars as pl
import psycopg
import pytest
import sqlalchemy as sa

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData, RawDataError
from features.sources import read_source
from recsys.partitions import Partition, in_partition, partition_of, partition_sql
from tests.helpers import write_events_table

pytestmark = pytest.mark.integration


def _raw() -> RawData:
    events = pl.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "item_id": [10, 11, 10, 12],
            "ts": [
                datetime(2024, 1, 1, 9, tzinfo=UTC),
                datetime(2024, 1, 3, 12, 30, 0, 123456, tzinfo=UTC),
                datetime(2024, 1, 8, tzinfo=UTC),
                datetime(2024, 1, 9, tzinfo=UTC),
            ],
            "weight": [1.0, 2.5, 3.0, 0.0],
        },
        schema=RAW_EVENTS_SCHEMA,
    )
    items = pl.DataFrame(
        {
            "item_id": [10, 11, 12, 13],
            "category": ["rock", "jazz", "rock", "pop"],
            "creator": ["a, the band", "b", "a, the band", "c"],
            "release_ts": [datetime(2023, 6, 1, tzinfo=UTC), None, None, None],
        },
        schema=RAW_ITEMS_SCHEMA,
    )
    return RawData(events=events, items=items)


def test_sql_source_round_trips_events_and_items(clean_stores):
    raw = _raw()
    write_events_table(clean_stores.engine, "events", raw)

    read = read_source("sql:events;items=events_items", engine=clean_stores.engine)

    assert read.events.schema == RAW_EVENTS_SCHEMA
    assert read.events.equals(raw.events)
    assert read.items.schema == RAW_ITEMS_SCHEMA
    assert read.items.equals(raw.items)


def test_sql_source_without_items_table_derives_unknown_items(clean_stores):
    write_events_table(clean_stores.engine, "public.events", _raw())

    read = read_source("sql:public.events", engine=clean_stores.engine)

    assert read.items["item_id"].to_list() == [10, 11, 12]
    assert set(read.items["category"]) == {"unknown"}
    assert read.items["release_ts"].null_count() == 3


def test_sql_source_filters_before_in_postgres_so_later_rows_are_never_read(clean_stores):
    write_events_table(clean_stores.engine, "events_table", _raw())
    before = datetime(2024, 1, 8, tzinfo=UTC)
    # Computing the weight of any row at or after `before` divides by zero, so the read can
    # only succeed if Postgres applies ts < before before it projects rows.
    with clean_stores.engine.begin() as conn:
        conn.execute(
            sa.text(
                "create view events as select user_id, item_id, ts, case when ts < "
                "'2024-01-08 00:00:00+00' then weight else weight / (item_id - item_id) end "
                "as weight from events_table"
            )
        )
    with pytest.raises(psycopg.errors.DivisionByZero, match="division by zero"):
        read_source("sql:events", engine=clean_stores.engine)

    read = read_source("sql:events", before=before, engine=clean_stores.engine)

    assert read.events.height == 2
    assert read.events["ts"].max() < before


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("sql:events; drop table events_items", "unknown options"),
        ("sql:events_items;items=x; drop table events_items", "unknown options"),
        ("sql:events--", "not an identifier"),
        ('sql:"events" ', "not an identifier"),
        ("sql:events;items=events_items;drop table events_items", "unknown options"),
        ("sql:events;items=events_items where 1=1", "not an identifier"),
        ("sql:a.b.c", "not an identifier"),
    ],
)
def test_sql_source_rejects_table_names_that_are_not_identifiers(clean_stores, spec, problem):
    write_events_table(clean_stores.engine, "events", _raw())

    with pytest.raises(RawDataError, match=problem):
        read_source(spec, engine=clean_stores.engine)

    assert sa.inspect(clean_stores.engine).has_table("events_items")


def test_write_events_table_rejects_injected_table_name(clean_stores):
    with pytest.raises(RawDataError, match="not an identifier"):
        write_events_table(clean_stores.engine, "events; drop table x", _raw())


def test_sql_source_quotes_table_names_that_are_reserved_words(clean_stores):
    raw = _raw()
    write_events_table(clean_stores.engine, "order", raw, items_table="select")

    read = read_source("sql:order;items=select", engine=clean_stores.engine)

    assert read.events.equals(raw.events)
    assert read.items.equals(raw.items)


def test_sql_source_needs_a_timestamp_typed_ts_column(clean_stores):
    with clean_stores.engine.begin() as conn:
        conn.execute(sa.text("create table plays (user_id bigint, item_id bigint, ts bigint)"))

    with pytest.raises(RawDataError, match="sql:plays: column ts: type BIGINT is not timestamp"):
        read_source("sql:plays", engine=clean_stores.engine)


def test_sql_source_names_a_missing_table(clean_stores):
    with pytest.raises(RawDataError, match="sql:nowhere: table not found"):
        read_source("sql:nowhere", engine=clean_stores.engine)


def test_sql_source_names_a_missing_column(clean_stores):
    with clean_stores.engine.begin() as conn:
        conn.execute(sa.text("create table plays (user_id bigint, item_id bigint, played_at timestamptz)"))

    with pytest.raises(RawDataError, match=r"missing columns \['ts'\].*played_at"):
        read_source("sql:plays", engine=clean_stores.engine)


def test_postgres_computes_the_same_user_partition_as_polars(clean_stores):
    ids = [0, 1, 2, 3, 41, 65_535, 65_536, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1, -1, -2, -(2**40), -(2**63)]
    values = ", ".join(f"('{i}'::bigint)" for i in ids)
    with clean_stores.engine.connect() as conn:
        for count in (1, 2, 7, 64):
            sql = f"select {partition_sql('user_id', count)} from (values {values}) as t(user_id)"
            in_postgres = [row[0] for row in conn.execute(sa.text(sql))]
            in_polars = pl.DataFrame({"user_id": ids}).select(partition_of("user_id", count)).to_series().to_list()
            assert in_postgres == in_polars


def test_sql_partition_read_filters_in_postgres_so_other_users_rows_are_never_read(clean_stores):
    raw = _raw()
    write_events_table(clean_stores.engine, "events_table", raw)
    # User 3's weight divides by zero: only a query that skips its partition's rows succeeds.
    with clean_stores.engine.begin() as conn:
        conn.execute(
            sa.text(
                "create view events as select user_id, item_id, ts, case when user_id <> 3 "
                "then weight else weight / (item_id - item_id) end as weight from events_table"
            )
        )
    partition_of_3 = pl.DataFrame({"user_id": [3]}).select(partition_of("user_id", 2)).item()
    with pytest.raises(psycopg.errors.DivisionByZero):
        read_source("sql:events", engine=clean_stores.engine, partition=Partition(partition_of_3, 2))

    other = Partition(1 - partition_of_3, 2)
    before = datetime(2024, 2, 1, tzinfo=UTC)
    read = read_source("sql:events", before=before, engine=clean_stores.engine, partition=other)

    expected = raw.events.filter(in_partition("user_id", other))
    assert expected.height > 0
    assert read.events.equals(expected)
