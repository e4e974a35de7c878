"""`recsys quality`: the realized quality of the served recommendations, week by week."""

from cli.output import print_rows
from recsys.settings import Settings

COLUMNS = [
    ("as_of", "week"), ("version", "version"), ("model_version", "model v"), ("users", "users"),
    ("ndcg", "NDCG"), ("popular_ndcg", "recent pop."), ("knn_ndcg", "item-kNN"), ("recall", "recall"),
    ("hitrate", "hit rate"), ("catalogue_coverage", "coverage"), ("new_items", "new items"),
    ("head_share", "head share"), ("fallback_share", "fallback"), ("not_candidate_share", "not cand."),
]  # fmt: skip


def add_commands(commands) -> None:
    quality = commands.add_parser("quality", help="realized quality of the served lists, with the counterfactuals")
    quality.add_argument("--weeks", type=int, default=12, help="the last N measured weeks (default 12)")
    quality.add_argument("--json", action="store_true", help="one JSON object per line, every measure")
    quality.set_defaults(handler=cmd_quality)


def cmd_quality(args, settings: Settings) -> int:
    from inference import quality
    from recsys.stores import open_stores

    if args.weeks < 1:
        raise ValueError(f"--weeks must be at least 1, got {args.weeks}")
    with open_stores(settings) as stores:
        quality.ensure_schema(stores.engine)
        rows = quality.quality_series(stores.engine, args.weeks).to_dicts()
    title = f"realized quality (@{rows[-1]['k']}) of the last {len(rows)} measured weeks" if rows else "measured weeks"
    print_rows(rows, COLUMNS, as_json=args.json, title=title)
    return 0
