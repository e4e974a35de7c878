"""The publish steps that hold the Postgres lock or keep the lineage rows: start, approve, rollback, abandon.

Written to kill mutmut's survivors in `inference/publish.py` (issue #17); they run in the
mutation run too (see benchmarks/README.md, "Mutation score"). Each module gets a private
database in the session's Postgres and a private embedded Redis, so two mutants' sessions
can share one Postgres server.
"""

import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from features import contracts, store
from features.validation import ValidationReport
from inference import publications, publish
from inference.checks import CheckBounds
from inference.publish import ApprovalRefused, PublicationHeld, StalePublication
from inference.serving import KeySpace, NoPublicationError
from recsys.stores import Stores
from tests.helpers import user_lists

pytestmark = pytest.mark.integration

PREFIX = "recs"
KEYS = KeySpace(PREFIX)
WEEK = date(2026, 1, 5)
LATER = WEEK + timedelta(weeks=1)
META = {"model_version": "m:1", "generated_at": "2026-01-05T02:00:00+00:00", "n": 2, "fallback_user_count": 0}


@pytest.fixture(scope="module")
def private_database(stores: Stores) -> Iterator[sa.Engine]:
    """A database of this module alone in the session's Postgres."""
    name = f"mut_publish_{os.getpid()}"
    admin = stores.engine.execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"drop database if exists {name}"))
        conn.execute(sa.text(f"create database {name}"))
    engine = sa.create_engine(stores.engine.url.set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"drop database if exists {name} with (force)"))


@pytest.fixture
def engine(private_database: sa.Engine) -> sa.Engine:
    with private_database.begin() as conn:
        conn.execute(sa.text("drop table if exists publications, publication_history"))
    publications.ensure_schema(private_database)
    return private_database


@pytest.fixture
def r(private_redis: redis.Redis) -> redis.Redis:
    return private_redis


def started(engine, r, as_of: date, users: int = 4, salt: int = 0, keep: int = 2) -> str:
    """A version begun with start_publication, its lineage row `writing`, keys and fallback written."""
    version = publish.start_publication(engine, r, PREFIX, as_of, keep=keep)
    publications.record_publication(engine, version=version, as_of=as_of, status="writing")
    publish.write_recommendations(r, PREFIX, version, user_lists(users, salt))
    publish.write_fallback(r, PREFIX, version, [9, 8])
    return version


def go_live(engine, r, as_of: date, users: int = 4, salt: int = 0, keep: int = 2) -> str:
    version = started(engine, r, as_of, users, salt, keep)
    publish.finish_publication(r, PREFIX, version, expected_users=users, metadata=META, keep=keep)
    publications.record_publication(engine, version=version, status="live")
    return version


def held(engine, r, as_of: date, users: int = 4, keep: int = 2) -> str:
    """A version whose lists are out of bounds (every item unknown), recorded `held`."""
    version = started(engine, r, as_of, users, salt=7, keep=keep)
    with pytest.raises(PublicationHeld) as raised:
        publish.finish_publication(
            r, PREFIX, version, expected_users=users, metadata=META, bounds=CheckBounds(), catalogue=pl.Series([1])
        )
    publish.abandon_publication(engine, r, PREFIX, version, raised.value, keep=keep)
    return version


def rows(engine) -> dict[str, dict]:
    return {row["version"]: row for row in publications.list_publications(engine).to_dicts()}


def moves(engine) -> list[tuple]:
    history = publications.pointer_history(engine, PREFIX)
    return list(history.select("action", "from_version", "to_version", "reason", "actor").iter_rows())


# --- start -----------------------------------------------------------------------------------


def test_start_removes_what_a_killed_run_left_and_marks_it_abandoned(engine, r):
    live = go_live(engine, r, WEEK)
    killed = started(engine, r, LATER)

    version = publish.start_publication(engine, r, PREFIX, LATER)

    assert version not in (live, killed) and r.hget(KEYS.meta(version), "status") == "writing"
    assert r.hget(KEYS.meta(killed), "status") is None and r.get(KEYS.user(killed, 0)) is None
    assert rows(engine)[killed]["status"] == "abandoned" and rows(engine)[live]["status"] == "live"


def test_start_refuses_an_older_week_before_writing_anything(engine, r):
    go_live(engine, r, LATER)
    keys_before = set(r.scan_iter("*"))
    with pytest.raises(StalePublication, match=f"as_of {WEEK} is older than the live version"):
        publish.start_publication(engine, r, PREFIX, WEEK)
    assert set(r.scan_iter("*")) == keys_before


def test_start_keeps_as_many_versions_as_asked(engine, r):
    versions = [go_live(engine, r, WEEK + timedelta(weeks=i), keep=3) for i in range(3)]
    publish.start_publication(engine, r, PREFIX, WEEK + timedelta(weeks=3), keep=3)
    assert r.hget(KEYS.meta(versions[0]), "status") == "retired"
    publish.start_publication(engine, r, PREFIX, WEEK + timedelta(weeks=3))
    assert r.hget(KEYS.meta(versions[0]), "status") is None


