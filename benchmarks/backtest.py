"""The weekly backtest table, model against baselines, in one command.

    python -m benchmarks.backtest --source movielens:../shared/data/ml-100k --from 1998-02-23 --to 1998-04-13
    python -m benchmarks.backtest --source synthetic
    python -m benchmarks.backtest --source synthetic:sequential

`synthetic[:KIND]` draws that synthetic world in memory (default Settings sizes, seed 42;
bare `synthetic`: RECSYS_SYNTHETIC_KIND, the demo by default) ending the Monday after
`--to`. Any other spec is read with `features.sources.read_source`.
The markdown table and a verdict go to stdout (and to `--out` if given). Exit status 0 when
the target of issue #14 is met: the model's overall NDCG@10 at least `--min-ratio` (1.20)
times the best baseline's, with the interval's lower bound above `--min-lower-bound` (1.0);
1 otherwise.
"""

import argparse
import logging
import sys
import time
from datetime import date
from pathlib import Path

from features.raw import RawData
from features.sources import read_source, resolve_synthetic, synthetic_kind
from features.synthetic import generate_world
from features.transform import week_start
from flows.configs import backtest_options
from recsys.clock import mondays
from recsys.settings import Settings
from training.backtest import format_table, ndcg_ratios, run_backtest
from training.plan import WEEK

SYNTHETIC_WEEKS = ("2025-11-10", "2025-12-29")
MOVIELENS_WEEKS = ("1998-02-23", "1998-04-13")
MIN_RATIO = 1.20  # issue #14, "Done when": the model's NDCG@10 at least 1.20× the best baseline's,
MIN_LOWER_BOUND = 1.0  # with the ratio's interval's lower bound above 1.0×


def read_raw(source: str, settings: Settings, last_week: date) -> RawData:
    """The raw log: drawn in memory for `synthetic[:KIND]`, otherwise read from the spec."""
    if kind := synthetic_kind(resolve_synthetic(source, settings.synthetic_kind)):
        return generate_world(
            kind,
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


def verdict(overall: dict, confidence: float, *, min_ratio: float, min_lower_bound: float) -> tuple[bool, str]:
    """Whether the overall model / best-baseline ratio (a row of `ndcg_ratios`) meets the target, and
    the sentence that says so, naming the baseline, the ratio and its interval."""
    ratio, low, high = overall["ratio"], overall["ratio_low"], overall["ratio_high"]
    shortfalls = []
    if ratio is None or not ratio >= min_ratio:
        shortfalls.append(f"ratio below {min_ratio:.2f}×")
    if low is None or not low > min_lower_bound:
        shortfalls.append(f"lower bound not above {min_lower_bound:.2f}×")
    measured = "no ratio" if ratio is None else f"{ratio:.3f}×"
    interval = "no interval" if low is None else f"{confidence:.0%} interval {low:.3f}×, {high:.3f}×"
    outcome = "met" if not shortfalls else f"NOT met ({'; '.join(shortfalls)})"
    return not shortfalls, (
        f"Verdict: target {outcome}: model / best baseline ({overall['best_baseline']}) {measured} [{interval}]; "
        f"the target is ≥ {min_ratio:.2f}× with the interval's lower bound above {min_lower_bound:.2f}×."
    )


def positive_float(text: str) -> float:
    """An argparse type: a float above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", default="synthetic", help="synthetic[:KIND] (demo, sequential), movielens:DIR or any source spec"
    )
    parser.add_argument("--from", dest="start", help="first evaluated as_of (a Monday)")
    parser.add_argument("--to", dest="end", help="last evaluated as_of (a Monday)")
    parser.add_argument("--training-weeks", type=int, help="labelled weeks to train on (default: Settings)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument(
        "--min-ratio", type=positive_float, default=MIN_RATIO,
        help=f"overall model / best-baseline NDCG ratio needed for exit status 0 (default {MIN_RATIO})",
    )  # fmt: skip
    parser.add_argument(
        "--min-lower-bound", type=positive_float, default=MIN_LOWER_BOUND,
        help=f"the ratio's interval's lower bound must be above this (default {MIN_LOWER_BOUND})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    settings = Settings()
    defaults = SYNTHETIC_WEEKS if synthetic_kind(args.source) else MOVIELENS_WEEKS
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
    met, sentence = verdict(overall, result.confidence, min_ratio=args.min_ratio, min_lower_bound=args.min_lower_bound)
    table = format_table(result) + (
        f"\nSource `{args.source}`: {raw.events.height} events; backtest took {elapsed:.0f}s.\n{sentence}\n"
    )
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
