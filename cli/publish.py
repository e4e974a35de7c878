"""`recsys publish` and `recsys recs`: the published sets in Redis, their lineage, and reading them."""

from datetime import date

from cli.output import print_rows, to_json
from recsys.settings import Settings


def add_commands(commands) -> None:
    recs = commands.add_parser("recs", help="read users' live recommendations from Redis")
    recs.add_argument("user_ids", nargs="+", type=int, metavar="USER_ID")
    recs.add_argument("--json", action="store_true", help="one JSON object per line")
    recs.add_argument("--week", type=date.fromisoformat, help="what was served that week (a Monday), from the archive")
    recs.set_defaults(handler=cmd_recs)

    publish = commands.add_parser("publish", help="the published recommendation sets in Redis")
    actions = publish.add_subparsers(dest="publish_command", required=True, metavar="ACTION")
    rollback = actions.add_parser("rollback", help="point readers back to the previous version")
    rollback.add_argument("--reason", required=True)
    approve = actions.add_parser("approve", help="make a held publication live anyway")
    approve.add_argument("version", metavar="VERSION")
    approve.add_argument("--reason", required=True)
    for action, text in (("list", "every publication recorded in Postgres"),
                         ("history", "every move of the live pointer: publish, rollback, approve")):  # fmt: skip
        sub = actions.add_parser(action, help=text)
        sub.add_argument("--json", action="store_true", help="one JSON object per line")
    publish.set_defaults(handler=cmd_publish)


def cmd_recs(args, settings: Settings) -> int:
    from inference import serving
    from recsys.stores import open_redis

    if args.week is not None:
        from inference import archive
        from recsys.stores import open_stores

        with open_stores(settings) as stores:
            found = archive.served_recommendations(
                stores.engine, args.user_ids, args.week, prefix=settings.redis_prefix
            )
    else:
        with open_redis(settings) as (client, _):
            found = serving.get_recommendations(client, settings.redis_prefix, args.user_ids)
    for rec in found:
        if args.json:
            print(to_json({"user_id": rec.user_id, "items": rec.items, "model_version": rec.model_version,
                           "as_of": rec.as_of, "version": rec.version, "fallback": rec.is_fallback}))  # fmt: skip
        else:
            print(f"user {rec.user_id}: {rec.items}{' (fallback)' if rec.is_fallback else ''}")
    return 0


def cmd_publish(args, settings: Settings) -> int:
    from cli.main import actor
    from inference import publications, publish
    from recsys.stores import open_stores

    prefix = settings.redis_prefix
    with open_stores(settings) as stores:
        publications.ensure_schema(stores.engine)
        if args.publish_command == "rollback":
            version = publish.rollback_publication(
                stores.engine, stores.redis, prefix, reason=args.reason, actor=actor()
            )
            print(f"readers now see version {version}")
        elif args.publish_command == "approve":
            result = publish.approve_publication(
                stores.engine, stores.redis, prefix, args.version, reason=args.reason, actor=actor(),
                keep=settings.keep_versions,
            )  # fmt: skip
            print(f"readers now see version {result.version} (approved; previous {result.previous})")
        elif args.publish_command == "list":
            rows = publications.list_publications(stores.engine).to_dicts()
            columns = [
                ("version", "version"), ("as_of", "as_of"), ("status", "status"), ("model_name", "model"),
                ("model_version", "model v"), ("feature_as_of", "features"), ("user_count", "users"),
                ("fallback_user_count", "fallback"), ("finished_at", "finished (UTC)"),
            ]  # fmt: skip
            print_rows(rows, columns, as_json=args.json, title="publications")
        else:
            rows = publications.pointer_history(stores.engine, prefix).to_dicts()
            columns = [("at", "at (UTC)"), ("action", "action"), ("from_version", "from"), ("to_version", "to"),
                       ("actor", "by"), ("reason", "why")]  # fmt: skip
            print_rows(rows, columns, as_json=args.json, title=f"live pointer of {prefix}")
    return 0