# --- approve ---------------------------------------------------------------------------------


def test_approving_a_held_version_makes_it_live_and_records_the_move(engine, r, caplog):
    live = go_live(engine, r, WEEK)
    version = held(engine, r, LATER, users=3)
    assert rows(engine)[version]["status"] == "held"

    with caplog.at_level(logging.INFO, logger="inference.publish"):
        result = publish.approve_publication(engine, r, PREFIX, version, reason="checked by hand", actor="cli:ada")

    assert caplog.records[-1].getMessage() == f"approved held version {version} under prefix recs (previous {live})"

    assert result == publish.PublishResult(version=version, as_of=LATER, previous=live, user_count=3, removed=())
    assert (r.get(KEYS.live), r.get(KEYS.previous)) == (version, live)
    assert r.hget(KEYS.meta(version), "status") == "live"
    row = rows(engine)[version]
    assert row["status"] == "live" and row["finished_at"] is not None
    assert moves(engine) == [("approve", live, version, "checked by hand", "cli:ada")]


def test_approving_removes_versions_beyond_keep_and_marks_unfinished_ones_abandoned(engine, r):
    first = go_live(engine, r, WEEK, keep=3)
    second = go_live(engine, r, LATER, keep=3)
    version = held(engine, r, LATER + timedelta(weeks=1), keep=3)
    killed = started(engine, r, LATER + timedelta(weeks=1), keep=3)  # a run killed while writing

    result = publish.approve_publication(engine, r, PREFIX, version, reason="ok", actor="t", keep=3)

    assert result.removed == (killed,) and result.previous == second
    assert r.hget(KEYS.meta(first), "status") == "retired"
    assert rows(engine)[killed]["status"] == "abandoned"
    assert "the run stopped before finishing" in rows(engine)[killed]["error"]
    newer = held(engine, r, LATER + timedelta(weeks=2), keep=3)
    result = publish.approve_publication(engine, r, PREFIX, newer, reason="ok", actor="t")
    assert result.removed == (first, second) and r.hget(KEYS.meta(first), "status") is None


def test_an_approval_records_when_it_finished_in_utc_whatever_the_local_zone(engine, r, monkeypatch):
    version = held(engine, r, WEEK)
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+5:30: a local clock read as UTC is hours off
    time.tzset()
    try:
        publish.approve_publication(engine, r, PREFIX, version, reason="ok", actor="t")
    finally:
        monkeypatch.undo()
        time.tzset()
    finished = rows(engine)[version]["finished_at"]
    assert rows(engine)[version]["status"] == "live"
    assert abs(datetime.now(UTC) - finished) < timedelta(minutes=10)


def test_approving_what_is_not_held_changes_nothing(engine, r):
    live = go_live(engine, r, WEEK)
    unknown = (
        r"^no publication 20260105-000099 under prefix 'recs' \(unknown, or removed once a newer one went live\): "
        r"`recsys publish list` shows the held ones$"
    )
    with pytest.raises(ApprovalRefused, match=unknown):
        publish.approve_publication(engine, r, PREFIX, "20260105-000099", reason="ok", actor="t")
    with pytest.raises(ApprovalRefused, match=f"publication {live} is live, not held"):
        publish.approve_publication(engine, r, PREFIX, live, reason="ok", actor="t")
    assert r.get(KEYS.live) == live and moves(engine) == []


def test_approving_a_held_version_older_than_live_is_refused(engine, r):
    live = go_live(engine, r, WEEK)
    # A version held while an earlier publish of the same week went live (a race the lock orders).
    old = "20260105-000000"
    r.hset(KEYS.meta(old), mapping={"version": old, "as_of": "2026-01-05", "status": "held"})
    with pytest.raises(ApprovalRefused, match=f"held publication {old} is older than the live {live}"):
        publish.approve_publication(engine, r, PREFIX, old, reason="ok", actor="t")
    assert r.get(KEYS.live) == live and r.hget(KEYS.meta(old), "status") == "held"


def test_approving_orders_versions_by_week_then_sequence_number(engine, r):
    # A later week with a lower sequence number is newer: 20260112-000001 after 20260105-000002.
    r.set(KEYS.seq, 0)
    version = held(engine, r, LATER)
    r.set(KEYS.seq, 1)
    live = go_live(engine, r, WEEK)
    assert version < live.replace("20260105", "20260112") and version.endswith("000001")
    result = publish.approve_publication(engine, r, PREFIX, version, reason="ok", actor="t")
    assert result.previous == live and r.get(KEYS.live) == version


