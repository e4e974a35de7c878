"""Candidate generation and the candidate×feature frame, shared by training and inference.

`build_ranking_frame` is the one function that turns (snapshot tables, users) into the
rows the ranker scores; inference calls it exactly as training did.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import polars as pl
from scipy import sparse

from features import contracts
from features.raw import UNKNOWN
from features.transform import derive_collaborative_scores
from recsys.settings import default_of

SOURCES = ("cooc", "pop", "category", "creator", "new", "cf", "seq")
# Sequence signals: how far each of the user's last few items weighs (1/position, last item first),
# and how many of each item's best next items a two-step walk from the last item follows.
SEQ_TWO_STEP_FANOUT = 10
# Shares are shrunk as if each item had this many more (decayed) transitions going nowhere: an item
# followed once by another is weak evidence (most MovieLens items), one followed 70 times is not.
SEQ_PRIOR_TRANSITIONS = 10.0
LAST_ITEMS = 5  # the user's last items the seq source starts from and the last-items features describe


@dataclass(frozen=True)
class SnapshotTables:
    """The feature tables of one `as_of`, restricted to the users being ranked."""

    user_features: pl.DataFrame
    item_features: pl.DataFrame
    item_neighbours: pl.DataFrame
    user_category_affinity: pl.DataFrame
    user_creator_affinity: pl.DataFrame
    user_item_history: pl.DataFrame
    collaborative_scores: pl.DataFrame
    item_transitions: pl.DataFrame | None = None  # None: no sequence signals (frames built before they existed)

    @classmethod
    def from_frames(cls, frames: dict[str, pl.DataFrame]) -> "SnapshotTables":
        """The tables of a snapshot's frames (`contracts.FEATURE_TABLES`, as the store reads or the feature
        flow computes them): ALS's lists join `collaborative_scores`, computed from the ALS factors of the
        users read (`transform.derive_collaborative_scores`); frames without factor tables keep theirs."""
        fields = {t.name: frames[t.name] for t in contracts.FEATURE_TABLES if t.name not in _FACTOR_TABLES}
        factors = [frames.get(name) for name in _FACTOR_TABLES]
        if all(f is not None for f in factors):
            fields[contracts.COLLABORATIVE_SCORES.name] = derive_collaborative_scores(
                fields[contracts.COLLABORATIVE_SCORES.name], *factors, fields[contracts.USER_ITEM_HISTORY.name]
            )
        return cls(**fields)


_FACTOR_TABLES = (contracts.ALS_USER_FACTORS.name, contracts.ALS_ITEM_FACTORS.name)


@dataclass(frozen=True)
class CandidateConfig:
    """How many candidates each source contributes per user; `recent_items` and `exclude_consumed`
    default to the Settings' (`RECSYS_RECENT_ITEMS_PER_USER`, `RECSYS_EXCLUDE_CONSUMED`)."""

    cooc: int = 100
    pop: int = 50
    category: int = 50
    creator: int = 30
    new: int = 30
    cf: int = 50
    seq: int = 30
    seq_min_score: float = 0.1  # a seq candidate needs at least this (shrunk) score: weak paths are noise
    recent_items: int = default_of("recent_items_per_user")
    new_release_days: float = 28.0
    exclude_consumed: bool = default_of("exclude_consumed")
    # Counts by history length (`training.allocation`): a user with at least band_edges[i - 1] and fewer than
    # band_edges[i] past events (`events_total`) keeps the first band_counts[i][j] candidates of SOURCES[j]; the
    # counts above are then how deep each source is generated (the most of any band). Empty: one count per
    # source for every user.
    band_edges: tuple[int, ...] = ()
    band_counts: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if list(self.band_edges) != sorted(set(self.band_edges)):
            raise ValueError(f"CandidateConfig: band_edges must be strictly ascending, got {self.band_edges}")
        if self.band_counts and len(self.band_counts) != len(self.band_edges) + 1:
            raise ValueError(
                f"CandidateConfig: {len(self.band_edges)} band edges need {len(self.band_edges) + 1} bands of "
                f"counts, got {len(self.band_counts)}"
            )
        if self.band_edges and not self.band_counts:
            raise ValueError(f"CandidateConfig: band_edges {self.band_edges} without band_counts")
        if any(len(counts) != len(SOURCES) for counts in self.band_counts):
            raise ValueError(f"CandidateConfig: each band needs one count per source {SOURCES}, got {self.band_counts}")


def source_counts(config: CandidateConfig) -> dict[str, int]:
    """How many candidates each source gives per user under `config`, by source name."""
    return {source: getattr(config, source) for source in SOURCES}


def candidate_rows(users: int, config: CandidateConfig) -> int:
    """At most how many candidate rows `users` users get: every source's count summed (the sources overlap,
    so fewer in practice). What compiling a model for their scoring is weighed against."""
    return users * sum(source_counts(config).values())


def with_stored_counts(config: CandidateConfig, params: dict) -> CandidateConfig:
    """`config` with the per-source counts a registered model was trained with (`params["candidates"]`, as
    the training flow stores them: measured on its validation weeks), so that a model is always served and
    evaluated on the candidates it learned from, with its history bands' counts when it has them (a model
    stored before the bands has one count per source for every user). The other fields (recent items,
    excluding consumed items) stay `config`'s, the Settings' of the run; a model stored without counts keeps
    `config` as it is."""
    stored = params.get("candidates") or {}
    if not stored:
        return config
    # Stored as JSON lists; a model stored before the bands existed has none: one count per source for all.
    bands = {
        "band_edges": tuple(int(e) for e in stored.get("band_edges") or ()),
        "band_counts": tuple(tuple(int(n) for n in counts) for counts in stored.get("band_counts") or ()),
    }
    return replace(config, **{source: int(stored[source]) for source in SOURCES if source in stored}, **bands)


