"""The realized quality of what was served in a week, once that week's labels exist.

Week W was served from the version `inference.archive.served_version` names; its labels
(the feature store's `labels` as_of=W) are the pairs consumed in [W, W+7d). Accuracy follows
the one evaluation protocol (design.md): truth = items a user consumed in the week and had
not consumed before, evaluated users = those with such an item and an earlier event; users
without a personal list are scored on the fallback list, since that is what they saw. Next to
it, what recent popularity and item-kNN computed from the snapshot as_of=W would have scored
on the same users. Exposure measures describe the publication's lists (every personal list,
and the fallback once):

- catalogue_coverage: distinct items in any list / items in the catalogue at W
- new_items: distinct items released in the `new_release_days` (28) days before W in any
  list; new_item_list_share: share of lists holding at least one
- head_share (popularity bias): share of recommendation slots taken by the head, the 10% most
  played items of the last 4 weeks (`popularity_rank_4w`), as in Abdollahpouri et al.'s
  short-head proportion; 0.1 means no bias towards the head, 1 only head items
- fallback_share: users active in the week (any event in [W, W+7d)) without a personal list,
  i.e. served the fallback, / users active in the week
- not_candidate_share: truth pairs that the candidate generation of the snapshot as_of=W does
  not even propose (1 - candidate recall): what no ranking could have found

One row per week in the table `realized_quality`; measuring a week again replaces its row.
"""

import logging
import math
import statistics
from collections.abc import Sequence
from datetime import date, timedelta

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from features import contracts, store
from inference import archive
from ranking import baselines, metrics
from ranking.candidates import CandidateConfig, SnapshotTables, generate_candidates
from ranking.scoring import user_batches

log = logging.getLogger(__name__)

HEAD_SHARE = 0.1
ACCURACY = ("ndcg", "recall", "hitrate")
COUNTERFACTUALS = {"popular": "recent popularity", "knn": "item-kNN"}

