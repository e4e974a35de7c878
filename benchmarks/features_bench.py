"""Feature-pipeline benchmark: compute, validate and write one weekly snapshot of a large log.

    python -m benchmarks.features_bench --events 10000000

Draws a synthetic log (`features.synthetic.generate_log`; default 10M events, one user per
50 events, one item per 200, 26 weeks) and, for its last complete week, times each step of
the feature flow with the flow's own functions:

- compute: `transform.build_week_tables` (features + labels; events/s, CPU s);
- validation: `validation.validate_tables` on those tables, and the same suites the way
  they ran before (a GX context, data source and validation definition per table, SUMMARY
  results) for comparison, also on a small 20k-event snapshot where GX's fixed cost per
  expectation dominates;
- write: `store.write_week` (each table's rows COPYed into a new table, its primary
  key built, then swapped in as the as_of partition of the live table; features and labels
  in one transaction, with digests and bookkeeping), first for a new as_of and again as a
  re-run replacing the same partitions; the reference is a plain `COPY ... FROM STDIN` of
  the same rows, encoded the same way (CSV from polars, 100k-row chunks), into fresh tables
  with the same columns and primary key (`create table ... (like ... including all)`), in
  the same run on the same server.

Uses RECSYS_DATABASE_URL when set (inside its own schema `bench_features`, dropped at the
end), else an embedded pgserver in a temporary folder. Prints a markdown table and writes
JSON to benchmarks/results/ (git-ignored).
"""

import argparse
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import polars as pl
import sqlalchemy as sa

from benchmarks import cpu_model, save_result
from benchmarks.reference import ReferenceRun, reference_line
from features import contracts, store, transform, validation
from features.raw import RawData
from features.synthetic import generate_log
from flows.configs import feature_options, validation_options
from recsys.settings import Settings
from recsys.stores import open_stores, sqlalchemy_url

log = logging.getLogger("benchmarks.features_bench")

AS_OF = date(2024, 3, 4)
SCHEMA = "bench_features"
COPY_CHUNK_ROWS = 100_000


class LegacyRunner:
    """How suites ran before: a fresh GX context, data source and validation definition per table, SUMMARY."""

    def run(self, suite: Any, frame: pl.DataFrame) -> list[dict[str, Any]]:
        gx = validation._import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch = (
            context.data_sources.add_pandas(suite.name)
            .add_dataframe_asset(suite.name)
            .add_batch_definition_whole_dataframe(suite.name)
        )
        definition = gx.ValidationDefinition(name=suite.name, data=batch, suite=context.suites.add(suite))
        result = definition.run(batch_parameters={"dataframe": frame.to_pandas()}, result_format="SUMMARY")
        return [validation._failure_from_result(r) for r in result.results if not r.success]


def compute_snapshot(raw: RawData, settings: Settings) -> dict[str, pl.DataFrame]:
    """The flow's compute step: features as of AS_OF and the labels of the week before."""
    return transform.build_week_tables(raw.events, raw.items, AS_OF, **feature_options(settings))


def validate(
    frames: dict[str, pl.DataFrame], runner: Any | None, settings: Settings
) -> dict[str, validation.ValidationReport]:
    """The flow's validation step (runner None) or the same checks with another suite runner."""
    as_ofs = {name: transform.assign_as_of(name, AS_OF) for name in frames}
    options = validation_options(settings)
    if runner is None:
        return validation.validate_tables(frames, as_ofs=as_ofs, previous={}, **options)
    return {
        name: validation.validate_table(
            contracts.CONTRACTS[name], frame, as_of=as_ofs[name], previous=None, runner=runner, **options
        )
        for name, frame in frames.items()
    }