def history_band(events: pl.Expr, edges: Sequence[int]) -> pl.Expr:
    """The band (0 first) of a history length `events`: how many of the ascending `edges` it reaches."""
    if not edges:
        return pl.lit(0, pl.Int32)
    return pl.sum_horizontal([(events >= edge).cast(pl.Int32) for edge in edges]).cast(pl.Int32)


def keep_band_counts(
    lists: dict[str, pl.DataFrame], user_features: pl.DataFrame, config: CandidateConfig
) -> dict[str, pl.DataFrame]:
    """Each source's list cut, user by user, to the count of the user's history band (`CandidateConfig.band_counts`,
    by `events_total` in `user_features`; a user without a row there has no history: the first band); `lists`
    as they are without bands."""
    if not config.band_counts:
        return lists
    band_of = user_features.select("user_id", history_band(pl.col("events_total"), config.band_edges).alias("band"))
    limits = pl.DataFrame(
        {"band": range(len(config.band_counts))}
        | {source: [counts[j] for counts in config.band_counts] for j, source in enumerate(SOURCES)},
        schema={"band": pl.Int32} | dict.fromkeys(SOURCES, pl.Int64),
    )
    per_user = {}
    for source, frame in lists.items():
        limit = (
            frame.select("user_id")
            .join(band_of, on="user_id", how="left", maintain_order="left")
            .with_columns(pl.col("band").fill_null(0))
            .join(limits.select("band", source), on="band", how="left", maintain_order="left")
            .get_column(source)
        )
        per_user[source] = frame.filter(frame.get_column(f"{source}_rank") <= limit)
    return per_user


def _ranked(frame: pl.DataFrame, score: str, source: str, limit: int, keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """Keep each user's top `limit` items by `score` (ties by item id), with the rank as a column."""
    rank = f"{source}_rank"
    return (
        # Cut to the top scores (ties kept) first: sorting every scored pair dominated the run time.
        frame.filter(pl.col(score).rank("min", descending=True).over("user_id") <= limit)
        .sort(["user_id", score, "item_id"], descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias(rank))
        .filter(pl.col(rank) <= limit)
        .select("user_id", "item_id", rank, *keep)
    )


_PAIR = (pl.col("user_id") * (1 << 31) + pl.col("item_id")).alias("pair")


def _packable(*frames: pl.DataFrame) -> bool:
    """Whether every (user_id, item_id) of `frames` is one distinct Int64 `_PAIR` (ids in [0, 2^31)): a join
    or lookup on that one integer costs polars ~60% of one on the two columns."""
    for frame in frames:
        if (
            frame.height
            and not frame.select(
                (pl.min_horizontal(pl.col("user_id", "item_id").min()) >= 0)
                & (pl.max_horizontal(pl.col("user_id", "item_id").max()) < (1 << 31))
            ).item()
        ):
            return False
    return True


def _exclude(frame: pl.DataFrame, consumed: pl.DataFrame | None) -> pl.DataFrame:
    if consumed is None:
        return frame
    if _packable(frame, consumed):
        return frame.filter(~_PAIR.is_in(consumed.select(_PAIR).to_series().implode()))
    return frame.join(consumed, on=["user_id", "item_id"], how="anti", maintain_order="left")


def take_unconsumed(
    ordered_items: pl.DataFrame, users: pl.DataFrame, limit: int, consumed: pl.DataFrame | None, rank: str
) -> pl.DataFrame:
    """Each user's first `limit` items of one global ordering (the rows of `ordered_items`) that
    the user has not consumed: (user_id, item_id, `rank`), rank 1 first."""
    positions = ordered_items.select("item_id").with_row_index("position")
    # A user who consumed e of the ordered items finds `limit` others within the first limit + e:
    # rows grow with users × limit + consumed pairs, never users × catalogue.
    skipped = (
        consumed.join(positions, on="item_id").group_by("user_id").agg(pl.len().alias("skipped"))
        if consumed is not None
        else pl.DataFrame(schema={"user_id": pl.Int64, "skipped": pl.UInt32})
    )
    depth = pl.min_horizontal(pl.lit(limit) + pl.col("skipped").fill_null(0), pl.lit(positions.height))
    return (
        users.join(skipped, on="user_id", how="left", maintain_order="left")
        .select("user_id", pl.int_ranges(0, depth, dtype=pl.UInt32).alias("position"))
        .explode("position")
        .join(positions, on="position", maintain_order="left")
        .pipe(_exclude, consumed)
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias(rank))
        .filter(pl.col(rank) <= limit)
        .select("user_id", "item_id", rank)
    )


