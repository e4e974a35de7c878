"""Publish synthetic recommendations in partitions, printing each step (for kill tests).

Usage: python publish_worker.py REDIS_URL PREFIX AS_OF USERS SALT PARTITIONS
Prints `ready` and waits for a line on stdin (so tests can start it early), then prints
`begun <version>`, `wrote <partition>`, `writing done`, `finished <version>`.
"""

import sys
from datetime import date

import polars as pl
import redis

from inference.publish import (
    begin_publication,
    cleanup_stale_versions,
    finish_publication,
    write_fallback,
    write_recommendations,
)


def expected_items(user_id: int, salt: int) -> list[int]:
    """The list user `user_id` gets from the publication made with `salt`."""
    return [(user_id * 31 + salt * 7 + j * 13) % 5_000 for j in range(5)]


def fallback_items(salt: int) -> list[int]:
    return [salt, salt + 1, salt + 2]


def build_recs(users: int, salt: int) -> pl.DataFrame:
    """Every user's `expected_items`, built column-wise."""
    user = pl.col("user_id")
    return pl.DataFrame({"user_id": range(users)}, schema={"user_id": pl.Int64}).with_columns(
        items=pl.concat_list([(user * 31 + salt * 7 + j * 13) % 5_000 for j in range(5)])
    )


def metadata(salt: int) -> dict[str, object]:
    return {
        "model_version": f"salt-{salt}",
        "generated_at": "2026-01-05T02:00:00+00:00",
        "n": 5,
        "fallback_user_count": 0,
    }


def main(argv: list[str]) -> None:
    url, prefix, as_of, users, salt, partitions = argv
    users, salt = int(users), int(salt)
    r = redis.Redis.from_url(url, decode_responses=True)
    recs = build_recs(users, salt)
    r.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    cleanup_stale_versions(r, prefix)
    version = begin_publication(r, prefix, date.fromisoformat(as_of))
    print(f"begun {version}", flush=True)
    for number, part in enumerate(recs.iter_slices(-(-users // int(partitions)))):
        write_recommendations(r, prefix, version, part, chunk=500)
        print(f"wrote {number}", flush=True)
    write_fallback(r, prefix, version, fallback_items(salt))
    print("writing done", flush=True)
    finish_publication(r, prefix, version, expected_users=users, metadata=metadata(salt))
    print(f"finished {version}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