_metadata = sa.MetaData()
_COUNTS = ("k", "users", "truth_items", "new_items", "active_users")
_SHARES = (
    *ACCURACY,
    *(f"{c}_{m}" for c in COUNTERFACTUALS for m in ACCURACY),
    "catalogue_coverage",
    "new_item_list_share",
    "head_share",
    "fallback_share",
    "not_candidate_share",
)
realized_quality = sa.Table(
    "realized_quality",
    _metadata,
    sa.Column("as_of", sa.Date, primary_key=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("model_version", sa.Integer),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in _COUNTS),
    *(sa.Column(name, sa.Float, nullable=False) for name in _SHARES),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
_SCHEMA = {
    "as_of": pl.Date,
    "version": pl.String,
    "model_version": pl.Int64,
    **dict.fromkeys(_COUNTS, pl.Int64),
    **dict.fromkeys(_SHARES, pl.Float64),
    "computed_at": pl.Datetime("us", "UTC"),
}


def expand_served_lists(lists: pl.DataFrame, fallback: Sequence[int], users: pl.Series) -> pl.DataFrame:
    """(user_id, item_id, rank) of what each of `users` was served: their personal list, else the fallback."""
    wanted = pl.DataFrame({"user_id": users.cast(pl.Int64).unique()})
    personal = lists.select(pl.col("user_id").cast(pl.Int64), pl.col("items").cast(pl.List(pl.Int64)))
    personal = personal.join(wanted, on="user_id", how="semi")
    others = wanted.join(personal, on="user_id", how="anti").with_columns(
        items=pl.lit(list(fallback), dtype=pl.List(pl.Int64))
    )
    return (
        pl.concat([personal, others])
        .with_columns(rank=pl.int_ranges(1, pl.col("items").list.len() + 1, dtype=pl.Int64))
        .explode("items", "rank")
        .rename({"items": "item_id"})
        .sort("user_id", "rank")
    )


def measure_exposure(
    lists: pl.DataFrame, fallback: Sequence[int], item_features: pl.DataFrame, new_release_days: float
) -> dict:
    """catalogue_coverage, new_items, new_item_list_share and head_share of a publication's lists (module doc)."""
    contracts.require_columns(
        item_features.columns, ("item_id", "days_since_release", "popularity_rank_4w"), "item_features"
    )
    every = pl.concat(
        [
            lists.select(pl.col("items").cast(pl.List(pl.Int64))),
            pl.DataFrame({"items": [list(fallback)]}, schema={"items": pl.List(pl.Int64)}),
        ]
    ).with_row_index("list")
    slots = every.explode("items").rename({"items": "item_id"}).drop_nulls("item_id")
    head_size = math.ceil(HEAD_SHARE * item_features.height)
    items = item_features.select(
        pl.col("item_id").cast(pl.Int64),
        is_new=pl.col("days_since_release") < new_release_days,
        is_head=pl.col("popularity_rank_4w") <= head_size,
    )
    marked = slots.join(items, on="item_id", how="left").with_columns(pl.col("is_new", "is_head").fill_null(False))
    return {
        "catalogue_coverage": slots["item_id"].n_unique() / max(item_features.height, 1),
        "new_items": marked.filter("is_new")["item_id"].n_unique(),
        "new_item_list_share": marked.group_by("list").agg(pl.col("is_new").any())["is_new"].mean() or 0.0,
        "head_share": marked["is_head"].mean() or 0.0,
    }


def measure_fallback_share(lists: pl.DataFrame, labels: pl.DataFrame) -> dict:
    """active_users (any event in the labels' week) and the share of them without a personal list."""
    active = labels.select(pl.col("user_id").cast(pl.Int64)).unique()
    on_fallback = active.join(lists.select(pl.col("user_id").cast(pl.Int64)), on="user_id", how="anti").height
    return {"active_users": active.height, "fallback_share": on_fallback / active.height if active.height else 0.0}


def measure_not_candidate_share(candidates: pl.DataFrame, truth: pl.DataFrame) -> float:
    """Share of the truth (user_id, item_id) pairs absent from the candidates."""
    if truth.height == 0:
        return 0.0
    missed = truth.join(candidates.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
    return missed.height / truth.height


def measure_realized_quality(
    lists: pl.DataFrame,
    fallback: Sequence[int],
    tables: SnapshotTables,
    labels: pl.DataFrame,
    config: CandidateConfig,
    *,
    k: int,
    batch_users: int = 5_000,
) -> dict:
    """Every measure of the module doc for one week: served lists and fallback, the snapshot as_of=W and its labels.

    The candidates are generated `batch_users` users at a time, to bound memory.
    """
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id"))
    users = truth["user_id"].unique().sort()
    history, exclude = tables.user_item_history, config.exclude_consumed
    recs = {
        "": expand_served_lists(lists, fallback, users),
        "popular_": baselines.recommend_recent_popular(
            tables.item_features, history, users, k, exclude_consumed=exclude
        ),
        "knn_": baselines.recommend_item_knn(
            tables.item_neighbours, history, users, k, config.recent_items,
            item_features=tables.item_features, exclude_consumed=exclude,
        ),
    }  # fmt: skip
    n_catalogue = max(tables.item_features.height, 1)
    result: dict = {"k": k, "users": users.len(), "truth_items": truth.height}
    for name, frame in recs.items():
        scores = metrics.rank_metrics(frame, truth, k=k, n_catalogue=n_catalogue)
        result |= {f"{name}{m}": scores[f"{m}@{k}"] for m in ACCURACY}
    found = [generate_candidates(tables, batch, config) for batch in user_batches(users, batch_users)]
    # No evaluated users means no truth either: the share is 0 whatever the candidates.
    result["not_candidate_share"] = measure_not_candidate_share(pl.concat(found) if found else truth, truth)
    return (
        result
        | measure_exposure(lists, fallback, tables.item_features, config.new_release_days)
        | measure_fallback_share(lists, labels)
    )


def degradation_reasons(series: pl.DataFrame, week: date, *, share: float, trailing_weeks: int) -> list[str]:
    """Why the served quality of `week` looks degraded (one line each), or nothing.

    Degraded: served NDCG below recent popularity's on the same users, or below `share` ×
    the median served NDCG of the `trailing_weeks` measured weeks before it (checked only
    once that many weeks exist).
    """
    rows = series.sort("as_of").to_dicts()
    current = next((row for row in rows if row["as_of"] == week), None)
    if current is None:
        raise ValueError(f"degradation_reasons: week {week} is not in the quality series; measure it first")
    k, ndcg, reasons = current["k"], current["ndcg"], []
    if ndcg < current["popular_ndcg"]:
        reasons.append(
            f"week {week}: served NDCG@{k} {ndcg:.4f} is below recent popularity's {current['popular_ndcg']:.4f}"
            f" on the same {current['users']} users"
        )
    before = [row["ndcg"] for row in rows if row["as_of"] < week][-trailing_weeks:]
    if len(before) == trailing_weeks and ndcg < share * (median := statistics.median(before)):
        reasons.append(
            f"week {week}: served NDCG@{k} {ndcg:.4f} is below {share:g} × {median:.4f},"
            f" the median of the {trailing_weeks} weeks before"
        )
    return reasons


def quality_markdown(series: pl.DataFrame, reasons: Sequence[str], chart_png: bytes | None = None) -> str:
    """The weekly artifact: a warning block if degraded, the trend chart (inline PNG) and the table of the weeks."""
    import base64

    lines = ["# Realized quality of the served recommendations", ""]
    if reasons:
        lines += ["> ⚠️ **Quality degraded**", ">", *[f"> - {reason}" for reason in reasons], ""]
    if chart_png:
        encoded = base64.b64encode(chart_png).decode()
        lines += [f"![served NDCG@10 and the counterfactuals](data:image/png;base64,{encoded})", ""]
    lines += ["| " + " | ".join(header for header, _, _ in _TABLE) + " |", "|" + "---|" * len(_TABLE)]
    for row in series.sort("as_of").iter_rows(named=True):
        lines.append("| " + " | ".join(format(row[key], spec) for _, key, spec in _TABLE) + " |")
    return "\n".join(lines)


_TABLE = [
    ("week", "as_of", ""), ("version", "version", ""), ("model", "model_version", ""), ("users", "users", ""),
    ("NDCG", "ndcg", ".4f"), ("recent pop. NDCG", "popular_ndcg", ".4f"), ("item-kNN NDCG", "knn_ndcg", ".4f"),
    ("recall", "recall", ".4f"), ("hit rate", "hitrate", ".4f"), ("coverage", "catalogue_coverage", ".3f"),
    ("new items", "new_items", ""), ("head share", "head_share", ".3f"), ("fallback", "fallback_share", ".3f"),
    ("not candidates", "not_candidate_share", ".3f"),
]  # fmt: skip


def ensure_schema(engine: sa.Engine) -> None:
    """Create the `realized_quality` table if missing."""
    with engine.begin() as conn:
        conn.execute(sa.text("select pg_advisory_xact_lock(hashtext('weekly-recs.quality'), 0)"))
        _metadata.create_all(conn)


def measure_week(
    engine: sa.Engine, week: date, *, prefix: str, config: CandidateConfig, k: int = 10, batch_users: int = 5_000
) -> dict:
    """Measure the realized quality of the version served in `week` and store it as that week's row; the row."""
    version = archive.served_version(engine, week, prefix=prefix)
    try:
        labels = store.read_table(engine, contracts.LABELS.name, week)
    except store.SnapshotUnavailable as missing:
        raise store.SnapshotUnavailable(
            f"week {week} cannot be measured yet: its labels exist once the week is complete and the feature flow"
            f" ran for {week + timedelta(days=7)} ({missing})"
        ) from None
    users = labels["user_id"].unique().to_list()
    frames = {
        c.name: store.read_table(engine, c.name, week, user_ids=users if "user_id" in c.key else None)
        for c in contracts.FEATURE_TABLES
    }
    row = measure_realized_quality(
        archive.read_lists(engine, version), archive.read_fallback(engine, version),
        SnapshotTables.from_frames(frames), labels, archive.served_candidates(engine, version, config), k=k,
        batch_users=batch_users,
    )  # fmt: skip
    row = {"as_of": week, "version": version, "model_version": archive.model_version_of(engine, version), **row}
    statement = postgresql.insert(realized_quality).values(**row)
    changed = {name: statement.excluded[name] for name in row if name != "as_of"} | {"computed_at": sa.func.now()}
    with engine.begin() as conn:
        conn.execute(statement.on_conflict_do_update(index_elements=["as_of"], set_=changed))
    log.info(
        "week %s (version %s): served NDCG@%d %.4f, recent popularity %.4f, item-kNN %.4f on %d users",
        week, version, k, row["ndcg"], row["popular_ndcg"], row["knn_ndcg"], row["users"],
    )  # fmt: skip
    return row


def quality_series(engine: sa.Engine, weeks: int) -> pl.DataFrame:
    """The stored rows of the last `weeks` measured weeks, oldest first."""
    query = sa.select(realized_quality).order_by(realized_quality.c.as_of.desc()).limit(weeks)
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
    return pl.DataFrame(rows, schema=_SCHEMA).sort("as_of")