def select_recent_items(history: pl.DataFrame, limit: int) -> pl.DataFrame:
    """Each user's `limit` most recent items: fewest days since the last event, then most events,
    then item id. Returns (user_id, item_id)."""
    return (
        history.sort(["user_id", "days_since_last_event", "events", "item_id"], descending=[False, False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(limit)
        .select("user_id", "item_id")
    )


def score_neighbours(
    recent: pl.DataFrame, neighbours: pl.DataFrame, consumed: pl.DataFrame | None, limit: int
) -> pl.DataFrame:
    """Each user's top `limit` unconsumed neighbours of their recent items, by summed score
    (ties by item id): (user_id, item_id, cooc_rank, cooc_score, cooc_count)."""
    return NeighbourScores.of(recent, neighbours).top(consumed, limit)


def neighbour_scores(recent: pl.DataFrame, neighbours: pl.DataFrame) -> pl.DataFrame:
    """Every item a neighbour of the users' `recent` items, with the summed neighbour scores and how many
    recent items link to it: (user_id, item_id, cooc_score, cooc_count); consumed items included."""
    return NeighbourScores.of(recent, neighbours).frame()


def _positions_in(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each of `values`' position in `ordered` (ascending, distinct), -1 where it is not there."""
    if not len(ordered):
        return np.full(len(values), -1)
    at = np.searchsorted(ordered, values).clip(max=len(ordered) - 1)
    return np.where(ordered[at] == values, at, -1)


@dataclass(frozen=True)
class PairIndex:
    """Distinct (user_id, item_id) pairs in order, each as one integer: the position of its user among
    `users` times the number of `items` plus the position of its item."""

    users: np.ndarray  # ascending
    items: np.ndarray  # ascending
    keys: np.ndarray  # ascending

    @staticmethod
    def encode(users: np.ndarray, items: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Each pair's key; -1 where its user or item is not among `users` / `items`."""
        rows, columns = _positions_in(users, user_ids), _positions_in(items, item_ids)
        return np.where((rows >= 0) & (columns >= 0), rows * len(items) + columns, -1)

    def positions(self, pairs: pl.DataFrame) -> np.ndarray:
        """Each of `pairs`' (user_id, item_id) position among the index's pairs, -1 where absent."""
        keys = self.encode(self.users, self.items, pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
        if not len(self.keys):
            return np.full(len(keys), -1)
        # Searched in ascending order: a million random searches cost 5× more (cache misses) than sorting them.
        order = np.argsort(keys)
        found = np.empty(len(keys), np.int64)
        found[order] = np.searchsorted(self.keys, keys[order])
        found = found.clip(max=len(self.keys) - 1)
        return np.where((keys >= 0) & (self.keys[found] == keys), found, -1)


@dataclass(frozen=True)
class NeighbourScores:
    """`neighbour_scores` kept as the sparse (users × items) product it is computed as: row r, column c holds
    the summed score and the count of user `users[r]`'s recent items linking to item `items[c]`. A batch
    reaches millions of such pairs of which each user keeps ~100 (`top`) and looks up ~200 (`lookup`):
    neither needs them as a frame."""

    users: np.ndarray  # row ids, ascending
    items: np.ndarray  # column ids, ascending
    indptr: np.ndarray  # CSR: row r's entries are [indptr[r], indptr[r + 1]), by ascending column
    columns: np.ndarray
    scores: np.ndarray  # rounded to 9 decimals, so that float summation order cannot reorder near-equal scores
    counts: np.ndarray  # int64; every neighbour score is positive, so the counts share the scores' entries

    @classmethod
    def of(cls, recent: pl.DataFrame, neighbours: pl.DataFrame) -> "NeighbourScores":
        """The product (users × recent items) · (items × neighbours): a polars group-by over every
        (user, recent item, neighbour) triple was over 20× slower."""
        # Only the neighbour lists of these users' recent items count (a batch's users reach a fraction of the
        # catalogue's lists); recent items without a list contribute nothing.
        neighbours = neighbours.join(recent.select("item_id").unique(), on="item_id", how="semi")
        sources = neighbours.get_column("item_id").unique().sort()
        targets = neighbours.get_column("neighbour_id").unique().sort()
        recent = recent.filter(pl.col("item_id").is_in(sources.implode()))
        users = recent.get_column("user_id").unique().sort()
        if users.is_empty():
            none = np.zeros(0, np.int64)
            return cls(none, none, np.zeros(1, np.int64), none, np.zeros(0), none)

        def positions(values: pl.Series, keys: pl.Series) -> np.ndarray:
            return np.searchsorted(keys.to_numpy(), values.to_numpy())  # every value is one of the keys

        def matrix(values: np.ndarray, rows: np.ndarray, columns: np.ndarray, shape: tuple[int, int]):
            product = sparse.csr_matrix((values, (rows, columns)), shape=shape)
            product.sort_indices()
            return product

        # Rows and columns in item id order, as the sums below then add their terms in the same order whatever
        # the batch.
        history = matrix(
            np.ones(recent.height),
            positions(recent["user_id"], users),
            positions(recent["item_id"], sources),
            (users.len(), sources.len()),
        )
        pair_rows = positions(neighbours["item_id"], sources)
        pair_columns = positions(neighbours["neighbour_id"], targets)
        shape = (sources.len(), targets.len())
        # The scores and the counts in one product: each link is score + 1j, so the real parts sum the scores
        # (1 · score, exactly, in the same order) and the imaginary parts count the links.
        linked = matrix(neighbours["score"].to_numpy() + 1j, pair_rows, pair_columns, shape)
        product = (history @ linked).tocsr()
        product.sort_indices()
        return cls(
            users.to_numpy(), targets.to_numpy(), product.indptr.astype(np.int64), product.indices.astype(np.int64),
            np.round(product.data.real, 9), product.data.imag.astype(np.int64),
        )  # fmt: skip

    @cached_property
    def _rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.users)), np.diff(self.indptr))

    @cached_property
    def _index(self) -> PairIndex:
        """The entries as (user, item) pairs: one number each, ascending as they are ordered by (row, column)."""
        return PairIndex(self.users, self.items, self._rows * len(self.items) + self.columns)

    def _pairs(self, entries: np.ndarray, **columns: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame(
            {"user_id": self.users[self._rows[entries]], "item_id": self.items[self.columns[entries]]} | columns
            | {"cooc_score": self.scores[entries], "cooc_count": self.counts[entries]},
            schema_overrides=NEIGHBOUR_SCORES,
        )  # fmt: skip

    def frame(self) -> pl.DataFrame:
        """Every pair: (user_id, item_id, cooc_score, cooc_count), by user then item."""
        return self._pairs(np.arange(len(self.columns)))

    def lookup(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """`pairs` with the cooc_score and cooc_count of their (user_id, item_id), null where no recent item
        links the user to the item."""
        entries = pl.Series(self._index.positions(pairs))
        values = pl.DataFrame({"cooc_score": self.scores, "cooc_count": self.counts})
        return pairs.with_columns(values.select(pl.all().gather(entries.replace(-1, None))))

    def top(self, consumed: pl.DataFrame | None, limit: int) -> pl.DataFrame:
        """Each user's top `limit` items not in `consumed`, by score then item id: (user_id, item_id,
        cooc_rank, cooc_score, cooc_count), by user then rank."""
        open_entries = np.ones(len(self.columns), bool)
        if consumed is not None and consumed.height:
            entries = self._index.positions(consumed)
            open_entries[entries[entries >= 0]] = False
        entries = np.flatnonzero(open_entries)
        chosen, ranks = top_in_rows(self._rows[entries], self.scores[entries], len(self.users), limit)
        return self._pairs(entries[chosen], cooc_rank=ranks)


NEIGHBOUR_SCORES = {"user_id": pl.Int64, "item_id": pl.Int64, "cooc_score": pl.Float64, "cooc_count": pl.Int64}


def top_in_rows(rows: np.ndarray, scores: np.ndarray, n_rows: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The `limit` highest `scores` of each row, earlier entries first among equal scores: their positions
    (by row, then rank) and ranks (1 first). `rows` must be ascending.

    Two passes over rows padded to a matrix instead of one sort of every entry: each row's `limit`-th score by
    partition, then a stable sort of the few entries at or above it.
    """

    def padded(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.bincount(rows, minlength=n_rows)
        starts = np.cumsum(counts) - counts
        matrix = np.full((n_rows, counts.max(initial=0)), np.inf)
        matrix[rows, np.arange(len(rows)) - starts[rows]] = -values  # ascending = best first; +inf pads
        return matrix, counts, starts

    if limit < 1 or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    matrix, counts, _ = padded(rows, scores)
    if matrix.shape[1] > limit:
        threshold = -np.partition(matrix, limit - 1, axis=1)[:, limit - 1]  # -inf where a row has fewer
        near = np.flatnonzero(scores >= threshold[rows])
    else:
        near = np.arange(len(rows))
    matrix, counts, starts = padded(rows[near], scores[near])
    order = np.argsort(matrix, axis=1, kind="stable")[:, :limit]
    row, rank = np.nonzero(np.arange(order.shape[1]) < np.minimum(counts, limit)[:, None])
    return near[starts[row] + order[row, rank]], rank.astype(np.int64) + 1


def select_collaborative(scores: pl.DataFrame, consumed: pl.DataFrame | None, limit: int) -> pl.DataFrame:
    """Each user's top `limit` items of the collaborative scores table by the better of their EASE and
    ALS ranks (ties by item id): (user_id, item_id, cf_rank)."""
    best = scores.select("user_id", "item_id", (-pl.min_horizontal("ease_rank", "als_rank")).alias("cf_score"))
    return _ranked(_exclude(best, consumed), "cf_score", "cf", limit)


SEQ_SCORES = {"seq_score": pl.Float64, "seq_last_share": pl.Float64, "seq_2step_share": pl.Float64}


def score_transitions(last_items: pl.DataFrame, transitions: pl.DataFrame | None) -> pl.DataFrame:
    """Per user and item reachable from the user's last items (`last_items`: user_id, item_id, position,
    1 = the last item) through `item_transitions`, by user then item:

    Shares are shrunk towards 0 for items with few transitions (`SEQ_PRIOR_TRANSITIONS`):

    - `seq_score`: the transition shares out of each last item, weighted 1/position;
    - `seq_last_share`: the share of the transition out of the last item alone;
    - `seq_2step_share`: the chance of reaching the item in two steps from the last item (over each
      item's `SEQ_TWO_STEP_FANOUT` best next items).

    Every score is 0 where there is no such path; consumed items are not removed here.
    """
    return SequenceScores.of(last_items, transitions).frame()


@dataclass(frozen=True)
class SequenceScores:
    """`score_transitions` kept as the sparse (users × items) sums it is computed as: the pair `index.keys[e]`
    has the scores of row e of `scores`. A batch reaches ≈1M such pairs of which each user keeps ~30 (`top`)
    and looks up ~200 (`lookup`): neither needs them as a frame."""

    index: PairIndex
    scores: pl.DataFrame  # SEQ_SCORES, rounded to 9 decimals so that summation order cannot reorder near-ties

    @classmethod
    def of(cls, last_items: pl.DataFrame, transitions: pl.DataFrame | None) -> "SequenceScores":
        """The sums as sparse products: (users × their last items at position p) · (items × next items) / p,
        added position by position, and (users × last item) · (items × best next items)² for two steps. A
        polars group-by over every (user, last item, next item) triple and a join of the two sums cost more."""
        none = np.zeros(0, np.int64)
        empty = cls(PairIndex(none, none, none), pl.DataFrame(schema=SEQ_SCORES))
        if transitions is None or transitions.is_empty() or last_items.is_empty():
            return empty
        # Only the transitions out of these users' last items and, for two steps, out of the last items' best
        # next items.
        best = pl.col("rank") <= SEQ_TWO_STEP_FANOUT
        out_of = pl.col("item_id").is_in
        last = last_items.get_column("item_id").implode()
        first = last_items.filter(pl.col("position") == 1).get_column("item_id").implode()
        between = transitions.filter(best & out_of(first)).get_column("next_item_id").implode()
        # score / share is the item's whole decayed weight out; the shrunk share adds the prior to it.
        shrunk = pl.col("score") / (pl.col("score") / pl.col("share") + SEQ_PRIOR_TRANSITIONS)
        steps = transitions.filter(out_of(last) | (best & out_of(between))).select(
            "item_id", "next_item_id", "rank", shrunk.alias("share")
        )
        items = np.unique(np.concatenate([steps["item_id"].to_numpy(), steps["next_item_id"].to_numpy()]))
        last_items = last_items.filter(pl.col("item_id").is_in(pl.Series(items).implode()))
        if last_items.is_empty():
            return empty
        users = np.unique(last_items["user_id"].to_numpy())
        user_rows = np.searchsorted(users, last_items["user_id"].to_numpy())
        item_columns = np.searchsorted(items, last_items["item_id"].to_numpy())
        positions = last_items["position"].to_numpy()

        def matrix(values: np.ndarray, rows: np.ndarray, columns: np.ndarray, n_rows: int):
            built = sparse.csr_matrix((values, (rows, columns)), shape=(n_rows, len(items)))
            built.sort_indices()
            return built

        def transition_matrix(frame: pl.DataFrame):
            rows, columns = (np.searchsorted(items, frame[c].to_numpy()) for c in ("item_id", "next_item_id"))
            return matrix(frame["share"].to_numpy(), rows, columns, len(items))

        def last_at(position: int):
            """users × items: 1 at each user's last item at `position`."""
            at = positions == position
            return matrix(np.ones(at.sum()), user_rows[at], item_columns[at], len(users))

        def product(left, right):
            result = (left @ right).tocsr()
            result.sort_indices()
            return result

        every, best_next = transition_matrix(steps), transition_matrix(steps.filter(best))
        direct = last_share = matrix(np.zeros(0), none, none, len(users))
        for position in np.unique(positions):
            paths = product(last_at(position), every)
            paths.data = paths.data / position  # share / position, as the weight is defined
            direct = direct + paths
            if position == 1:
                last_share = paths
        two_step = product(product(last_at(1), best_next), best_next)
        # Every share is positive (a transition weighs at least one unit): no sum cancels to 0, the pairs of
        # direct + two_step are those either reaches, and the last item's pairs are among the direct ones.
        reached = direct + two_step
        reached.sort_indices()

        def keys(sums) -> np.ndarray:
            return np.repeat(np.arange(len(users)), np.diff(sums.indptr)) * len(items) + sums.indices

        index = PairIndex(users, items, keys(reached))

        def spread(sums) -> np.ndarray:
            values = np.zeros(len(index.keys))
            values[np.searchsorted(index.keys, keys(sums))] = sums.data
            return values

        scores = pl.DataFrame(
            {"seq_score": spread(direct), "seq_last_share": spread(last_share), "seq_2step_share": spread(two_step)},
            schema=SEQ_SCORES,
        )
        return cls(index, scores.select(pl.all().round(9)))

    def _pairs(self, entries: np.ndarray) -> pl.DataFrame:
        n_items = max(len(self.index.items), 1)
        keys = self.index.keys[entries]
        return pl.DataFrame(
            {"user_id": self.index.users[keys // n_items], "item_id": self.index.items[keys % n_items]},
            schema={"user_id": pl.Int64, "item_id": pl.Int64},
        )

    def frame(self) -> pl.DataFrame:
        """Every pair: (user_id, item_id, *SEQ_SCORES), by user then item."""
        return self._pairs(np.arange(len(self.index.keys))).hstack(self.scores)

    def lookup(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """The SEQ_SCORES of each of `pairs`' (user_id, item_id), 0 where the user's last items reach no item."""
        at = self.index.positions(pairs)
        found = at >= 0
        values = {}
        for name in SEQ_SCORES:
            values[name] = np.zeros(len(at))
            values[name][found] = self.scores[name].to_numpy()[at[found]]
        return pl.DataFrame(values, schema=SEQ_SCORES)

    def top(self, consumed: pl.DataFrame | None, limit: int, min_score: float) -> pl.DataFrame:
        """Each user's top `limit` items not in `consumed` whose direct and two-step scores add up to at least
        `min_score`, by that sum then item id: (user_id, item_id, seq_rank), by user then rank."""
        rank_score = (self.scores["seq_score"] + self.scores["seq_2step_share"]).to_numpy()
        open_entries = rank_score >= min_score
        if consumed is not None and consumed.height:
            at = self.index.positions(consumed)
            open_entries[at[at >= 0]] = False
        entries = np.flatnonzero(open_entries)
        rows = self.index.keys[entries] // max(len(self.index.items), 1)
        chosen, ranks = top_in_rows(rows, rank_score[entries], len(self.index.users), limit)
        return self._pairs(entries[chosen]).with_columns(pl.Series("seq_rank", ranks, pl.Int64))


def select_last_items(history: pl.DataFrame, limit: int) -> pl.DataFrame:
    """Each user's `limit` last items (`select_recent_items`) with their position, 1 = the last one."""
    return select_recent_items(history, limit).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user_id").alias("position")
    )


@dataclass(frozen=True)
class UserSignals:
    """Scores of (user, item) pairs beyond any source's cut, consumed items included, that every candidate
    gets as features whichever source proposed it: `sequence` (`score_transitions` of the users' last
    items) and `neighbours` (`neighbour_scores` of their recent items)."""

    sequence: SequenceScores
    neighbours: "NeighbourScores"


def source_candidates(
    tables: SnapshotTables, users: pl.Series, config: CandidateConfig
) -> tuple[dict[str, pl.DataFrame], UserSignals]:
    """Every source's candidates for `users`, each (user_id, item_id, `<source>_rank`, and the source's
    scores), as many per user as `config` gives that source; and the users' `UserSignals`."""
    user_frame = pl.DataFrame({"user_id": users.cast(pl.Int64).unique().sort()})
    history = tables.user_item_history.join(user_frame, on="user_id")
    consumed = history.select("user_id", "item_id") if config.exclude_consumed else None
    items = tables.item_features

    linked = NeighbourScores.of(select_recent_items(history, config.recent_items), tables.item_neighbours)
    cooc = linked.top(consumed, config.cooc)

    pop = take_unconsumed(items.sort("popularity_rank_4w"), user_frame, config.pop, consumed, "pop_rank")
    new_items = items.filter(pl.col("days_since_release") < config.new_release_days)
    by_plays = new_items.sort(["plays_1w", "item_id"], descending=[True, False])
    new = take_unconsumed(by_plays, user_frame, config.new, consumed, "new_rank")

    def by_affinity(affinity: pl.DataFrame, column: str, source: str, limit: int) -> pl.DataFrame:
        favourite = (
            affinity.join(user_frame, on="user_id")
            .sort(["user_id", "share_12w", column], descending=[False, True, False])
            .group_by("user_id", maintain_order=True)
            .head(5)
        )
        per_key = (
            items.sort(["plays_4w", "item_id"], descending=[True, False])
            .group_by(column, maintain_order=True)
            # A user who consumed some of a category's top items gets fewer than `limit` from it.
            .head(limit)
            .select(column, "item_id", "plays_4w")
        )
        joined = (
            favourite.select("user_id", column, "share_12w")
            .join(per_key, on=column)
            .with_columns((pl.col("share_12w") * (pl.col("plays_4w") + 1).log()).alias(f"{source}_score"))
        )
        return _ranked(_exclude(joined, consumed), f"{source}_score", source, limit)

    category = by_affinity(tables.user_category_affinity, "category", "category", config.category)
    creator = by_affinity(tables.user_creator_affinity, "creator", "creator", config.creator)

    cf = select_collaborative(tables.collaborative_scores.join(user_frame, on="user_id"), consumed, config.cf)

    # Sequence: what follows the user's last items; ranked by the direct and two-step scores together.
    sequence = SequenceScores.of(select_last_items(history, LAST_ITEMS), tables.item_transitions)
    seq = sequence.top(consumed, config.seq, max(config.seq_min_score, 1e-12))
    lists = {"cooc": cooc, "pop": pop, "category": category, "creator": creator, "new": new, "cf": cf, "seq": seq}
    return lists, UserSignals(sequence, linked)


def generate_candidates(tables: SnapshotTables, users: pl.Series, config: CandidateConfig) -> pl.DataFrame:
    """Union of every source's candidates per user, tagged with each source's rank (null if absent), by user
    then item."""
    lists, signals = source_candidates(tables, users, config)
    merged = merge_sources(keep_band_counts(lists, tables.user_features, config))
    # Every candidate's co-occurrence scores (null: no neighbour path from the recent items) and sequence
    # scores (0: no path from the last items), whichever source proposed it and however many cooc gives.
    return signals.neighbours.lookup(merged).select(
        "user_id", "item_id", *[f"{s}_rank" for s in SOURCES], "cooc_score", "cooc_count", "n_sources"
    ).hstack(signals.sequence.lookup(merged))  # fmt: skip


def merge_sources(lists: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per (user_id, item_id) that any source proposed, by user then item, with each source's rank
    (null where it did not propose it) and `n_sources`. A source proposes a pair at most once."""
    tagged = pl.concat([lists[s].select("user_id", "item_id", pl.col(f"{s}_rank").alias("rank")) for s in SOURCES])
    users = tagged.get_column("user_id").unique().sort().to_numpy()
    items = tagged.get_column("item_id").unique().sort().to_numpy()
    keys = PairIndex.encode(users, items, tagged["user_id"].to_numpy(), tagged["item_id"].to_numpy())
    # One sort of one integer per proposal instead of a group-by on two columns.
    order = np.argsort(keys)
    ordered = keys[order]
    first = np.ones(len(ordered), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    pair_of = np.empty(len(keys), np.int64)
    pair_of[order] = np.cumsum(first) - 1
    pairs = ordered[first]
    ranks, start = {}, 0
    for source in SOURCES:
        end = start + lists[source].height
        rank = np.zeros(len(pairs), np.int64)
        proposed = np.zeros(len(pairs), bool)
        rank[pair_of[start:end]] = tagged["rank"].to_numpy()[start:end]
        proposed[pair_of[start:end]] = True
        ranks[f"{source}_rank"] = pl.Series(rank).scatter(np.flatnonzero(~proposed), None)
        start = end
    merged = pl.DataFrame(
        {"user_id": users[pairs // max(len(items), 1)], "item_id": items[pairs % max(len(items), 1)]}
        | ranks
        | {"n_sources": np.bincount(pair_of, minlength=len(pairs)).astype(np.uint32)},
        schema_overrides={"user_id": pl.Int64, "item_id": pl.Int64},
    )
    return merged


_USER_COLUMNS = [c for c in contracts.USER_FEATURES.column_names if c not in ("as_of", "user_id")]
_ITEM_COLUMNS = [
    c for c in contracts.ITEM_FEATURES.column_names if c not in ("as_of", "item_id", "category", "creator")
]
# Prefixed, because user and item tables share column names (days_since_first_event).
USER_FEATURE_COLUMNS = [f"user_{c}" for c in _USER_COLUMNS]
ITEM_FEATURE_COLUMNS = [f"item_{c}" for c in _ITEM_COLUMNS]
CANDIDATE_COLUMNS = [f"{s}_rank" for s in SOURCES] + ["cooc_score", "cooc_count", "n_sources"]
# EASE's and ALS's scores (collaborative_scores), their rank within the user's candidates and
# the score over the user's best candidate's; null where the item is not in that model's top list.
COLLABORATIVE_COLUMNS = [
    f"{model}_{column}" for model in ("ease", "als") for column in ("score", "candidate_rank", "score_vs_best")
]
# Scale-free popularity: raw counts swing with each week's traffic, shares and ranks do not.
ITEM_DERIVED_COLUMNS = ["item_share_1w", "item_share_4w", "item_share_total", "item_popularity_rank_total"]
USER_ITEM_COLUMNS = [
    "category_share_12w",
    "creator_share_12w",
    "creator_events_12w",
    "category_code",
    "cooc_score_vs_best",
    "popularity_vs_user",
    "release_age_vs_user",
]
# The ranker's starting score (training.ranker adds its trees to it): recent popularity,
# the best plain baseline. The weight sets how much evidence the trees need to reorder
# items: under LambdaRank's logistic pair loss the prior alone prefers an item with twice
# the plays at 4:1 odds (2^2).
PRIOR_FEATURE = "popularity_prior"
PRIOR_WEIGHT = 2.0
# What follows the user's last items (`score_transitions`), and how the candidate relates to them.
SEQUENCE_COLUMNS = [
    *SEQ_SCORES,
    "same_creator_as_last",
    "same_category_as_last",
    "last_items_creator_share",
]
FEATURE_NAMES = [
    *CANDIDATE_COLUMNS,
    *USER_FEATURE_COLUMNS,
    *ITEM_FEATURE_COLUMNS,
    *ITEM_DERIVED_COLUMNS,
    *USER_ITEM_COLUMNS,
    *COLLABORATIVE_COLUMNS,
    PRIOR_FEATURE,
    *SEQUENCE_COLUMNS,
]
CATEGORICAL_FEATURES = ["category_code"]
# Directions the ranker must respect (+1: more is better, -1: less is better). Popularity,
# co-occurrence and taste never hurt an item; with only a few hundred (user, week) groups
# (MovieLens) unconstrained trees learned noise and lost to plain recent popularity.
MONOTONE_FEATURES = {
    "pop_rank": -1,
    "cooc_score": 1,
    "item_plays_1w": 1,
    "item_plays_4w": 1,
    "item_plays_12w": 1,
    "item_plays_total": 1,
    "item_users_4w": 1,
    "item_users_total": 1,
    "item_popularity_rank_4w": -1,
    "item_share_1w": 1,
    "item_share_4w": 1,
    "item_share_total": 1,
    "item_popularity_rank_total": -1,
    "category_share_12w": 1,
    "ease_score": 1,
    "als_score": 1,
    PRIOR_FEATURE: 1,
    "seq_score": 1,
    "seq_last_share": 1,
    "seq_2step_share": 1,
}


def category_encoding(item_features: pl.DataFrame) -> list[str]:
    """The fixed, sorted category list whose positions are the codes the model sees."""
    return sorted(item_features.get_column("category").unique().to_list())


def add_features(tables: SnapshotTables, candidates: pl.DataFrame, categories: list[str]) -> pl.DataFrame:
    """Join user, item and user×item features onto candidate rows; unknown categories get null. The rows keep
    the candidates' order (`generate_candidates`: by user then item)."""
    codes = pl.DataFrame(
        {"category": categories, "category_code": range(len(categories))},
        schema={"category": pl.Utf8, "category_code": pl.Int32},
    )
    items = (
        _with_item_derived(tables.item_features)
        .select(
            "item_id",
            "category",
            "creator",
            *[pl.col(c).alias(f"item_{c}") for c in _ITEM_COLUMNS],
            *ITEM_DERIVED_COLUMNS,
            PRIOR_FEATURE,
            "log_popularity_rank",
            "log_release_age",
        )
        .join(codes, on="category", how="left", maintain_order="left")
    )
    users = candidates.select(pl.col("user_id").unique(maintain_order=True))
    last_items = _last_items_of(tables, users, items)
    per_user = (
        users.join(
            tables.user_features.select("user_id", *[pl.col(c).alias(f"user_{c}") for c in _USER_COLUMNS]),
            on="user_id",
            how="left",
            maintain_order="left",
        )
        .join(_user_tastes(tables, items), on="user_id", how="left", maintain_order="left")
        .join(_last_items(last_items), on="user_id", how="left", maintain_order="left")
    )

    def looked_up(keys: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
        """`table`'s other columns for each row of `keys`, null where it has none: one narrow join per table
        (each join of the growing frame copied every column joined so far)."""
        on = keys.columns
        return keys.join(table, on=on, how="left", maintain_order="left").drop(on)

    by_item = looked_up(candidates.select("item_id"), items)
    pairs = candidates.select("user_id", "item_id").hstack(by_item.select("category", "creator"))
    category_share = tables.user_category_affinity.select(
        "user_id", "category", pl.col("share_12w").alias("category_share_12w")
    )
    creator_share = tables.user_creator_affinity.select(
        "user_id",
        "creator",
        pl.col("share_12w").alias("creator_share_12w"),
        pl.col("events_12w").alias("creator_events_12w"),
    )
    collaborative = tables.collaborative_scores.select("user_id", "item_id", "ease_score", "als_score")
    return (
        pl.concat(
            [
                candidates,
                looked_up(candidates.select("user_id"), per_user),
                by_item,
                looked_up(pairs.select("user_id", "category"), category_share),
                looked_up(pairs.select("user_id", "creator"), creator_share),
                looked_up(pairs.select("user_id", "item_id"), collaborative),
                looked_up(pairs.select("user_id", "creator"), _last_items_creator_share(last_items)),
            ],
            how="horizontal",
        )
        .with_columns(
            *[
                pl.col(f"{m}_score")
                .rank("min", descending=True)
                .over("user_id")
                .cast(pl.Int64)
                .alias(f"{m}_candidate_rank")
                for m in ("ease", "als")
            ],
            # A user's scores grow with their history: relative to their best candidate they compare across users.
            *[
                pl.when(best > 0).then(pl.col(f"{m}_score") / best).alias(f"{m}_score_vs_best")  # null unless best > 0
                for m, best in ((m, pl.col(f"{m}_score").max().over("user_id")) for m in ("ease", "als"))
            ],
            pl.col("category_share_12w", "creator_share_12w", "last_items_creator_share").fill_null(0.0),
            pl.col("creator_events_12w").fill_null(0),
            _same_as_last("creator"),
            _same_as_last("category"),
            (pl.col("cooc_score") / pl.col("cooc_score").max().over("user_id")).alias("cooc_score_vs_best"),
            (pl.col("log_popularity_rank") - pl.col("user_log_popularity_rank")).alias("popularity_vs_user"),
            (pl.col("log_release_age") - pl.col("user_log_release_age")).alias("release_age_vs_user"),
        )
        .select("user_id", "item_id", *FEATURE_NAMES)
    )


def _same_as_last(column: str) -> pl.Expr:
    """1 when the candidate's `column` (creator, category) is the user's last item's, and known."""
    same = (pl.col(column) == pl.col(f"last_{column}")) & (pl.col(column) != UNKNOWN)
    return same.fill_null(False).cast(pl.Int32).alias(f"same_{column}_as_last")


def _last_items_of(tables: SnapshotTables, users: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """The last `LAST_ITEMS` items of `users`, with position and their creator and category."""
    history = tables.user_item_history.join(users, on="user_id", how="semi")
    return select_last_items(history, LAST_ITEMS).join(
        items.select("item_id", "category", "creator"), on="item_id", how="left"
    )


def _last_items(last_items: pl.DataFrame) -> pl.DataFrame:
    """Per user: the creator and category of the last item consumed (`last_creator`, `last_category`)."""
    last = last_items.filter(pl.col("position") == 1)
    return last.select("user_id", pl.col("creator").alias("last_creator"), pl.col("category").alias("last_category"))


def _last_items_creator_share(last_items: pl.DataFrame) -> pl.DataFrame:
    """Per (user, creator): the share of the user's last `LAST_ITEMS` items by that (known) creator."""
    return (
        last_items.filter(pl.col("creator") != UNKNOWN)
        .group_by("user_id", "creator")
        .agg((pl.len() / LAST_ITEMS).cast(pl.Float64).alias("last_items_creator_share"))
    )


def _with_item_derived(item_features: pl.DataFrame) -> pl.DataFrame:
    """Shares of all plays and the all-time popularity rank: comparable across weeks."""
    return item_features.with_columns(
        *[
            (pl.col(f"plays_{w}") / pl.col(f"plays_{w}").sum().clip(lower_bound=1)).alias(f"item_share_{w}")
            for w in ("1w", "4w", "total")
        ],
        pl.col("plays_total").rank("min", descending=True).cast(pl.Int64).alias("item_popularity_rank_total"),
        (PRIOR_WEIGHT * pl.col("plays_4w").log1p()).alias(PRIOR_FEATURE),
    ).with_columns(
        pl.col("item_popularity_rank_total").log().alias("log_popularity_rank"),
        pl.col("days_since_release").log1p().alias("log_release_age"),
    )


def _user_tastes(tables: SnapshotTables, items: pl.DataFrame) -> pl.DataFrame:
    """How mainstream and how new the items each user consumed were, on average (log scale).

    A float mean depends on the order it adds in: the rows are sorted first, so the means are the same
    bits whatever order the history was read in (Postgres promises none, nor does the join), and the same
    snapshot gives the same model."""
    return (
        tables.user_item_history.select("user_id", "item_id")
        .join(items.select("item_id", "log_popularity_rank", "log_release_age"), on="item_id")
        .sort("user_id", "item_id")
        .group_by("user_id")
        .agg(
            pl.col("log_popularity_rank").mean().alias("user_log_popularity_rank"),
            pl.col("log_release_age").mean().alias("user_log_release_age"),
        )
    )


def build_ranking_frame(
    tables: SnapshotTables, users: pl.Series, config: CandidateConfig, categories: list[str]
) -> pl.DataFrame:
    """Candidates for `users` with every model feature: the frame training and inference both score."""
    return add_features(tables, generate_candidates(tables, users, config), categories)
