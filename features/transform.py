"""Feature and label computation: raw events in, one frame per feature table out.

Every function takes `as_of` and uses only events with `ts < as_of` (labels: the week
`[as_of, as_of + 7d)`), so the same code computes training weeks and this week alike.

Most tables derive from one aggregate of the past events per (user, item) pair, computed
once per snapshot: the 10M-event log is grouped once, later steps work on its pairs.
"""

import itertools
import logging
from datetime import UTC, date, datetime, timedelta

import polars as pl

from features import collaborative as cf
from features import contracts
from features.raw import UNKNOWN
from recsys.clock import mondays
from recsys.settings import default_of

DAY_US = 86_400 * 1_000_000
WEEK = timedelta(days=7)
WINDOWS = (1, 4, 12)  # weeks
FAVOURITE_CREATORS = 20
# Item pairs (of the baskets' self-join) the neighbour step counts at a time: ~0.3 GB of working memory.
NEIGHBOUR_PAIRS_PER_CHUNK = 5_000_000
# Transitions: a transition's weight halves every TRANSITION_HALF_LIFE_DAYS before as_of and is
# counted in integer units of 2^-20, so partial sums of disjoint users add up exactly in any order.
TRANSITION_HALF_LIFE_DAYS = 28.0
TRANSITION_UNITS = 1 << 20
# Transition counts merged at once from the partitions' shares (`build_item_transitions_of_parts`).
TRANSITION_MERGE_ROWS = 2_000_000
# The streaming engine adds floats up in an order that varies from run to run, so a
# re-run would change weight sums in their last bits, and with them the digests.
ENGINE = "in-memory"
# Collaborative scores are rounded so that BLAS summation order cannot change their last bits (digests).
SCORE_DECIMALS = 9
DEFAULT_COLLABORATIVE = cf.CollaborativeConfig()

log = logging.getLogger(__name__)


def week_start(as_of: date) -> datetime:
    """The instant `as_of` 00:00 UTC."""
    return datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC)


def required_weeks(as_of: date, history_weeks: int, first_event: datetime | None = None) -> list[date]:
    """The Mondays a run at `as_of` must have snapshots of so that training can run: `as_of` and the
    `history_weeks` before it, without those before `first_event` (their snapshot would see no event)."""
    weeks = mondays(as_of - timedelta(weeks=history_weeks), as_of)
    return weeks if first_event is None else [week for week in weeks if week_start(week) > first_event]


