"""`recsys replay`: the weekly job for every Monday of a past span, resumable, then its realized quality."""

from datetime import UTC, datetime

from cli.jobs import as_of_argument
from cli.output import print_rows, to_json
from cli.quality import COLUMNS as QUALITY_COLUMNS
from recsys.settings import Settings

# The measures that fit a terminal line; `--json` has every one.
COLUMNS = [column for column in QUALITY_COLUMNS if column[0] not in ("hitrate", "new_items", "head_share")]


def add_commands(commands) -> None:
    replay = commands.add_parser(
        "replay", help="run the weekly job for every Monday of a past span (resumable), then show its quality"
    )
    replay.add_argument(
        "--from", dest="first", type=as_of_argument, required=True, metavar="DATE", help="first week (Monday)"
    )
    replay.add_argument(
        "--to", dest="last", type=as_of_argument, required=True, metavar="DATE", help="last week (Monday)"
    )
    replay.add_argument("--source", metavar="SPEC", help="raw events source spec (default: RECSYS_SOURCE or synthetic)")
    replay.add_argument("--force", action="store_true", help="redo weeks already replayed")
    replay.add_argument("--json", action="store_true", help="weeks and table rows as JSON lines")
    replay.set_defaults(handler=cmd_replay)


def cmd_replay(args, settings: Settings) -> int:
    if args.first > args.last:
        raise ValueError(f"--from {args.first} is after --to {args.last}")
    from features.sources import check_source_spec
    from features.transform import week_start

    if week_start(args.last) > datetime.now(UTC):
        raise ValueError(f"--to {args.last} is in the future: its features would need events not seen yet")
    source = args.source or settings.source
    check_source_spec(source)
    from flows.configs import source_spec

    source = source_spec(settings, source)
    from flows.replay import replay

    def show(week: dict) -> None:
        if args.json:
            print(to_json(week), flush=True)
        else:
            print(describe_week(week), flush=True)

    rows = replay(settings, args.first, args.last, source, force=args.force, on_week=show)
    if not args.json:
        print()
    print_rows(rows, COLUMNS, as_json=args.json, title=f"realized quality of the replayed weeks ({source})")
    return 0


def describe_week(week: dict) -> str:
    """One progress line: what each stage did (now or in an earlier run), and the week before's realized quality."""
    ran = any(result["ran"] for result in week["stages"].values())
    parts = []
    for stage, result in week["stages"].items():
        text = f"features {result['detail']}" if stage == "features" else result["detail"]
        if result["status"] == "skipped":
            text = f"{stage} skipped ({result['detail']})"
        parts.append(f"{text} (earlier run)" if ran and not result["ran"] else text)
    line = f"week {week['as_of']} ({week['position']}/{week['weeks']}): {'' if ran else 'already replayed: '}"
    line += ", ".join(parts)
    if measured := week["quality"]:
        line += (
            f", realized ndcg@{measured['k']} of {measured['as_of']} {measured['ndcg']:.3f}"
            f" vs recent popularity {measured['popular_ndcg']:.3f}"
        )
    return line
