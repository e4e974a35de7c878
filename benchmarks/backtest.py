"""The weekly backtest table, model against baselines, in one command.

    python -m benchmarks.backtest --source movielens:../shared/data/ml-100k --from 1998-02-23 --to 1998-04-13
    python -m benchmarks.backtest --source synthetic

`synthetic` draws the demo log in memory (default Settings sizes, seed 42) ending the
Monday after `--to`. Any other spec is read with `features.sources.read_source`.
The markdown table goes to stdout (and to `--out` if given).
"""

import argparse
import logging
import sys
import time
from datetime import date
from pathlib import Path

from features.raw import RawData
from features.sources import read_source
from features.synthetic import generate_log
from features.transform import week_start
from flows.configs import backtest_options
from recsys.clock import mondays
from recsys.settings import Settings
from training.backtest import format_table, ndcg_ratios, run_backtest
from training.plan import WEEK

SYNTHETIC_WEEKS = ("2025-11-10", "2025-12-29")
MOVIELENS_WEEKS = ("1998-02-23", "1998-04-13")
TARGET_RATIO = 1.10


def read_raw(source: str, settings: Settings, last_week: date) -> RawData:
    """The raw log: drawn in memory for `synthetic`, otherwise read from the spec."""
    if source == "synthetic":
        return generate_log(
            n_users=settings.synthetic_users,
            n_items=settings.synthetic_items,
            n_events=settings.synthetic_events,
            n_weeks=settings.synthetic_weeks,
            end=week_start(last_week + WEEK),
            seed=settings.seed,
        )
    if source.startswith("movielens:") and not (Path(source.split(":", 1)[1]) / "u.data").exists():
        raise FileNotFoundError(f"MovieLens 100K not found at {source.split(':', 1)[1]} (no u.data): skipping")
    return read_source(source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="synthetic", help="synthetic, movielens:DIR or any source spec")
    parser.add_argument("--from", dest="start", help="first evaluated as_of (a Monday)")
    parser.add_argument("--to", dest="end", help="last evaluated as_of (a Monday)")
    parser.add_argument("--training-weeks", type=int, help="labelled weeks to train on (default: Settings)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    settings = Settings()
    defaults = SYNTHETIC_WEEKS if args.source == "synthetic" else MOVIELENS_WEEKS
    weeks = mondays(args.start or defaults[0], args.end or defaults[1])
    try:
        raw = read_raw(args.source, settings, weeks[-1])
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 0
    options = backtest_options(settings)
    if args.training_weeks:
        options["training_weeks"] = args.training_weeks

    started = time.perf_counter()
    result = run_backtest(raw, weeks, **options)
    elapsed = time.perf_counter() - started
    overall = ndcg_ratios(result).filter(week="overall").row(0, named=True)
    table = format_table(result) + (
        f"\nSource `{args.source}`: {raw.events.height} events; backtest took {elapsed:.0f}s. "
        f"Overall model / best baseline ({overall['best_baseline']}): {overall['ratio']:.2f}× "
        f"[{result.confidence:.0%} CI {overall['ratio_low']:.2f}×, {overall['ratio_high']:.2f}×] "
        f"(target ≥ {TARGET_RATIO:.2f}×).\n"
    )
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0 if overall["ratio"] >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
