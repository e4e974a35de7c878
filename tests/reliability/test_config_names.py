"""Names that come from configuration never reach SQL or Redis patterns unchecked."""

from datetime import UTC, datetime

import polars as pl
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from features import store
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData, RawDataError
from features.sources import read_source
from inference import serving
from recsys.settings import Settings
from tests.helpers import write_events_table

pytestmark = pytest.mark.reliability

INJECTIONS = [
    "recs:*",
    "recs}{other",
    "recs\r\nFLUSHALL",
    "recs ",
    "",
    "x'; drop table model_versions; --",
    'x"; drop table model_versions; --',
]


@pytest.mark.parametrize("variable", ["RECSYS_REDIS_PREFIX", "RECSYS_MODEL_NAME"])
@pytest.mark.parametrize("value", INJECTIONS)
def test_settings_refuse_prefix_and_model_names_that_are_not_plain_names(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ValidationError, match=variable.removeprefix("RECSYS_").lower()):
        Settings()


@pytest.mark.parametrize("prefix", ["recs:*", "recs}{x", "*"])
def test_serving_refuses_a_bad_prefix_even_without_settings(clean_stores, prefix):
    with pytest.raises(ValueError, match="Redis prefix .* is invalid"):
        serving.get_recommendations(clean_stores.redis, prefix, [1])
    with pytest.raises(ValueError, match="not a publication version"):
        serving.KeySpace("recs").namespace_pattern("2025*")


def test_feature_store_accepts_only_contract_table_names(clean_stores):
    store.ensure_schema(clean_stores.engine)

    with pytest.raises(ValueError, match="unknown feature table"):
        store.read_table(clean_stores.engine, 'user_features"; drop table "labels"; --', datetime(2025, 3, 3).date())

    assert sa.inspect(clean_stores.engine).has_table("labels")


def tiny_log() -> RawData:
    ts = datetime(2025, 1, 6, tzinfo=UTC)
    events = pl.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 11], "ts": [ts, ts], "weight": [1.0, 2.0]}, schema=RAW_EVENTS_SCHEMA
    )
    items = pl.DataFrame(
        {"item_id": [10, 11], "category": ["a", "b"], "creator": ["x", "y"], "release_ts": [None, None]},
        schema=RAW_ITEMS_SCHEMA,
    )
    return RawData(events=events, items=items)


@pytest.mark.parametrize("table", ["Events", "select", "public.order"])
def test_sql_source_quotes_table_names_that_need_it(clean_stores, table):
    """Mixed case and reserved words only work when quoted; unquoted they would fail or fold."""
    write_events_table(clean_stores.engine, table, tiny_log())

    raw = read_source(f"sql:{table};items={table}_items", engine=clean_stores.engine)

    assert raw.events.select("user_id", "item_id").rows() == [(1, 10), (2, 11)]
    assert raw.items["category"].to_list() == ["a", "b"]


@pytest.mark.parametrize(
    "spec",
    [
        "sql:events; drop table sentinel",
        'sql:"events"',
        "sql:events--",
        "sql:events;items=events_items; drop table sentinel",
        "sql:a.b.c",
    ],
)
def test_sql_source_refuses_table_names_that_are_not_identifiers(clean_stores, spec):
    write_events_table(clean_stores.engine, "events", tiny_log())
    with clean_stores.engine.begin() as conn:
        conn.execute(sa.text("create table sentinel (id int)"))

    with pytest.raises(RawDataError, match=r"table name is not an identifier|unknown options"):
        read_source(spec, engine=clean_stores.engine)

    assert sa.inspect(clean_stores.engine).has_table("sentinel")
