"""Readers looking users up while a publish of 100k users runs: never an empty or mixed answer.

Lookup latency during a publish is a benchmark, not a test: `python -m benchmarks.serving_latency`.
"""

import random
import threading
from dataclasses import dataclass, field
from datetime import date

import polars as pl
import pytest

from inference import serving
from inference.publish import PublishResult
from tests.helpers import publish_recommendations
from tests.reliability.conftest import start_redis

pytestmark = pytest.mark.reliability

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


@dataclass
class Reader:
    """What one reader thread saw: the versions of its complete answers, in order, and what was wrong."""

    seen: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    first_read: threading.Event = field(default_factory=threading.Event)
    saw: dict[str, threading.Event] = field(default_factory=dict)

    def seen_version(self, version: str) -> threading.Event:
        return self.saw.setdefault(version, threading.Event())


def read_users(server, seed: int, batch: int, stop: threading.Event, reader: Reader) -> None:
    """Look up `batch` random users (and an unknown one) at a time; each answer must be one whole publication."""
    r = server.client()
    rng = random.Random(seed)
    for _ in range(MAX_READS):
        if stop.is_set():
            break
        users = rng.sample(range(USERS), batch) + [UNKNOWN_USER]
        try:
            recs = serving.get_recommendations(r, PREFIX, users)
        except Exception as error:  # a reader must never fail: record it for the test
            reader.problems.append(f"lookup failed: {type(error).__name__}: {error}")
            continue
        salts = {rec.model_version for rec in recs}
        versions = {rec.version for rec in recs}
        if len(versions) != 1 or len(salts) != 1:
            reader.problems.append(f"mixed answer: {[(rec.version, rec.model_version) for rec in recs]}")
            continue
        salt = int(salts.pop().removeprefix("salt-"))
        want = [expected_items(u, salt) for u in users[:-1]] + [[salt, salt + 1]]
        if [rec.items for rec in recs] != want or [rec.is_fallback for rec in recs] != [False] * batch + [True]:
            reader.problems.append(f"wrong lists from {recs[0].version}")
            continue
        (version,) = versions
        if not reader.seen or reader.seen[-1] != version:
            reader.seen.append(version)
        reader.seen_version(version).set()
        reader.first_read.set()
    r.close()


def test_readers_during_a_publish_of_100k_users_always_get_one_whole_version(redis_servers, tmp_path):
    server = start_redis(redis_servers, tmp_path, appendonly=False)  # the client path, not fsync
    first = publish(server.client(), date(2025, 2, 24), salt=1)
    stop, readers = threading.Event(), [Reader() for _ in range(READERS)]
    threads = [
        threading.Thread(target=read_users, args=(server, seed, 1 if seed else 50, stop, readers[seed]))
        for seed in range(READERS)
    ]
    for thread in threads:
        thread.start()
    try:
        # Every reader has read the old version before the publish starts ...
        assert all(reader.first_read.wait(timeout=60) for reader in readers), "a reader never got an answer"
        second = publish(server.client(), date(2025, 3, 3), salt=2)
        # ... and keeps reading until it has read the new one: its reads span the whole publish and the swap.
        saw_second = [reader.seen_version(second.version).wait(timeout=60) for reader in readers]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert [problem for reader in readers for problem in reader.problems] == []
    assert all(saw_second), "a reader never saw the new version"
    assert [reader.seen for reader in readers] == [[first.version, second.version]] * READERS
    assert serving.get_recommendations(server.client(), PREFIX, [5])[0].version == second.version
