"""Rollback of the publication pointer on real Redis and Postgres: its compare-and-set branches and
`recsys publish rollback` with nothing to roll back to (the rollback racing a publication is in
test_inference_flow.py, `recsys models rollback` in test_registry.py)."""

import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
import redis

from inference import publications, publish
from inference.serving import KeySpace, NoPublicationError
from recsys.settings import Settings
from tests.helpers import publish_recommendations
from tests.reliability.services import dump_postgres, dump_redis

pytestmark = pytest.mark.integration

PREFIX = "recs"
KEYS = KeySpace(PREFIX)
WEEK = date(2026, 1, 5)
ROOT = Path(__file__).resolve().parents[2]


def publish_week(r: redis.Redis, as_of: date, salt: int) -> publish.PublishResult:
    recs = {"user_id": [1, 2], "items": [[salt, salt + 1], [salt + 2, salt + 3]]}
    metadata = {"model_version": f"m:{salt}", "generated_at": "2026-01-05T05:00:00+00:00", "n": 2,
                "fallback_user_count": 0}  # fmt: skip
    return publish_recommendations(r, PREFIX, as_of, pl.DataFrame(recs), [9, 8], metadata)


def pointers(r: redis.Redis) -> tuple[str | None, str | None]:
    return r.get(KEYS.live), r.get(KEYS.previous)


def test_rollback_to_a_previous_version_being_removed_is_refused_and_moves_nothing(clean_stores):
    r = clean_stores.redis
    first, second = publish_week(r, WEEK, 1), publish_week(r, WEEK + timedelta(7), 2)
    r.hset(KEYS.meta(first.version), "status", "removing")  # a cleanup claimed it between our reads
    before = dump_redis(clean_stores.redis_url)

    with pytest.raises(NoPublicationError, match=f"previous version {first.version} is being removed"):
        publish.rollback(r, PREFIX)

    assert pointers(r) == (second.version, first.version)
    assert dump_redis(clean_stores.redis_url) == before


def test_rollback_gives_up_when_the_pointers_keep_changing_under_it(clean_stores, monkeypatch):
    r = clean_stores.redis
    first, second = publish_week(r, WEEK, 1), publish_week(r, WEEK + timedelta(7), 2)
    other = redis.Redis.from_url(clean_stores.redis_url, decode_responses=True)
    read_pointers, reads = publish._read_pointers, []

    def read_then_lose_the_race(client, keys):
        """What the rollback read, after which another writer (a real second client) moves the pointers."""
        seen = read_pointers(client, keys)
        reads.append(seen)
        other.set(KEYS.previous, [first.version, second.version][len(reads) % 2])
        return seen

    monkeypatch.setattr(publish, "_read_pointers", read_then_lose_the_race)

    with pytest.raises(publish.PublishError, match=f"pointers under prefix '{PREFIX}' kept changing; rollback gave up"):
        publish.rollback(r, PREFIX)

    assert len(reads) == publish._CAS_ATTEMPTS
    assert r.get(KEYS.live) == second.version, "a rollback that gave up moved the live pointer"
    other.close()


def run_recsys(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """`recsys ARGS` in a fresh interpreter on the session's stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")} | {
        "RECSYS_DATABASE_URL": settings.database_url.get_secret_value(),
        "RECSYS_REDIS_URL": settings.redis_url.get_secret_value(),
        "RECSYS_DATA_DIR": str(settings.data_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_publish_rollback_with_nothing_to_roll_back_to_is_one_error_line_and_changes_nothing(
    clean_stores, settings: Settings
):
    publications.ensure_schema(clean_stores.engine)
    only = publish_week(clean_stores.redis, WEEK, 1)
    before = dump_redis(clean_stores.redis_url), dump_postgres(clean_stores.engine)

    done = run_recsys(settings, "publish", "rollback", "--reason", "lists look wrong")

    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: NoPublicationError: no previous version to roll back to under prefix '{PREFIX}'"]
    assert done.stderr.rstrip().endswith(errors[0]) and "Traceback" not in done.stderr
    assert (dump_redis(clean_stores.redis_url), dump_postgres(clean_stores.engine)) == before
    assert pointers(clean_stores.redis) == (only.version, None)
