"""`recsys explain USER`: why one user got their list (history, candidates, the model's reasons)."""

from cli.jobs import as_of_argument, this_week
from cli.output import print_rows, to_json
from recsys.settings import Settings


def add_commands(commands) -> None:
    explain = commands.add_parser("explain", help="why one user got their recommendations for a week")
    explain.add_argument("user_id", type=int, metavar="USER")
    explain.add_argument(
        "--as-of", type=as_of_argument, help="Monday of the week (default: the live publication's, else this week)"
    )
    explain.add_argument("--json", action="store_true", help="the whole explanation as one JSON document")
    explain.set_defaults(handler=cmd_explain)


def cmd_explain(args, settings: Settings) -> int:
    from flows import configs
    from inference import archive, explain
    from recsys.stores import open_stores

    with open_stores(settings) as stores:
        as_of = args.as_of or explain.live_as_of(stores.redis, settings.redis_prefix) or this_week()

        def archived_list(user_id: int, week) -> list[int] | None:
            try:
                return archive.served_list(stores.engine, user_id, week, prefix=settings.redis_prefix).items
            except archive.ArchiveMissing:
                return None

        explained = explain.explain(
            stores.engine, stores.redis, settings.redis_prefix, args.user_id, as_of,
            configs.candidate_config(settings), settings.top_n, model_name=settings.model_name,
            archived_list=archived_list,
        )  # fmt: skip
    if args.json:
        print(to_json(explained))
    else:
        print_explanation(explained)
    return 0


def print_explanation(explained: dict) -> None:
    """The explanation for people: a header, notes, then one aligned table per part."""
    model = explained["model"]
    shown = "no model" if model is None else f"model {model['name']} v{model['version']} ({model['status']})"
    print(
        f"user {explained['user_id']}, week of {explained['as_of']}: "
        f"features as of {explained['feature_as_of']}, {shown}"
    )
    for note in explained["notes"]:
        print(f"note: {note}")
    print()
    print_rows(
        explained["history"],
        [("item_id", "item"), ("category", "category"), ("creator", "creator"), ("events", "events"),
         ("days_ago", "days ago")],
        as_json=False,
        title=f"history: {explained['history_items']} items consumed, the {len(explained['history'])} most recent",
    )  # fmt: skip
    print()
    top = explained["candidates"][: len(explained["recommended"])]
    print_rows(
        [c | {"sources": _sources(c)} for c in top],
        [("rank", "rank"), ("item_id", "item"), ("score", "score"), ("prior", "prior"), ("bias", "bias"),
         ("other_contributions", "other features"), ("sources", "sources (rank)")],
        as_json=False,
        title="recommended",
    )  # fmt: skip
    if top and "contributions" in top[0]:
        print("why: score = prior + bias + the trees' strongest features (value: contribution) + other features")
        for c in top:
            print(f"  {c['rank']:>3}. item {c['item_id']}: {_why(c)}")
    if explained["consumed"] is not None:
        print()
        print_rows(
            [c | {"rank": c["rank"] if c["candidate"] else "not a candidate", "sources": _sources(c)}
             for c in explained["consumed"]],
            [("item_id", "item"), ("events", "events"), ("rank", "candidate rank"), ("in_top_n", "in top-n"),
             ("sources", "sources (rank)")],
            as_json=False,
            title=f"consumed for the first time in the week of {explained['as_of']}",
        )  # fmt: skip
    published = explained["published"]
    if published is not None:
        print()
        same = "the same as" if published["same_as_explained"] else "differs from"
        fallback = " (the fallback list)" if published.get("fallback") else ""
        where = f"live version {published['version']}, model {published['model_version']}"
        where = where if published["source"] == "live" else published["source"]
        print(f"published ({where}){fallback}: {published['items']}; {same} the list explained above")
    print()
    print_rows(
        [c | {"sources": _sources(c)} for c in explained["candidates"]],
        [("rank", "rank"), ("item_id", "item"), ("score", "score"), ("category", "category"),
         ("creator", "creator"), ("sources", "sources (rank)"), ("cooc_score", "cooc score")],
        as_json=False,
        title=f"all {len(explained['candidates'])} candidates",
    )  # fmt: skip


def _sources(candidate: dict) -> str:
    return " ".join(f"{source} {rank}" for source, rank in (candidate["sources"] or {}).items())


def _why(candidate: dict) -> str:
    return ", ".join(
        f"{c['feature']} ({_value(c['value'])}) {c['contribution']:+.3f}" for c in candidate["contributions"]
    )


def _value(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