def test_an_approval_that_loses_the_swap_fails_as_stale(engine, r, monkeypatch):
    live = go_live(engine, r, WEEK)
    version = held(engine, r, LATER)
    real_swap = publish._swap_pointer

    def removed_meanwhile(client, keys, name, status):
        client.hset(keys.meta(name), "status", "removing")
        return real_swap(client, keys, name, status)

    monkeypatch.setattr(publish, "_swap_pointer", removed_meanwhile)
    with pytest.raises(StalePublication, match=f"version {version} could not be made live \\(gone\\)"):
        publish.approve_publication(engine, r, PREFIX, version, reason="ok", actor="t")
    assert r.get(KEYS.live) == live and moves(engine) == []


# --- rollback --------------------------------------------------------------------------------


def test_rollback_records_who_moved_the_pointer_from_where_to_where(engine, r):
    first, second = go_live(engine, r, WEEK), go_live(engine, r, LATER)

    assert publish.rollback_publication(engine, r, PREFIX, reason="lists look wrong", actor="cli:ada") == first

    assert (r.get(KEYS.live), r.get(KEYS.previous)) == (first, second)
    assert moves(engine) == [("rollback", second, first, "lists look wrong", "cli:ada")]


def test_rollback_with_nothing_to_go_back_to_records_nothing(engine, r):
    go_live(engine, r, WEEK)
    with pytest.raises(NoPublicationError, match="no previous version"):
        publish.rollback_publication(engine, r, PREFIX, reason="why", actor="t")
    assert moves(engine) == []


# --- abandon ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [(publish.PublishError("redis went away"), "failed"), (StalePublication("a newer one won"), "stale")],
)
def test_an_abandoned_publication_records_why_and_its_keys_go(engine, r, error, status):
    live = go_live(engine, r, WEEK)
    version = started(engine, r, LATER)

    publish.abandon_publication(engine, r, PREFIX, version, error)

    row = rows(engine)[version]
    assert (row["status"], row["error"], row["checks"]) == (status, str(error), None)
    assert row["finished_at"] is not None
    assert r.hget(KEYS.meta(version), "status") is None and r.get(KEYS.user(version, 0)) is None
    assert r.get(KEYS.live) == live


def test_a_held_publication_records_its_checks_and_keeps_its_keys(engine, r):
    version = held(engine, r, WEEK)
    row = rows(engine)[version]
    assert row["status"] == "held" and row["error"].startswith(f"publication {version} held")
    assert '"unknown_items": 5' in row["checks"] and "max_unknown_items" in row["checks"]
    assert r.hget(KEYS.meta(version), "status") == "held" and r.get(KEYS.user(version, 0)) is not None


def test_a_long_error_is_cut_to_2000_characters(engine, r):
    version = started(engine, r, WEEK)
    publish.abandon_publication(engine, r, PREFIX, version, RuntimeError("x" * 5000))
    assert rows(engine)[version]["error"] == "x" * 2000


def test_abandoning_keeps_as_many_versions_as_asked(engine, r):
    versions = [go_live(engine, r, WEEK + timedelta(weeks=i), keep=3) for i in range(3)]
    version = started(engine, r, WEEK + timedelta(weeks=3), keep=3)
    publish.abandon_publication(engine, r, PREFIX, version, RuntimeError("x"), keep=3)
    assert r.hget(KEYS.meta(versions[0]), "status") == "retired"
    publish.abandon_publication(engine, r, PREFIX, version, RuntimeError("x"))
    assert r.hget(KEYS.meta(versions[0]), "status") is None


def test_a_store_failing_while_abandoning_is_only_logged(engine, r, caplog):
    version = started(engine, r, WEEK)
    gone = redis.Redis(
        unix_socket_path="/nonexistent/redis.sock", decode_responses=True, retry=Retry(NoBackoff(), retries=0)
    )
    with caplog.at_level(logging.WARNING, logger="inference.publish"):
        publish.abandon_publication(engine, gone, PREFIX, version, RuntimeError("first"))
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert re.fullmatch(f"could not record or clean up failed publication {version}: .+", warning)
    assert rows(engine)[version]["status"] == "failed"  # recorded before the cleanup failed
    assert datetime.now(UTC) - rows(engine)[version]["finished_at"] < timedelta(hours=1)


# --- the catalogue the checks use ------------------------------------------------------------


def test_the_catalogue_is_the_item_ids_of_the_named_snapshot_only(engine):
    store.ensure_schema(engine)
    item_features = contracts.ITEM_FEATURES
    for as_of, items in ((WEEK, [3, 1, 2]), (LATER, [1, 7])):
        defaults = {
            c.name: ["x"] * len(items) if c.dtype == pl.Utf8 else [0] * len(items) for c in item_features.columns
        }
        frame = item_features.conform(pl.DataFrame(defaults | {"as_of": [as_of] * len(items), "item_id": items}))
        report = ValidationReport(item_features.name, as_of, True, frame.height)
        store.write_snapshot(engine, as_of, {item_features.name: frame}, {item_features.name: report}, flow_run_id=None)

    assert publish.read_catalogue(engine, WEEK).sort().to_list() == [1, 2, 3]
    assert publish.read_catalogue(engine, LATER).sort().to_list() == [1, 7]
