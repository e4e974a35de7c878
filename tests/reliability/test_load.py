"""Readers looking users up while a publish of 100k users runs: never an empty or mixed answer."""

import logging
import random
import threading
import time
from datetime import date

import polars as pl
import pytest

from inference import serving
from inference.publish import PublishResult
from tests.helpers import publish_recommendations
from tests.reliability.conftest import start_redis

pytestmark = pytest.mark.reliability

log = logging.getLogger(__name__)

PREFIX = "recs"
USERS = 100_000
TOP_N = 10
UNKNOWN_USER = 10**9
READERS = 4
MAX_READS = 200_000  # per reader: a bound if a publish hangs


def expected_items(user_id: int, salt: int) -> list[int]:
    return [(user_id * 31 + salt * 7 + j * 13) % 5_000 for j in range(TOP_N)]


def build_recs(salt: int) -> pl.DataFrame:
    user = pl.col("user_id")
    return pl.DataFrame({"user_id": range(USERS)}, schema={"user_id": pl.Int64}).with_columns(
        items=pl.concat_list([(user * 31 + salt * 7 + j * 13) % 5_000 for j in range(TOP_N)])
    )


def publish(r, as_of: date, salt: int) -> PublishResult:
    metadata = {"model_version": f"salt-{salt}", "generated_at": "2025-03-03T05:00:00+00:00", "n": TOP_N,
                "fallback_user_count": 0}  # fmt: skip
    return publish_recommendations(r, PREFIX, as_of, build_recs(salt), [salt, salt + 1], metadata)


def read_users(server, seed: int, batch: int, stop: threading.Event, latencies: list[float], problems: list[str]):
    """Look up `batch` random users (and an unknown one) at a time; each answer must be one whole publication."""
    r = server.client()
    rng = random.Random(seed)
    for _ in range(MAX_READS):
        if stop.is_set():
            break
        users = rng.sample(range(USERS), batch) + [UNKNOWN_USER]
        started = time.perf_counter()
        try:
            recs = serving.get_recommendations(r, PREFIX, users)
        except Exception as error:  # a reader must never fail: record it for the test
            problems.append(f"lookup failed: {type(error).__name__}: {error}")
            continue
        latencies.append(time.perf_counter() - started)
        salts = {rec.model_version for rec in recs}
        if len({rec.version for rec in recs}) != 1 or len(salts) != 1:
            problems.append(f"mixed answer: {[(rec.version, rec.model_version) for rec in recs]}")
            continue
        salt = int(salts.pop().removeprefix("salt-"))
        want = [expected_items(u, salt) for u in users[:-1]] + [[salt, salt + 1]]
        if [rec.items for rec in recs] != want or [rec.is_fallback for rec in recs] != [False] * batch + [True]:
            problems.append(f"wrong lists from {recs[0].version}")
    r.close()


def test_readers_during_a_publish_of_100k_users_get_complete_answers_and_p99_is_reported(
    redis_servers, tmp_path, record_property
):
    server = start_redis(redis_servers, tmp_path, appendonly=False)  # the client path, not fsync
    first = publish(server.client(), date(2025, 2, 24), salt=1)
    stop, problems = threading.Event(), []
    latencies: list[list[float]] = [[] for _ in range(READERS)]
    readers = [
        threading.Thread(target=read_users, args=(server, seed, 1 if seed else 50, stop, latencies[seed], problems))
        for seed in range(READERS)
    ]
    for reader in readers:
        reader.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        second = publish(server.client(), date(2025, 3, 3), salt=2)
        publish_s = time.perf_counter() - started
        time.sleep(0.2)
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=60)

    assert problems == []
    assert serving.get_recommendations(server.client(), PREFIX, [5])[0].version == second.version != first.version
    single = sorted(t for per_reader in latencies[1:] for t in per_reader)
    assert len(single) > 100, "too few lookups overlapped the publish to say anything"
    p50, p99 = single[len(single) // 2], single[int(len(single) * 0.99)]
    record_property("publish_100k_s", round(publish_s, 2))
    record_property("lookup_p50_ms", round(p50 * 1000, 2))
    record_property("lookup_p99_ms", round(p99 * 1000, 2))
    log.warning(
        "publish of %d users took %.2fs; %d single-user lookups meanwhile: p50 %.2f ms, p99 %.2f ms",
        USERS, publish_s, len(single), p50 * 1000, p99 * 1000,
    )  # fmt: skip
    # Generous: a lookup is two round trips; only a publish that blocks readers gets near this.
    assert p99 < 0.5
