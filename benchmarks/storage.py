"""What the weekly job's feature store holds on disk, measured at a small user count and projected to the sizes.

    python -m benchmarks.storage                      # 20,000 users of the large size's world, projected
    python -m benchmarks.storage --users 5000         # quicker, coarser

Draws a synthetic log with the large size's shape (its 50,000 items, its 50 events per user, 16 weeks)
for `--users` users, computes every snapshot the weekly job backfills at the log's last Monday (the
benchmark job's settings: `benchmarks.weekly_job.JOB_ENV`), validates them and writes them through the
feature store (`features.store.write_week`) into Postgres: RECSYS_DATABASE_URL in a schema of its own,
else an embedded server in a temporary folder. Each table's as_of partitions are then measured
(`pg_total_relation_size`: rows, TOAST and indexes), and their rows per user (user-keyed tables) and
bytes per row give each size's store: user-keyed tables grow with users; item-keyed tables are kept
as measured on the same 50,000 items (a denser log fills neighbour lists up to
RECSYS_NEIGHBOURS_PER_ITEM an item: a lower bound). Prints the table and writes
benchmarks/results/storage.{md,json}.
"""

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from datetime import time as clock_time
from pathlib import Path

from benchmarks.weekly_job import JOB_ENV, RESULTS, SIZES

log = logging.getLogger("benchmarks.storage")

EVENTS_PER_USER = SIZES["large"].events // SIZES["large"].users


@dataclass(frozen=True)
class TableStore:
    """One table's share of the job's store at the measured user count, over all its snapshots."""

    table: str
    user_keyed: bool
    rows: int  # summed over the snapshots
    bytes: int  # pg_total_relation_size summed over the snapshots' partitions

    @property
    def bytes_per_row(self) -> float:
        return self.bytes / self.rows if self.rows else 0.0


def project(stores: list[TableStore], measured_users: int, users: int) -> dict[str, int]:
    """Each table's bytes at `users` users: user-keyed tables scaled by users, the others as measured."""
    if measured_users <= 0:
        raise ValueError(f"project: measured_users must be positive, got {measured_users}")
    return {s.table: round(s.bytes * (users / measured_users if s.user_keyed else 1)) for s in stores}


def render(stores: list[TableStore], measured_users: int, snapshots: int, free_bytes: int | None) -> str:
    """The markdown table: per table, rows per user per snapshot, bytes per row, and GB at each size."""
    sizes = {name: size.users for name, size in SIZES.items()}
    projected = {name: project(stores, measured_users, users) for name, users in sizes.items()}
    gb = 1e9
    head = "| table | rows per user a snapshot | bytes per row | " + " | ".join(
        f"GB at {users:,} users ({name}'s), {snapshots} snapshots" for name, users in sizes.items()
    )
    lines = [head + " |", "|---|---|---|" + "---|" * len(sizes)]
    for s in stores:
        per_user = (
            f"{s.rows / snapshots / measured_users:.1f}" if s.user_keyed else f"{s.rows // snapshots:,} rows (items)"
        )
        cells = " | ".join(f"{projected[name][s.table] / gb:.2f}" for name in sizes)
        lines.append(f"| {s.table} | {per_user} | {s.bytes_per_row:.0f} | {cells} |")
    totals = " | ".join(f"**{sum(projected[name].values()) / gb:.1f}**" for name in sizes)
    lines.append(f"| all | | | {totals} |")
    if free_bytes is not None:
        lines.append(f"\nFree disk where Postgres wrote: {free_bytes / gb:.0f} GB.")
    return "\n".join(lines)


def measure(users: int, seed: int, workdir: Path) -> tuple[list[TableStore], int, dict]:
    """Draw, compute, validate and write the job's snapshots for `users` users; measure each table."""
    for name, value in JOB_ENV.items():
        os.environ.setdefault(name, value)
    import sqlalchemy as sa

    from benchmarks.weekly_job import bench_stores
    from features import contracts, store, transform, validation
    from features.synthetic import DEFAULT_KIND, generate_world
    from flows.configs import feature_options, history_weeks, validation_options
    from recsys.clock import week_floor
    from recsys.settings import Settings
    from recsys.stores import sqlalchemy_url

    settings = Settings(data_dir=workdir / "data")
    large = SIZES["large"]
    as_of = week_floor(date.today())
    started = time.perf_counter()
    raw = generate_world(
        DEFAULT_KIND, n_users=users, n_items=large.items, n_events=users * EVENTS_PER_USER, n_weeks=large.weeks,
        end=datetime.combine(as_of, clock_time(), UTC), seed=seed,
    )  # fmt: skip
    weeks = transform.required_weeks(as_of, history_weeks(settings), raw.events.get_column("ts").min())
    log.info(
        "drew %d events in %.1fs; snapshots %s … %s",
        raw.events.height,
        time.perf_counter() - started,
        weeks[0],
        weeks[-1],
    )
    rows: dict[str, int] = {}
    partitions: dict[str, list[str]] = {}
    with bench_stores(settings.data_dir, "storage") as (env, kind):
        engine = sa.create_engine(sqlalchemy_url(env["RECSYS_DATABASE_URL"]), poolclass=sa.NullPool)
        store.ensure_schema(engine)
        for week in weeks:
            frames = transform.build_week_tables(raw.events, raw.items, week, **feature_options(settings))
            as_ofs = {name: transform.assign_as_of(name, week) for name in frames}
            reports = validation.validate_tables(frames, as_ofs=as_ofs, previous={}, **validation_options(settings))
            store.write_week(engine, frames, reports, flow_run_id=None, source="synthetic", raw_digest="benchmark")
            for name, frame in frames.items():
                rows[name] = rows.get(name, 0) + frame.height
                partitions.setdefault(name, []).append(f"{name}__{as_ofs[name]:%Y%m%d}")
            log.info("snapshot %s written (%d rows)", week, sum(f.height for f in frames.values()))
        with engine.connect() as conn:
            sizes = {
                name: sum(
                    conn.execute(sa.text("select pg_total_relation_size(to_regclass(:t))"), {"t": t}).scalar() or 0
                    for t in tables
                )
                for name, tables in partitions.items()
            }
        engine.dispose()
        free = shutil.disk_usage(settings.data_dir).free if kind == "embedded" else None
    stores = [
        TableStore(name, contracts.CONTRACTS[name].key[1] == "user_id", rows[name], sizes[name])
        for name in contracts.CONTRACTS
        if name in rows
    ]
    meta = {"users": users, "snapshots": len(weeks), "as_of": str(as_of), "stores": kind, "free_bytes": free,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    return stores, len(weeks), meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000, help="users of the measured log")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary data folder goes")
    parser.add_argument("--out", type=Path, default=RESULTS / "storage", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error(f"--users must be positive, got {args.users}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="recsys-storage-", dir=args.workdir))
    try:
        stores, snapshots, meta = measure(args.users, args.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = render(stores, args.users, snapshots, meta["free_bytes"])
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"Measured {meta}\n\n{table}\n")
    payload = {**meta, "tables": [asdict(s) | {"bytes_per_row": s.bytes_per_row} for s in stores]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
