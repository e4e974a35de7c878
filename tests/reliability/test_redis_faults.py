"""Redis killed while a partition's keys are being written: the count of written users stays exact.

`finish_publication` makes a version live only when `written_users` equals the users the
flow scored. If a crash could leave keys written but not counted, the retried partition
would find them already there, never count them, and the complete namespace would be
refused for good. Each chunk is written and counted in one atomic step, so it cannot.
"""

from datetime import date

import polars as pl
import pytest
import redis

from inference import publish, serving
from tests.reliability.conftest import start_redis
from tests.reliability.services import PrivateRedis

pytestmark = pytest.mark.reliability

PREFIX = "recs"
USERS = 300
METADATA = {"model_version": "ranker:1", "generated_at": "2025-03-03T05:00:00", "n": 2, "fallback_user_count": 0}


def client_killing_server_after(server: PrivateRedis, replies: int) -> redis.Redis:
    """A client whose server is SIGKILLed right after the client has read `replies` replies.

    So the crash lands between two round trips of the writer, wherever they are, whatever
    commands (pipelines, scripts) it uses.
    """
    seen = 0

    class DyingConnection(redis.Connection):
        def read_response(self, *args, **kwargs):
            nonlocal seen
            reply = super().read_response(*args, **kwargs)
            seen += 1
            if seen == replies:
                server.kill()
            return reply

    pool = redis.ConnectionPool(
        connection_class=DyingConnection, host="127.0.0.1", port=server.port, decode_responses=True
    )
    return redis.Redis(connection_pool=pool)


def user_keys(r: redis.Redis, version: str) -> int:
    return sum(1 for _ in r.scan_iter(serving.KeySpace(PREFIX).user(version, "*"), count=1000))


@pytest.mark.parametrize("replies", range(2, 12))
def test_redis_killed_between_any_two_round_trips_leaves_no_key_uncounted_and_the_retry_completes(
    redis_servers, tmp_path, replies
):
    server = start_redis(redis_servers, tmp_path)  # AOF, fsync always: what was acknowledged survives
    recs = pl.DataFrame({"user_id": range(USERS)}).with_columns(items=pl.concat_list(pl.col("user_id"), pl.lit(7)))
    version = publish.begin_publication(server.client(), PREFIX, date(2025, 3, 3))

    with pytest.raises(publish.PublishError, match=f"publishing version {version}: writing user keys failed after"):
        publish.write_recommendations(client_killing_server_after(server, replies), PREFIX, version, recs, chunk=10)
    server.start()
    r = server.client()
    written = int(r.hget(serving.KeySpace(PREFIX).meta(version), "written_users") or 0)
    assert written == user_keys(r, version), f"killed after reply {replies}: user keys written but not counted"

    # The task retry writes the whole partition again, and the version goes live.
    assert publish.write_recommendations(r, PREFIX, version, recs, chunk=100) == USERS
    publish.write_fallback(r, PREFIX, version, [1, 2])
    result = publish.finish_publication(r, PREFIX, version, expected_users=USERS, metadata=METADATA)
    assert result.version == r.get(serving.KeySpace(PREFIX).live) == version
    assert serving.get_recommendations(r, PREFIX, [42])[0].items == [42, 7]