def events_before(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Events strictly before `as_of`: the only events a snapshot may see."""
    return events.filter(pl.col("ts") < week_start(as_of))


def assign_as_of(table: str, week: date) -> date:
    """The as_of a table of the snapshot computed at `week` is stored under: labels close the week before."""
    return week - WEEK if table == contracts.LABELS.name else week


def build_week_tables(
    events: pl.DataFrame,
    items: pl.DataFrame,
    week: date,
    *,
    recent_items: int,
    neighbours: int,
    collaborative: cf.CollaborativeConfig = DEFAULT_COLLABORATIVE,
    collaborative_items: int = default_of("collaborative_items_per_user"),
) -> dict[str, pl.DataFrame]:
    """The snapshot computed at `week`: every feature table as of `week`, and the labels of
    the week that closed at `week` (left out when that week had no events)."""
    frames = build_feature_tables(
        events, items, week, recent_items=recent_items, neighbours=neighbours, collaborative=collaborative,
        collaborative_items=collaborative_items,
    )  # fmt: skip
    labels = build_labels(events, assign_as_of(contracts.LABELS.name, week))
    return frames | ({contracts.LABELS.name: labels} if labels.height else {})


def build_feature_tables(
    events: pl.DataFrame,
    items: pl.DataFrame,
    as_of: date,
    *,
    recent_items: int,
    neighbours: int,
    collaborative: cf.CollaborativeConfig = DEFAULT_COLLABORATIVE,
    collaborative_items: int = default_of("collaborative_items_per_user"),
) -> dict[str, pl.DataFrame]:
    """Every feature table of the snapshot `as_of`, keyed by table name."""
    pairs = summarise_sorted_pairs(events, as_of)
    users = build_user_tables(pairs, items, as_of)
    history = users[contracts.USER_ITEM_HISTORY.name]
    items_tables = {
        contracts.ITEM_FEATURES.name: build_item_features(count_item_plays(pairs), items, as_of),
        contracts.ITEM_NEIGHBOURS.name: build_item_neighbours(select_baskets(pairs, recent_items), as_of, neighbours),
        **build_collaborative_tables(history, as_of, collaborative, items_per_user=collaborative_items),
        contracts.ITEM_TRANSITIONS.name: build_item_transitions(count_transitions(events, as_of), as_of, neighbours),
    }
    return order_tables(users | items_tables)


def build_collaborative_tables(
    history: pl.DataFrame, as_of: date, config: cf.CollaborativeConfig, *, items_per_user: int
) -> dict[str, pl.DataFrame]:
    """EASE's and ALS's share of the snapshot: `collaborative_scores` holding each user's top
    `items_per_user` unconsumed items by EASE (score and rank; none above `config.ease_max_items`
    items, where its dense n × n matrix is refused), and ALS's factors (`als_user_factors`,
    `als_item_factors`), from which `derive_collaborative_scores` computes ALS's lists where they are read.

    Both are fitted once on `history`, the snapshot's `user_item_history` (pairs before `as_of`): the
    whole user × item matrix, so the partitioned path fits them on the merged history. ALS is kept as
    factors because its lists, at 100 items per user, are most of a snapshot's rows (about 12 GB a
    snapshot at a million users: `benchmarks.storage`); its factors take a few hundred bytes per user.
    """
    fitted = fit_collaborative(history, as_of, config)
    ease = {name: model for name, model in fitted.items() if name == "ease"}
    users = history.get_column("user_id").unique().sort() if history.height else pl.Series("user_id", [], pl.Int64)
    scores = score_collaborative(ease, users, as_of, items_per_user=items_per_user)
    return {contracts.COLLABORATIVE_SCORES.name: scores} | als_factor_tables(fitted.get("als"), as_of, items_per_user)


def als_factor_tables(model: cf.FittedScorer | None, as_of: date, items_per_user: int) -> dict[str, pl.DataFrame]:
    """`als_user_factors` and `als_item_factors` of a fitted ALS (empty tables for none: an empty history)."""
    if model is None:
        users = pl.DataFrame(schema={"user_id": pl.Int64, "factors": pl.Utf8})
        items = pl.DataFrame(schema={"item_id": pl.Int64, "factors": pl.Utf8, "items_per_user": pl.Int64})
    else:
        user_factors, item_factors = model.factors
        users = pl.DataFrame({"user_id": model.matrix.user_ids, "factors": cf.encode_factors(user_factors)})
        items = pl.DataFrame({"item_id": model.matrix.item_ids, "factors": cf.encode_factors(item_factors.T)})
        items = items.with_columns(pl.lit(items_per_user, pl.Int64).alias("items_per_user"))
    return {
        contracts.ALS_USER_FACTORS.name: _finish(contracts.ALS_USER_FACTORS, users, as_of, sort=False),
        contracts.ALS_ITEM_FACTORS.name: _finish(contracts.ALS_ITEM_FACTORS, items, as_of, sort=False),
    }


def derive_collaborative_scores(
    stored: pl.DataFrame,
    user_factors: pl.DataFrame,
    item_factors: pl.DataFrame,
    history: pl.DataFrame,
    *,
    threads: int = DEFAULT_COLLABORATIVE.threads,
) -> pl.DataFrame:
    """The `collaborative_scores` rows of the users in `user_factors`: the stored rows (EASE's lists) with
    ALS's top lists computed from the snapshot's factors, excluding each user's `history` pairs, joined on
    (user, item) as `build_collaborative_tables` stores EASE's. Users without factors keep the stored rows.

    Stored rows that already hold ALS's lists (snapshots written before ALS was kept as factors, which have
    no factor rows) are returned as they are."""
    if not user_factors.height or not item_factors.height:
        return stored
    depth = item_factors.get_column("items_per_user").unique()
    if depth.len() != 1:
        raise ValueError(f"als_item_factors: items_per_user holds {sorted(depth.to_list())}; one value expected")
    as_of = item_factors.get_column("as_of")[0]
    users, items = user_factors.sort("user_id"), item_factors.sort("item_id")
    model = cf.als_from_factors(
        users.get_column("user_id").to_numpy(), cf.decode_factors(users.get_column("factors"), "als_user_factors"),
        items.get_column("item_id").to_numpy(), cf.decode_factors(items.get_column("factors"), "als_item_factors"),
        history, threads=threads,
    )  # fmt: skip
    als = score_collaborative({"als": model}, users.get_column("user_id"), as_of, items_per_user=int(depth[0]))
    key = ["as_of", "user_id", "item_id"]
    ease = stored.select(*key, "ease_score", "ease_rank")
    merged = ease.join(als.select(*key, "als_score", "als_rank"), on=key, how="full", coalesce=True)
    return _finish(contracts.COLLABORATIVE_SCORES, merged, as_of)


def fit_collaborative(history: pl.DataFrame, as_of: date, config: cf.CollaborativeConfig) -> dict[str, cf.FittedScorer]:
    """EASE (unless above `config.ease_max_items` items) and ALS fitted on one snapshot's history; none
    for an empty history."""
    contracts.require_columns(history.columns, ("user_id", "item_id"), "collaborative_scores: history")
    if not history.height:
        return {}
    fitted = {"als": cf.fit_als(history, config)}
    n_items = cf.count_items(history)
    if n_items <= config.ease_max_items:
        fitted = {"ease": cf.fit_ease(history, config)} | fitted
    else:
        log.warning(
            "collaborative_scores as_of %s: EASE left out, %d items above RECSYS_EASE_MAX_ITEMS=%d", as_of,
            n_items, config.ease_max_items,
        )  # fmt: skip
    return fitted


def score_collaborative(
    fitted: dict[str, cf.FittedScorer], users: pl.Series, as_of: date, *, items_per_user: int
) -> pl.DataFrame:
    """The `collaborative_scores` rows of `users` from the models of `fit_collaborative`."""
    key = ["user_id", "item_id"]
    scored = None
    for name, model in fitted.items():
        top = (
            model.score(users, items_per_user)
            .with_columns(pl.col("score").round(SCORE_DECIMALS))
            # Ranked again after rounding, so that the rank always follows the stored score (ties by item_id).
            .sort(["user_id", "score", "item_id"], descending=[False, True, False])
            .select(
                *key,
                pl.col("score").alias(f"{name}_score"),
                pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user_id").alias(f"{name}_rank"),
            )
        )
        scored = top if scored is None else scored.join(top, on=key, how="full", coalesce=True)
        del top  # one model's lists at a time beside the table
    if scored is None:
        scored = pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64})
    missing = [c for c in contracts.COLLABORATIVE_SCORES.column_names if c not in (*key, "as_of", *scored.columns)]
    frame = scored.with_columns(pl.lit(None, contracts.COLLABORATIVE_SCORES.schema[c]).alias(c) for c in missing)
    return _finish(contracts.COLLABORATIVE_SCORES, frame, as_of)


def order_tables(tables: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """`tables` in the snapshot's table order (the contracts'), so reports and writes list them alike."""
    return {name: tables[name] for name in contracts.CONTRACTS if name in tables}


def summarise_sorted_pairs(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """`summarise_pairs` of the events before `as_of`, sorted by (user, item)."""
    # Sorted once by (user, item): the history table needs no sort of its own, and the
    # per-user group-bys and windows below find their groups in one pass.
    return _collect(summarise_pairs(events_before(events, as_of), as_of).sort("user_id", "item_id"))


def build_user_tables(pairs: pl.DataFrame, items: pl.DataFrame, as_of: date) -> dict[str, pl.DataFrame]:
    """The user-keyed feature tables: each user's rows come from that user's pairs alone."""
    return {
        contracts.USER_FEATURES.name: _user_features(pairs, items, as_of),
        contracts.USER_CATEGORY_AFFINITY.name: _affinity(pairs, items, as_of, "category", None),
        contracts.USER_CREATOR_AFFINITY.name: _affinity(pairs, items, as_of, "creator", FAVOURITE_CREATORS),
        contracts.USER_ITEM_HISTORY.name: _user_item_history(pairs, as_of, sorted_pairs=True),
    }


def summarise_pairs(past: pl.DataFrame, as_of: date) -> pl.LazyFrame:
    """One row per (user, item) consumed before `as_of`: events and weight per window and overall, first and last ts."""
    windows = []
    for weeks in WINDOWS:
        recent = _within_weeks(as_of, weeks)
        windows += [
            recent.sum().cast(pl.Int64).alias(f"events_{weeks}w"),
            pl.when(recent).then(pl.col("weight")).otherwise(0.0).sum().alias(f"weight_{weeks}w"),
        ]
    # In first-seen order, so per-user sums over pairs add up in the same order every run.
    return (
        past.lazy()
        .group_by("user_id", "item_id", maintain_order=True)
        .agg(
            *windows,
            pl.len().cast(pl.Int64).alias("events"),
            pl.col("weight").sum(),
            pl.col("ts").min().alias("first_ts"),
            pl.col("ts").max().alias("last_ts"),
        )
    )


def build_labels(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """(user, item) pairs of the week `[as_of, as_of+7d)`; `is_new` if never consumed before."""
    start = week_start(as_of)
    in_week = (pl.col("ts") >= start) & (pl.col("ts") < start + WEEK)
    week = (
        events.lazy()
        .filter(in_week)
        .group_by("user_id", "item_id")
        .agg(pl.len().alias("events"), pl.col("weight").sum())
    )
    # Only the week's pairs are looked up in the past: far cheaper than every past pair.
    seen = (
        events.lazy()
        .filter(pl.col("ts") < start)
        .select("user_id", "item_id")
        .join(week.select("user_id", "item_id"), on=["user_id", "item_id"], how="semi")
        .unique()
        .with_columns(pl.lit(False).alias("is_new"))
    )
    frame = week.join(seen, on=["user_id", "item_id"], how="left").with_columns(pl.col("is_new").fill_null(True))
    return _finish(contracts.LABELS, frame, as_of)


def _user_features(pairs: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    windows = []
    for weeks in WINDOWS:
        events = pl.col(f"events_{weeks}w")
        windows += [
            events.sum(),
            (events > 0).sum().cast(pl.Int64).alias(f"distinct_items_{weeks}w"),
            pl.col(f"weight_{weeks}w").sum(),
        ]
    frame = (
        pairs.lazy()
        .join(_code_items(items, "category")[0], on="item_id", how="left")
        .group_by("user_id")
        .agg(
            *windows,
            pl.col("events").sum().alias("events_total"),
            pl.len().alias("distinct_items_total"),
            pl.col("first_ts").min(),
            pl.col("last_ts").max(),
            pl.col("code").filter(pl.col("events_12w") > 0).n_unique().alias("distinct_categories_12w"),
        )
        .with_columns(
            _days_before(as_of, pl.col("first_ts")).alias("days_since_first_event"),
            _days_before(as_of, pl.col("last_ts")).alias("days_since_last_event"),
        )
    )
    return _finish(contracts.USER_FEATURES, frame, as_of)


def count_item_plays(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per item: plays per window and overall, users (last 4 weeks, overall), first play.

    Counts and a minimum: the counts of disjoint sets of users add up (`merge_item_plays`).
    """
    return _collect(
        pairs.lazy()
        .group_by("item_id")
        .agg(
            *[pl.col(f"events_{w}w").sum().alias(f"plays_{w}w") for w in WINDOWS],
            pl.col("events").sum().alias("plays_total"),
            (pl.col("events_4w") > 0).sum().cast(pl.Int64).alias("users_4w"),
            pl.len().cast(pl.Int64).alias("users_total"),
            pl.col("first_ts").min(),
        )
    )


