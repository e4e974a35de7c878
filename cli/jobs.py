"""`recsys demo|run|features|train|infer|evaluate`: the weekly job and each of its flows."""

import argparse
from datetime import UTC, date, datetime, timedelta

from recsys.clock import parse_as_of, week_floor
from recsys.settings import Settings

SYNTHETIC_KINDS = ("demo", "sequential")  # features.synthetic.KINDS, without its imports at CLI start


def as_of_argument(value: str) -> date:
    try:
        return parse_as_of(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def this_week() -> date:
    return week_floor(datetime.now(UTC))


def add_commands(commands) -> None:
    demo = commands.add_parser("demo", help="generate a synthetic log and run the whole weekly job on it")
    demo.add_argument(
        "--kind", choices=SYNTHETIC_KINDS, help="synthetic world: demo or sequential (default: RECSYS_SYNTHETIC_KIND)"
    )
    demo.set_defaults(handler=cmd_demo)

    features = commands.add_parser("features", help="run the feature flow (one week or a backfill range)")
    features.add_argument("--as-of", type=as_of_argument, help="Monday of the snapshot (default: this week)")
    features.add_argument("--from", dest="backfill_from", type=as_of_argument, help="backfill from this Monday")
    features.add_argument("--to", dest="backfill_to", type=as_of_argument, help="last week (same as --as-of)")
    features.add_argument("--source", help="raw events source spec (default: RECSYS_SOURCE or synthetic)")
    features.add_argument("--force", action="store_true", help="recompute snapshots that already passed")
    features.set_defaults(handler=cmd_features)

    for name, handler in (("train", cmd_train), ("infer", cmd_infer)):
        text = f"run the {'training' if name == 'train' else 'inference'} flow"
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--as-of", type=as_of_argument, help="Monday of the run (default: this week)")
        sub.set_defaults(handler=handler)

    run = commands.add_parser("run", help="features (with any missing past weeks), training and inference in order")
    run.add_argument("--as-of", type=as_of_argument, help="Monday of the run (default: this week)")
    run.add_argument("--source", help="raw events source spec")
    run.set_defaults(handler=cmd_run)

    evaluate = commands.add_parser("evaluate", help="weekly backtest: train as of each week, score the next one")
    evaluate.add_argument("--source", help="raw events source spec (default: RECSYS_SOURCE or synthetic)")
    evaluate.add_argument("--from", dest="first", type=as_of_argument, required=True, help="first as_of (Monday)")
    evaluate.add_argument("--to", dest="last", type=as_of_argument, required=True, help="last as_of (Monday)")
    evaluate.set_defaults(handler=cmd_evaluate)


def check_job_arguments(as_of: date, source: str | None, settings: Settings) -> str:
    """Refuse a future week or an unusable source spec before any server starts; the spec to use."""
    from features.sources import check_source_spec
    from features.transform import week_start

    if week_start(as_of) > datetime.now(UTC):
        raise ValueError(f"--as-of {as_of} is in the future: its features would need events not seen yet")
    spec = source or settings.source
    check_source_spec(spec)
    return spec


def cmd_features(args, settings: Settings) -> int:
    as_of = args.backfill_to or args.as_of or this_week()
    if args.backfill_from and args.backfill_from > as_of:
        raise ValueError(f"--from {args.backfill_from} is after --to {as_of}")
    check_job_arguments(as_of, args.source, settings)
    from flows.feature_flow import feature_flow

    written = feature_flow(as_of=as_of, source=args.source, backfill_from=args.backfill_from, force=args.force)
    print(f"feature snapshots written: {', '.join(written) or 'none (all already passed; --force recomputes)'}")
    return 0


def cmd_train(args, settings: Settings) -> int:
    from flows.training_flow import training_flow

    print_training(training_flow(as_of=args.as_of or this_week()), settings)
    return 0


def cmd_infer(args, settings: Settings) -> int:
    from flows.inference_flow import inference_flow

    print_publication(inference_flow(as_of=args.as_of or this_week()))
    return 0


def cmd_run(args, settings: Settings) -> int:
    as_of = args.as_of or this_week()
    check_job_arguments(as_of, args.source, settings)
    from flows.weekly_job import run_weekly_job

    trained, published = run_weekly_job(settings, as_of, args.source)
    print_summary(settings, as_of, trained, published)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from flows.weekly_job import run_weekly_job

    as_of = this_week()
    kind = args.kind or settings.synthetic_kind
    trained, published = run_weekly_job(settings, as_of, "synthetic" if kind == "demo" else f"synthetic:{kind}")
    print_summary(settings, as_of, trained, published)
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    if args.first > args.last:
        raise ValueError(f"--from {args.first} is after --to {args.last}")
    source = args.source or settings.source
    from features.sources import check_source_spec

    check_source_spec(source)
    from features.sources import read_source, synthetic_kind
    from features.synthetic import ensure_synthetic_log
    from features.transform import week_start
    from flows.configs import backtest_options, source_spec, synthetic_log_config
    from recsys.clock import mondays
    from training.backtest import format_table, run_backtest

    weeks = mondays(args.first, args.last)
    source = source_spec(settings, source)
    synthetic = synthetic_log_config(settings, source)
    if synthetic_kind(source):
        ensure_synthetic_log(synthetic, this_week())
    # Each evaluated week [T, T+7d) needs its events; nothing later is read.
    raw = read_source(source, before=week_start(weeks[-1] + timedelta(weeks=1)), synthetic_dir=synthetic.folder)
    print(format_table(run_backtest(raw, weeks, **backtest_options(settings))))
    return 0


def print_training(result: dict, settings: Settings) -> None:
    k = settings.eval_k
    print(f"model v{result['version']} ({'champion' if result['promote'] else 'rejected'}): {result['reason']}")
    print(f"  champion now: {result['champion']}")
    weeks = result.get("gate_weeks", [result["holdout"]])
    print(f"  gate metrics at K={k}, pooled over {len(weeks)} week(s) {weeks[0]} … {weeks[-1]}:")
    gains = result.get("gains", {})
    for who, m in result["metrics"].items():
        gain = gains.get(who)
        interval = (
            ""
            if gain is None or None in (gain["gain"], gain["low"], gain["high"])
            else (f"  model gain {gain['gain']:+.1%} [{gain['low']:+.1%}, {gain['high']:+.1%}]")
        )
        print(
            f"    {who:<17} ndcg {m[f'ndcg@{k}']:.4f}  recall {m[f'recall@{k}']:.4f}  "
            f"hitrate {m[f'hitrate@{k}']:.4f}  map {m[f'map@{k}']:.4f}  (user, week) units {m['users']}{interval}"
        )


def print_publication(result: dict) -> None:
    print(
        f"published version {result['version']} for as_of {result['as_of']} with {result['model']}: "
        f"{result['personal']} users with personal lists, {result['fallback_users']} on the fallback, "
        f"{result['total_s']:.1f}s"
    )


def print_summary(settings: Settings, as_of: date, trained: dict, published: dict) -> None:
    from features import store
    from inference import serving
    from recsys.stores import open_stores

    with open_stores(settings) as stores:
        summary = store.snapshot_summary(stores.engine, as_of)
        users = store.read_table(stores.engine, "user_features", as_of, columns=["user_id"])["user_id"].head(3)
        samples = serving.get_recommendations(stores.redis, settings.redis_prefix, users.to_list())
    print(f"\n=== weekly-recs, as_of {as_of} ===")
    print("feature snapshot rows:")
    for row in summary.iter_rows(named=True):
        print(f"  {row['table_name']:<24} {row['row_count']:>10}  {'passed' if row['passed'] else 'FAILED'}")
    print_training(trained, settings)
    print_publication(published)
    print("sample recommendations (read back from Redis):")
    for rec in samples:
        print(f"  user {rec.user_id}: {rec.items[:10]}{' (fallback)' if rec.is_fallback else ''}")
    print("look up any user:  recsys recs USER_ID [USER_ID...] [--json]")