def timed(step: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure_validation(
    frames: dict[str, pl.DataFrame], settings: Settings, legacy: bool, repeats: int = 1
) -> dict[str, Any]:
    """Seconds to validate `frames` the flow's way (and the old way): the best of `repeats` runs."""
    suites = [validation.build_expectation_suite(contracts.CONTRACTS[n]) for n in frames]
    expectations = sum(len(suite.expectations) for suite in suites)
    validation._import_gx()  # seconds, once per process: not part of either way's cost
    runs = [timed(lambda: validate(frames, None, settings)) for _ in range(repeats)]
    reports, now_s = runs[0][0], min(seconds for _, seconds, _ in runs)
    failed = [r.describe_failures() for r in reports.values() if not r.success]
    if failed:
        raise RuntimeError(f"benchmark snapshot failed validation: {failed}")
    result = {"rows": sum(f.height for f in frames.values()), "expectations": expectations, "seconds": now_s}
    if legacy:
        before_s = min(timed(lambda: validate(frames, LegacyRunner(), settings))[1] for _ in range(repeats))
        result["legacy_seconds"] = before_s
    return result | {"reports": reports}


def write_snapshot(engine: sa.Engine, frames: dict[str, pl.DataFrame], reports: dict) -> float:
    """Seconds the flow's write step takes for the snapshot."""
    _, seconds, _ = timed(lambda: store.write_week(engine, frames, reports, flow_run_id="features-bench"))
    return seconds


def copy_plainly(engine: sa.Engine, frames: dict[str, pl.DataFrame]) -> float:
    """The reference: plain COPY of the same rows into fresh tables with the same DDL, one transaction."""
    with engine.begin() as conn:
        for name in frames:
            conn.execute(sa.text(f'drop table if exists "plain_{name}"'))
            conn.execute(sa.text(f'create table "plain_{name}" (like "{name}" including all)'))
    started = time.perf_counter()
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        for name, frame in frames.items():
            columns = ", ".join(f'"{c}"' for c in frame.columns)
            with cursor.copy(f'copy "plain_{name}" ({columns}) from stdin (format csv, header)') as copy:
                for offset in range(0, frame.height, COPY_CHUNK_ROWS):
                    copy.write(frame.slice(offset, COPY_CHUNK_ROWS).write_csv(include_header=offset == 0))
    return time.perf_counter() - started


def count_rows(engine: sa.Engine, frames: dict[str, pl.DataFrame], prefix: str = "") -> int:
    with engine.connect() as conn:
        return sum(conn.execute(sa.text(f'select count(*) from "{prefix}{name}"')).scalar_one() for name in frames)


@contextmanager
def bench_engine(data_dir: Path) -> Iterator[tuple[sa.Engine, str]]:
    """An engine on the configured Postgres (in a schema of its own) or an embedded one; and its server version."""
    settings = Settings(data_dir=data_dir)
    with open_stores(settings) as stores:
        url = stores.database_url
        if settings.database_url is not None:
            with stores.engine.begin() as conn:
                conn.execute(sa.text(f"drop schema if exists {SCHEMA} cascade; create schema {SCHEMA}"))
            url = f"{url}{'&' if '?' in url else '?'}options={quote(f'-csearch_path={SCHEMA}')}"
        engine = sa.create_engine(sqlalchemy_url(url))
        try:
            with engine.connect() as conn:
                version = conn.execute(sa.text("show server_version")).scalar_one()
            yield engine, version
        finally:
            engine.dispose()
            if settings.database_url is not None:
                with stores.engine.begin() as conn:
                    conn.execute(sa.text(f"drop schema if exists {SCHEMA} cascade"))
    if settings.database_url is None:
        import pgserver

        # The embedded server outlives open_stores (it stops at exit); stop it before its folder goes.
        pgserver.get_server((data_dir / "postgres").resolve()).cleanup()


def measure(args: argparse.Namespace, workdir: Path, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    raw, generate_s, _ = timed(
        lambda: generate_log(
            n_users=args.users,
            n_items=args.items,
            n_events=args.events,
            n_weeks=args.weeks,
            end=transform.week_start(AS_OF),
            seed=args.seed,
        )
    )
    log.info("generated %d events in %.1fs", raw.events.height, generate_s)
    frames, compute_s, compute_cpu_s = timed(lambda: compute_snapshot(raw, settings))
    rows = {name: frame.height for name, frame in frames.items()}
    log.info("computed %s in %.1fs", rows, compute_s)

    small = generate_log(
        n_users=300, n_items=200, n_events=20_000, n_weeks=10, end=transform.week_start(AS_OF), seed=args.seed
    )
    small_validation = measure_validation(compute_snapshot(small, settings), settings, legacy=True, repeats=3)
    log.info(
        "validated the small snapshot in %.1fs (before: %.1fs)",
        small_validation["seconds"],
        small_validation["legacy_seconds"],
    )
    big_validation = measure_validation(frames, settings, legacy=not args.no_legacy)
    log.info("validated the snapshot in %.1fs", big_validation["seconds"])

    with bench_engine(workdir) as (engine, server_version):
        store.ensure_schema(engine)
        reports = big_validation["reports"]
        first_s = write_snapshot(engine, frames, reports)
        rewrite_s = write_snapshot(engine, frames, reports)
        written = count_rows(engine, frames)
        plain_s = copy_plainly(engine, frames)
        plain_rows = count_rows(engine, frames, prefix="plain_")
    total_rows = sum(rows.values())
    if written != total_rows or plain_rows != total_rows:
        raise RuntimeError(f"row counts differ: frames {total_rows}, flow write {written}, plain COPY {plain_rows}")
    return {
        "machine": machine() | {"postgres": server_version},
        "sizes": {"events": raw.events.height, "users": args.users, "items": args.items, "weeks": args.weeks},
        "rows": rows,
        "generate_s": generate_s,
        "compute": {"seconds": compute_s, "cpu_seconds": compute_cpu_s, "events_per_s": raw.events.height / compute_s},
        "validation": {
            "snapshot": {k: v for k, v in big_validation.items() if k != "reports"},
            "small_snapshot": {k: v for k, v in small_validation.items() if k != "reports"},
        },
        "write": {
            "rows": total_rows,
            "flow_first_s": first_s,
            "flow_rewrite_s": rewrite_s,
            "plain_copy_s": plain_s,
            "flow_rows_per_s": total_rows / first_s,
            "flow_rewrite_rows_per_s": total_rows / rewrite_s,
            "plain_copy_rows_per_s": total_rows / plain_s,
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": time.perf_counter() - started,
    }


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "polars": pl.__version__,
        "system": platform.platform(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def format_table(result: dict[str, Any]) -> str:
    compute, write = result["compute"], result["write"]
    big, small = result["validation"]["snapshot"], result["validation"]["small_snapshot"]
    m = result["machine"]
    lines = [
        f"Feature snapshot of {result['sizes']['events']:,} events ({result['sizes']['users']:,} users, "
        f"{result['sizes']['items']:,} items, {result['sizes']['weeks']} weeks): {write['rows']:,} rows in 7 tables",
        f"on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, PostgreSQL {m['postgres']}, "
        f"load average at the end {m['load_average_1_5_15']}",
        "",
        "| step | time | rate |",
        "|---|---|---|",
        f"| compute (features + labels) | {compute['seconds']:.1f} s ({compute['cpu_seconds']:.1f} CPU s) "
        f"| {compute['events_per_s']:,.0f} events/s |",
        f"| validation, {big['expectations']} expectations | {big['seconds']:.1f} s"
        + (f" (before: {big['legacy_seconds']:.1f} s)" if "legacy_seconds" in big else "")
        + f" | {big['rows'] / big['seconds']:,.0f} rows/s |",
        f"| validation of a 20k-event snapshot, {small['expectations']} expectations (best of 3) "
        f"| {small['seconds']:.2f} s "
        f"(before: {small['legacy_seconds']:.2f} s) | {small['seconds'] / small['expectations'] * 1000:.0f} ms "
        f"per expectation (before: {small['legacy_seconds'] / small['expectations'] * 1000:.0f}) |",
        f"| write: `store.write_week`, new as_of | {write['flow_first_s']:.1f} s "
        f"| {write['flow_rows_per_s']:,.0f} rows/s |",
        f"| write: re-run replacing the same as_of | {write['flow_rewrite_s']:.1f} s "
        f"| {write['flow_rewrite_rows_per_s']:,.0f} rows/s |",
        f"| reference: plain COPY into fresh identical tables | {write['plain_copy_s']:.1f} s "
        f"| {write['plain_copy_rows_per_s']:,.0f} rows/s |",
        "",
        f"Flow write / plain COPY: {write['flow_rows_per_s'] / write['plain_copy_rows_per_s']:.2f}× "
        f"(re-run: {write['flow_rewrite_rows_per_s'] / write['plain_copy_rows_per_s']:.2f}×); "
        f"peak RSS {result['peak_rss_mb']:,.0f} MB; total {result['total_s']:.0f} s.",
    ]
    if "reference" in result:
        lines += ["", reference_line(result, {
            "compute": compute["seconds"], "validation": big["seconds"], "write": write["flow_first_s"],
        })]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, help="default: one per 50 events")
    parser.add_argument("--items", type=int, help="default: one per 200 events")
    parser.add_argument("--weeks", type=int, default=26)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-legacy", action="store_true", help="skip the old-style validation of the big snapshot")
    args = parser.parse_args(argv)
    args.users = args.users or max(10, args.events // 50)
    args.items = args.items or max(10, args.events // 200)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("features", "great_expectations", "pgserver", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    validation._import_gx()
    # GX sets its own loggers' levels on import.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="features-bench-", ignore_cleanup_errors=True) as folder:
        with ReferenceRun() as reference:
            result = measure(args, Path(folder), Settings())
        result |= reference.result()
        table = format_table(result)
        print(table, flush=True)
        log.info("wrote %s", save_result("features", result, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