def merge_item_plays(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """`count_item_plays` of the union of disjoint user sets, from each set's own counts."""
    merged = pl.concat(parts).lazy().group_by("item_id")
    counts = [c for c in parts[0].columns if c not in ("item_id", "first_ts")]
    return _collect(merged.agg(*[pl.col(c).sum() for c in counts], pl.col("first_ts").min()))


def build_item_features(plays: pl.DataFrame, items: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """The item features table from the items' play counts (`count_item_plays`) and metadata."""
    plays = plays.lazy()
    released = items.lazy().filter(pl.col("release_ts") < week_start(as_of))
    known = pl.concat([released.select("item_id"), plays.select("item_id")]).unique()
    counts = ["plays_1w", "plays_4w", "plays_12w", "plays_total", "users_4w", "users_total"]
    frame = (
        known.join(items.lazy(), on="item_id", how="left")
        .join(plays, on="item_id", how="left")
        .with_columns(
            pl.col("category").fill_null(UNKNOWN),
            pl.col("creator").fill_null(UNKNOWN),
            *[pl.col(c).fill_null(0) for c in counts],
        )
        .with_columns(
            # Items with no known release date are as old as their first play.
            pl.coalesce("release_ts", "first_ts").alias("release_ts"),
            pl.coalesce("first_ts", "release_ts").alias("first_ts"),
        )
        .with_columns(
            ((pl.col("plays_1w") + 1) / (pl.col("plays_4w") / 4 + 1)).alias("trend_1w_vs_4w"),
            _days_before(as_of, pl.col("release_ts")).clip(lower_bound=0).alias("days_since_release"),
            _days_before(as_of, pl.col("first_ts")).clip(lower_bound=0).alias("days_since_first_event"),
        )
        .sort(["plays_4w", "plays_total", "item_id"], descending=[True, True, False])
        .with_row_index("popularity_rank_4w", offset=1)
    )
    return _finish(contracts.ITEM_FEATURES, frame, as_of)


def _recent_items(pairs: pl.LazyFrame, limit: int) -> pl.LazyFrame:
    """Each user's `limit` most recent distinct items of the last 12 weeks (ties: lower id)."""
    return (
        pairs.filter(pl.col("events_12w") > 0)
        .group_by("user_id")
        .agg(pl.col("item_id").top_k_by(["last_ts", "item_id"], limit, reverse=[False, True]))
        .explode("item_id")
    )


def select_baskets(pairs: pl.DataFrame, recent_items: int) -> pl.DataFrame:
    """(user_id, item_id): each user's basket, the items co-occurrence counts pairs within."""
    return _collect(_recent_items(pairs.lazy(), recent_items))


def build_item_neighbours(
    baskets: pl.DataFrame, as_of: date, top_k: int, *, pairs_per_chunk: int = NEIGHBOUR_PAIRS_PER_CHUNK
) -> pl.DataFrame:
    """Each item's `top_k` neighbours by cosine co-occurrence within the users' baskets (`select_baskets`),
    counting about `pairs_per_chunk` item pairs at a time."""
    # Dense item codes let one int64 key stand for an item pair: a one-column group-by.
    codes = baskets.select(pl.col("item_id").unique().sort())
    n_codes = max(codes.height, 1)
    coded = baskets.join(codes.with_row_index("code"), on="item_id").select("user_id", pl.col("code").cast(pl.Int64))
    users = coded.group_by("code").agg(pl.len().cast(pl.Float64).alias("n")).sort("code")["n"]
    n_a, n_b = (pl.col(c).map_batches(users.gather, return_dtype=pl.Float64) for c in ("a", "b"))
    # The pairs of a range of items at a time: each range holds its share of the pair counts
    # (the step's peak memory: 3x less at 10M events), at the cost of counting each pair from
    # both sides instead of once.
    basket_sizes = coded.group_by("user_id").len()["len"].cast(pl.Int64)
    chunks = max(1, -(-int((basket_sizes**2).sum()) // pairs_per_chunk))
    step = -(-n_codes // chunks)
    tops = []
    for first in range(0, n_codes, step):
        own = coded.lazy().filter(pl.col("code").is_between(first, first + step - 1))
        # Counting pairs adds only integers, so the faster streaming engine is exact here.
        together = (
            own.join(coded.lazy(), on="user_id", suffix="_b")
            .filter(pl.col("code") != pl.col("code_b"))
            .group_by(pl.col("code") * n_codes + pl.col("code_b"))
            .agg(pl.len().alias("together"))
            .select(a=pl.col("code") // n_codes, b=pl.col("code") % n_codes, together="together")
            .collect(engine="streaming")
        )
        top = (
            together.lazy()
            .with_columns(score=pl.col("together") / (n_a * n_b).sqrt())
            .group_by("a")
            .agg(pl.col("b", "score").sort_by(["score", "b"], descending=[True, False]).head(top_k))
            .explode("b", "score")
            .with_columns(rank=pl.int_range(1, pl.len() + 1).over("a"))
        )
        tops.append(_collect(top))
    found, item_ids = pl.concat(tops), codes["item_id"]
    frame = found.select(
        item_ids.gather(found["a"]).alias("item_id"),
        item_ids.gather(found["b"]).alias("neighbour_id"),
        "score",
        "rank",
    )
    return _finish(contracts.ITEM_NEIGHBOURS, frame, as_of)


def count_transitions(events: pl.DataFrame, as_of: date) -> pl.DataFrame:
    """Per directed pair (item_id, next_item_id) of different items a user consumed one right after the
    other before `as_of`: `transitions` (how often) and `weight_units` (each transition's weight, halving
    every TRANSITION_HALF_LIFE_DAYS from the later event to as_of, in units of 1/TRANSITION_UNITS).

    Integer counts and units: the counts of disjoint user sets add up exactly (`merge_transitions`).
    A user's events are ordered by (ts, item_id); a repeat of the same item is no transition.
    """
    age_days = _days_before(as_of, pl.col("next_ts"))
    # At least one unit: a transition years old still counts, and every share stays defined.
    decay = (pl.lit(0.5) ** (age_days / TRANSITION_HALF_LIFE_DAYS) * TRANSITION_UNITS).round().clip(lower_bound=1)
    decay = decay.cast(pl.Int64)
    return _collect(
        events_before(events, as_of)
        .lazy()
        .select("user_id", "item_id", "ts")
        .sort("user_id", "ts", "item_id")
        .with_columns(
            pl.col("user_id").shift(-1).alias("next_user_id"),
            pl.col("item_id").shift(-1).alias("next_item_id"),
            pl.col("ts").shift(-1).alias("next_ts"),
        )
        .filter((pl.col("next_user_id") == pl.col("user_id")) & (pl.col("next_item_id") != pl.col("item_id")))
        .group_by("item_id", "next_item_id")
        .agg(pl.len().cast(pl.Int64).alias("transitions"), decay.sum().alias("weight_units"))
        .sort("item_id", "next_item_id")
    )


def merge_transitions(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """`count_transitions` of the union of disjoint user sets, from each set's own counts."""
    merged = pl.concat(parts).lazy().group_by("item_id", "next_item_id")
    return _collect(merged.agg(pl.col("transitions", "weight_units").sum()).sort("item_id", "next_item_id"))


def build_item_transitions_of_parts(
    parts: list[pl.DataFrame | pl.LazyFrame], as_of: date, top_k: int, *, rows_per_range: int | None = None
) -> pl.DataFrame:
    """`build_item_transitions(merge_transitions(parts), ...)` made one range of item ids at a time: an item's
    next items, scores and shares come from its own counts alone. About `rows_per_range`
    (TRANSITION_MERGE_ROWS) of the parts' rows are merged at once (merging them all took 4–5× their size on
    top of them, in the group-by and the sort); the result is identical. Parts may be Parquet scans (spilled
    partitions): each is sorted by item_id, so a range reads only its own row groups."""
    lazy = [part.lazy() for part in parts]
    built = []
    for within in id_ranges(lazy, "item_id", rows_per_range or TRANSITION_MERGE_ROWS):
        counts = merge_transitions([_collect(frame.filter(within)) for frame in lazy])
        built.append(build_item_transitions(counts, as_of, top_k))
    return pl.concat(built)


def id_ranges(frames: list[pl.LazyFrame], column: str, rows_per_range: int) -> list[pl.Expr]:
    """Filters that split the rows of `frames` by `column` into consecutive ranges of its values, each
    range holding as many distinct values, and about `rows_per_range` rows when values hold rows alike
    (one filter, always true, when one range will do). A frame sorted by `column` (a Parquet file with its
    row-group statistics) is read only where a range lies."""
    values = _collect(pl.concat([frame.select(pl.col(column).unique()) for frame in frames]).unique().sort(column))
    total = sum(_collect(frame.select(pl.len())).item() for frame in frames)
    ranges = min(values.height, -(-total // rows_per_range))
    if ranges <= 1:
        return [pl.lit(True)]
    ids = values.get_column(column)
    bounds = [None] + [ids[ids.len() * r // ranges] for r in range(1, ranges)] + [None]
    filters = []
    for lower, upper in itertools.pairwise(bounds):
        within = pl.lit(True)
        if lower is not None:
            within &= pl.col(column) >= lower
        if upper is not None:
            within &= pl.col(column) < upper
        filters.append(within)
    return filters


def build_item_transitions(counts: pl.DataFrame, as_of: date, top_k: int) -> pl.DataFrame:
    """Each item's `top_k` next items by decayed weight (`count_transitions`; ties: more transitions,
    then lower id), with the weight (`score`, in transitions) and its `share` of all the item's transitions."""
    frame = (
        counts.lazy()
        .with_columns(
            (pl.col("weight_units") * (1 / TRANSITION_UNITS)).alias("score"),
            (pl.col("weight_units") / pl.col("weight_units").sum().over("item_id")).alias("share"),
        )
        .sort(["item_id", "weight_units", "transitions", "next_item_id"], descending=[False, True, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("item_id").alias("rank"))
        .filter(pl.col("rank") <= top_k)
    )
    return _finish(contracts.ITEM_TRANSITIONS, frame, as_of)


def _affinity(pairs: pl.DataFrame, items: pl.DataFrame, as_of: date, column: str, top: int | None) -> pl.DataFrame:
    contract = contracts.USER_CATEGORY_AFFINITY if column == "category" else contracts.USER_CREATOR_AFFINITY
    codes, names = _code_items(items, column)
    n_codes = len(names)
    # One int64 key stands for (user, code): a one-column group-by, and sorting by it is
    # sorting by (user, name), as codes sort like names.
    frame = (
        pairs.lazy()
        .filter(pl.col("events_12w") > 0)
        .join(codes, on="item_id", how="left")
        .group_by(pl.col("user_id") * n_codes + pl.col("code").fill_null(names.index_of(UNKNOWN)))
        .agg(pl.col("events_12w").sum())
        .sort("user_id")
        .select(
            (pl.col("user_id") // n_codes).alias("user_id"),
            (pl.col("user_id") % n_codes).alias("code"),
            "events_12w",
        )
        .with_columns((pl.col("events_12w") / pl.col("events_12w").sum().over("user_id")).alias("share_12w"))
    )
    if top is not None:
        # A user's favourites: most events first, ties by name; then back in name order.
        values = ["code", "events_12w", "share_12w"]
        favourites = pl.col(values).top_k_by(["events_12w", "code"], top, reverse=[False, True])
        frame = frame.group_by("user_id").agg(favourites).explode(values).sort("user_id", "code")
    found = _collect(frame)
    return _finish(contract, found.with_columns(names.gather(found["code"]).alias(column)), as_of, sort=False)


def _code_items(items: pl.DataFrame, column: str) -> tuple[pl.LazyFrame, pl.Series]:
    """Each item's `column` as an integer code, and the names by code ("unknown" included).

    Grouping and joining on integers is several times faster than on text; codes sort
    like the names they stand for. Missing names are "unknown".
    """
    names = pl.concat([items[column].fill_null(UNKNOWN), pl.Series([UNKNOWN])]).unique().sort()
    lookup = names.to_frame(column).with_row_index("code")
    coded = items.lazy().select("item_id", pl.col(column).fill_null(UNKNOWN)).join(lookup.lazy(), on=column)
    return coded.select("item_id", "code"), names


def _user_item_history(pairs: pl.DataFrame, as_of: date, *, sorted_pairs: bool = False) -> pl.DataFrame:
    frame = pairs.lazy().with_columns(_days_before(as_of, pl.col("last_ts")).alias("days_since_last_event"))
    return _finish(contracts.USER_ITEM_HISTORY, frame, as_of, sort=not sorted_pairs)


def _days_before(as_of: date, ts: pl.Expr) -> pl.Expr:
    # Times the reciprocal, as polars divides a long column by a constant anyway: dividing
    # a column of one or two rows is exact instead, so a small partition's value would differ
    # in its last bit from the same value in the whole log's column.
    return (pl.lit(week_start(as_of)) - ts).dt.total_microseconds().cast(pl.Float64) * (1 / DAY_US)


def _within_weeks(as_of: date, weeks: int) -> pl.Expr:
    return pl.col("ts") >= week_start(as_of) - weeks * WEEK


def _collect(frame: pl.LazyFrame) -> pl.DataFrame:
    return frame.collect(engine=ENGINE)


def _finish(
    contract: contracts.TableContract, frame: pl.LazyFrame | pl.DataFrame, as_of: date, *, sort: bool = True
) -> pl.DataFrame:
    """Stamp `as_of`, conform to the contract, sort by key (unless already) for reproducible output."""
    # as_of is one value: sorting by the rest of the key gives the same order, much faster.
    entity = [k for k in contract.key if k != "as_of"]
    ordered = frame.lazy().sort(entity) if sort else frame.lazy()
    return contract.conform(_collect(ordered.with_columns(pl.lit(as_of).alias("as_of"))))
