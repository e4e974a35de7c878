"""`recsys models`: the model registry: versions, the champion alias and its history."""

from cli.output import print_rows, to_json
from recsys.settings import Settings


def add_commands(commands) -> None:
    models = commands.add_parser("models", help="the model registry")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every version with the metrics it was judged on")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="one version's record")
    show.add_argument("version", type=int)
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    promote = actions.add_parser("promote", help="make a version the champion")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", required=True)
    promote.add_argument("--force", action="store_true", help="also promote a rejected version")
    rollback = actions.add_parser("rollback", help="give the champion alias back to its previous holder")
    rollback.add_argument("--reason", required=True)
    history = actions.add_parser("history", help="every champion change: who, when, why")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    models.set_defaults(handler=cmd_models)


def cmd_models(args, settings: Settings) -> int:
    from cli.main import actor
    from ranking import registry
    from recsys.stores import open_stores

    name = settings.model_name
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        if args.models_command == "list":
            # Counts come back as floats with the metrics; people read them as whole numbers.
            rows = [
                r | {"users": None if r.get("users") is None else int(r["users"])}
                for r in registry.list_models(stores.engine, name).to_dicts()
            ]
            k = settings.eval_k
            columns = [
                ("version", "version"), ("kind", "kind"), ("status", "status"), ("is_champion", "champion"),
                ("as_of", "as_of"), ("evaluated_on", "evaluated on"), ("created_at", "created (UTC)"),
                (f"ndcg@{k}", f"ndcg@{k}"), (f"recall@{k}", f"recall@{k}"), ("users", "(user, week) units"),
            ]  # fmt: skip
            print_rows(rows, columns, as_json=args.json, title=f"model {name}")
        elif args.models_command == "show":
            record = registry.get_model(stores.engine, name, args.version)
            fields = {k: v for k, v in record.__dict__.items() if k != "model_text"}
            print(to_json(fields) if args.json else _describe(fields))
        elif args.models_command == "promote":
            registry.promote(stores.engine, name, args.version, reason=args.reason, actor=actor(), force=args.force)
            print(f"model {name} v{args.version} is now champion")
        elif args.models_command == "rollback":
            version = registry.rollback(stores.engine, name, reason=args.reason, actor=actor())
            print(f"model {name}: champion rolled back to v{version}")
        else:
            rows = registry.history(stores.engine, name).to_dicts()
            columns = [("changed_at", "at (UTC)"), ("alias", "alias"), ("from_version", "from"),
                       ("to_version", "to"), ("actor", "by"), ("reason", "why")]  # fmt: skip
            print_rows(rows, columns, as_json=args.json, title=f"model {name}: alias history")
    return 0


def _describe(fields: dict) -> str:
    """A model record for people: one line per field, metrics as a small table."""
    lines = []
    for key, value in fields.items():
        if key == "metrics" and isinstance(value, dict):
            lines.append("metrics:")
            for who, metrics in value.items():
                if who == "gains" and isinstance(metrics, dict):
                    lines += [_describe_gain(over, gain) for over, gain in metrics.items()]
                elif isinstance(metrics, dict):
                    shown = "  ".join(
                        f"{m} {v:.4f}" if isinstance(v, float) else f"{m} {v}" for m, v in metrics.items()
                    )
                    lines.append(f"  {who:<18} {shown}")
                else:
                    lines.append(f"  {who:<18} {metrics}")
        else:
            lines.append(f"{key}: {to_json(value) if isinstance(value, dict | list) else value}")
    return "\n".join(lines)


def _describe_gain(over: str, gain: dict) -> str:
    """'  model / ease        +24.0% [95% CI +2.7%, +51.2%] over 308 (user, week) units'."""

    def percent(value: float | None) -> str:
        return "unbounded" if value is None else f"{value:+.1%}"

    return (
        f"  {'model / ' + over:<18} {percent(gain['gain'])} [{gain['confidence']:.0%} CI {percent(gain['low'])}, "
        f"{percent(gain['high'])}] over {gain['units']} (user, week) units"
    )
