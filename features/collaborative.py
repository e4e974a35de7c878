"""Classic collaborative-filtering recommenders: EASE and implicit ALS.

Both learn from one snapshot's `user_item_history` (the (user_id, item_id) pairs consumed
before as_of, read as a binary user×item matrix). `fit_ease`/`fit_als` fit once, with the
hyper-parameters of a `CollaborativeConfig`, and return a `FittedScorer` that scores any
batch of the snapshot's users: evaluation and serving fit once per snapshot, then score
in batches. It follows the baselines' contract: `recommend` returns (user_id, item_id,
rank), rank 1 first, at most k rows per user, items already consumed excluded unless
`exclude_consumed=False`, ties broken by item_id; `score` returns the same top-m lists with
their scores, (user_id, item_id, score, rank), for use as a candidate source or feature.

Users absent from the history (cold users) get no rows: fill them from a popularity
baseline if they need a list.
"""

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.linalg
from scipy import sparse
from threadpoolctl import threadpool_limits

from features.contracts import require_columns
from recsys.settings import default_of

USER, ITEM, SCORE, RANK = "user_id", "item_id", "score", "rank"
# Dense score cells computed at once (users in a block × items): 16 MB of float32 (ALS) or 32 MB of
# float64 (EASE). Each cell is read a few times (consumed items masked, partitioned, compared), so
# a smaller block is both lighter and faster; a few hundred blocks cost little Python.
_SCORE_CELLS = 1 << 22
# A block's m-th best scores are first bounded from below by the m-th best of every _BOUND_STRIDE-th item
# (a subset's m-th best is never above the whole row's), which partitions a quarter of the row instead of all
# of it; used while that subset holds at least _BOUND_MIN_DEPTHS × m items.
_BOUND_STRIDE, _BOUND_MIN_DEPTHS = 4, 4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollaborativeConfig:
    """EASE's and ALS's hyper-parameters, EASE's memory bound, the seed and threads.

    Defaults are the Settings' (`RECSYS_EASE_L2`, …, `RECSYS_SEED`, `RECSYS_NUM_THREADS`); the
    flows build it from their settings (`flows.configs.collaborative_config`).
    """

    ease_l2: float = default_of("ease_l2")
    ease_max_items: int = default_of("ease_max_items")  # EASE holds a dense 8·n² bytes matrix: see Settings
    als_factors: int = default_of("als_factors")
    als_regularization: float = default_of("als_regularization")
    als_iterations: int = default_of("als_iterations")
    als_alpha: float = default_of("als_alpha")
    als_seeds: int = default_of("als_seeds")
    seed: int = default_of("seed")
    threads: int = default_of("num_threads")


def fit_ease(history: pl.DataFrame, config: CollaborativeConfig) -> "FittedScorer":
    """EASE (Steck 2019) fitted once on one snapshot's history, to score any of its users.

    B = I - P / diag(P) with P = (XᵀX + l2·I)⁻¹ and diag(B) = 0; a user's scores are x_u·B.
    Memory grows with the square of the catalogue n: one dense float64 n×n matrix, 8·n²
    bytes (n = 10 000: 0.8 GB; 20 000: 3.2 GB), briefly up to twice that while the sparse
    co-occurrence counts are made dense. Larger catalogues are restricted to the
    `config.ease_max_items` items consumed by the most users (ties by item_id); the others
    are neither learned from nor recommended.
    """
    l2, max_items = config.ease_l2, config.ease_max_items
    _require_positive(ease_l2=l2, ease_max_items=max_items)
    started = time.perf_counter()
    matrix = _build_interactions(history, max_items=max_items)
    x = matrix.user_items
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    # The Gram matrix is symmetric: its transpose is a Fortran-ordered view that LAPACK inverts in place.
    weights = scipy.linalg.inv(gram.T, overwrite_a=True, check_finite=False)
    weights /= -np.diag(weights)
    weights[np.diag_indices_from(weights)] = 0.0
    log.info(
        "ease: %d users × %d items (of %d), l2 %g: fit %.2fs",
        x.shape[0], x.shape[1], matrix.catalogue, l2, time.perf_counter() - started,
    )  # fmt: skip
    return FittedScorer("ease", matrix, lambda rows: x[rows] @ weights, threads=config.threads)


def fit_als(history: pl.DataFrame, config: CollaborativeConfig) -> "FittedScorer":
    """implicit's AlternatingLeastSquares (CPU) fitted once on one snapshot's history.

    Every consumed pair has confidence `alpha`; a score is the dot product of the user's
    and the item's factors. With `als_seeds` > 1, that many fits from seeds seed, seed+1, ...
    and the mean of their scores: ALS's random start moves its lists, and the ranker's
    features and candidates with them. The same seed and data give the same factors for any
    `threads` (each user's and item's solve is independent); BLAS runs on one thread during
    the fit. Memory: (users + items) × factors × als_seeds float32, plus the sparse history.
    """
    from implicit.cpu.als import AlternatingLeastSquares  # heavy import, only when asked for

    _require_positive(
        als_factors=config.als_factors, als_iterations=config.als_iterations, als_alpha=config.als_alpha,
        als_seeds=config.als_seeds, threads=config.threads,
    )  # fmt: skip
    if config.als_regularization < 0:
        raise ValueError(f"als_regularization must be >= 0, got {config.als_regularization}")
    started = time.perf_counter()
    matrix = _build_interactions(history, max_items=None, dtype=np.float32)
    users, items = [], []
    # Every pair's confidence, alpha, set in place for the fits (implicit scales a copy of the matrix when its
    # own alpha is not 1: a third copy beside the matrix and its transpose; the float32 values are the same).
    matrix.user_items.data[:] = np.float32(config.als_alpha)
    with threadpool_limits(1, "blas"):
        for seed in range(config.seed, config.seed + config.als_seeds):
            model = AlternatingLeastSquares(
                factors=config.als_factors, regularization=config.als_regularization, alpha=1.0,
                iterations=config.als_iterations, random_state=seed, num_threads=config.threads,
            )  # fmt: skip
            model.fit(matrix.user_items, show_progress=False)
            users.append(model.user_factors)
            items.append(model.item_factors)
    matrix.user_items.data[:] = 1  # binary again
    # The seeds' mean score in one product: [U_1 … U_n]·[V_1 … V_n]ᵀ / n. The items' factors are kept
    # transposed and contiguous: a block's product is then 3× cheaper for single-threaded BLAS.
    user_factors, item_factors = np.hstack(users) / config.als_seeds, np.ascontiguousarray(np.hstack(items).T)
    log.info(
        "als: %d users × %d items, %d factors, %d iterations, %d seed(s): fit %.2fs",
        *matrix.user_items.shape, config.als_factors, config.als_iterations, config.als_seeds,
        time.perf_counter() - started,
    )  # fmt: skip
    return als_scorer(matrix, user_factors, item_factors, threads=config.threads)


def als_scorer(
    matrix: "_Interactions", user_factors: np.ndarray, item_factors: np.ndarray, *, threads: int
) -> "FittedScorer":
    """ALS's scorer from its factors: `user_factors` (users × f) rows follow `matrix.user_ids`, `item_factors`
    (f × items, contiguous) columns follow `matrix.item_ids`; a score is their dot product."""
    return FittedScorer(
        "als", matrix, lambda rows: user_factors[rows] @ item_factors, threads=threads,
        factors=(user_factors, item_factors),
    )  # fmt: skip


def als_from_factors(
    user_ids: np.ndarray,
    user_factors: np.ndarray,
    item_ids: np.ndarray,
    item_factors: np.ndarray,
    consumed: pl.DataFrame,
    *,
    threads: int,
) -> "FittedScorer":
    """The ALS scorer of the users `user_ids` (ascending, their factors the rows of `user_factors`) over the
    items `item_ids` (ascending, their factors the rows of `item_factors`), as `fit_als` made it: `consumed`
    holds (at least) those users' (user_id, item_id) history pairs, which their lists exclude.

    The scores are those of the fitted model up to the last bits of float32: a block's product depends on
    which users share the block, so a user scored in another batch may differ by an ulp (and tied ranks swap)."""
    require_columns(consumed.columns, (USER, ITEM), "consumed")
    if user_factors.shape[0] != user_ids.size or item_factors.shape[0] != item_ids.size:
        raise ValueError(
            f"als factors: {user_factors.shape[0]} user rows for {user_ids.size} users and "
            f"{item_factors.shape[0]} item rows for {item_ids.size} items"
        )
    if user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError(f"als factors: users have {user_factors.shape[1]} factors, items {item_factors.shape[1]}")
    pairs = consumed.select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64)).unique()
    pairs = pairs.filter(pl.col(USER).is_in(user_ids) & pl.col(ITEM).is_in(item_ids))
    rows, cols = _positions(pairs[USER], user_ids), _positions(pairs[ITEM], item_ids)
    shape = (user_ids.size, item_ids.size)
    matrix = _Interactions(sparse.csr_matrix((np.ones(pairs.height), (rows, cols)), shape=shape), user_ids, item_ids,
                           item_ids.size)  # fmt: skip
    return als_scorer(matrix, user_factors, np.ascontiguousarray(item_factors.T), threads=threads)


def encode_factors(factors: np.ndarray) -> pl.Series:
    """Each row of a float32 matrix as the hex of its little-endian bytes (what the factor tables store)."""
    rows = np.ascontiguousarray(factors, dtype="<f4")
    width = rows.shape[1] * 4
    if not width:
        raise ValueError("encode_factors: no factors")
    if not np.isfinite(rows).all():
        raise ValueError(f"encode_factors: {int((~np.isfinite(rows)).any(axis=1).sum())} rows hold NaN or inf")
    as_bytes = np.frombuffer(rows.tobytes(), dtype=f"V{width}").tolist() if rows.shape[0] else []
    return pl.Series("factors", as_bytes, dtype=pl.Binary).bin.encode("hex")


def decode_factors(encoded: pl.Series, what: str) -> np.ndarray:
    """The float32 matrix of `encode_factors`' hex strings; names `what` when they are not factors of one width."""
    if encoded.null_count():
        raise ValueError(f"{what}: {encoded.null_count()} rows have no factors")
    if not encoded.len():
        return np.zeros((0, 0), dtype=np.float32)
    lengths = encoded.str.len_bytes().unique()
    if lengths.len() != 1 or lengths[0] % 8:
        raise ValueError(f"{what}: factors of {sorted(lengths.to_list())} hex digits; expected one width of 8·f")
    try:
        raw = b"".join(encoded.str.decode("hex").to_list())
    except pl.exceptions.ComputeError as error:
        raise ValueError(f"{what}: factors are not hex: {error}") from error
    return np.frombuffer(raw, dtype="<f4").reshape(encoded.len(), lengths[0] // 8).astype(np.float32)


def count_items(history: pl.DataFrame) -> int:
    """Distinct items in a snapshot's history: the n of EASE's n×n memory (8·n² bytes)."""
    require_columns(history.columns, (ITEM,), "history")
    return history.get_column(ITEM).n_unique()


@dataclass(frozen=True)
class _Interactions:
    """Binary user×item matrix; rows follow `user_ids`, columns `item_ids` (both ascending)."""

    user_items: sparse.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    catalogue: int  # distinct items in the history, before any restriction


@dataclass(frozen=True)
class FittedScorer:
    """A collaborative model fitted on one snapshot: scores any of the users it learned from, in blocks of
    users on `threads` threads (each block's product on one BLAS thread: the same scores for any `threads`)."""

    name: str
    matrix: _Interactions
    scores_of: Callable[[np.ndarray], np.ndarray]  # matrix rows -> a new dense array of scores over matrix.item_ids
    threads: int = 1
    factors: tuple[np.ndarray, np.ndarray] | None = None  # ALS: (users × f, f × items), as scores_of uses them

    def score(self, users: pl.Series | Sequence[int], m: int, *, exclude_consumed: bool = True) -> pl.DataFrame:
        """Top-m (user_id, item_id, score, rank) of each known user in `users`; cold users get no rows."""
        _require_positive(m=m)
        started = time.perf_counter()
        scored = _score_top(self.matrix, users, m, self.scores_of, exclude_consumed, threads=self.threads)
        log.info("%s: scored %d users in %.2fs", self.name, scored[USER].n_unique(), time.perf_counter() - started)
        return scored

    def recommend(self, users: pl.Series | Sequence[int], k: int, *, exclude_consumed: bool = True) -> pl.DataFrame:
        """Top-k (user_id, item_id, rank) of each known user in `users`."""
        return self.score(users, k, exclude_consumed=exclude_consumed).select(USER, ITEM, RANK)


def _build_interactions(history: pl.DataFrame, *, max_items: int | None, dtype: type = np.float64) -> _Interactions:
    """The binary user × item matrix of `history`'s (user_id, item_id) pairs, in `dtype` (EASE's products are
    float64, implicit's ALS takes float32). Rows and columns are found by binary search in the sorted ids and
    a pair that repeats counts once, so at a million users the matrix costs its own CSR arrays and two uint32
    positions per pair, not a distinct copy of the pairs and a float64 COO beside it."""
    require_columns(history.columns, (USER, ITEM), "history")
    if "as_of" in history.columns and history["as_of"].n_unique() > 1:
        raise ValueError(f"history: holds {history['as_of'].n_unique()} as_of snapshots; pass one snapshot")
    pairs = history.select(pl.col(USER).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64))
    if pairs.is_empty():
        raise ValueError("history: no (user_id, item_id) pairs to learn from")
    item_ids = pairs[ITEM].unique().sort()
    catalogue = item_ids.len()
    if max_items is not None and catalogue > max_items:
        popularity = pairs.unique().group_by(ITEM).agg(users=pl.len())
        kept = popularity.sort("users", ITEM, descending=[True, False]).head(max_items)
        pairs = pairs.join(kept, on=ITEM, how="semi")
        item_ids = kept[ITEM].sort()
    user_ids = pairs[USER].unique().sort()
    rows, cols = _positions(pairs[USER], user_ids), _positions(pairs[ITEM], item_ids)
    shape = (user_ids.len(), item_ids.len())
    user_items = sparse.csr_matrix((np.ones(pairs.height, dtype=dtype), (rows, cols)), shape=shape)
    del rows, cols
    user_items.sum_duplicates()
    user_items.data[:] = 1  # binary: a repeated pair summed to more
    return _Interactions(user_items, user_ids.to_numpy(), item_ids.to_numpy(), catalogue)


def _positions(values: pl.Series, sorted_ids: pl.Series | np.ndarray) -> np.ndarray:
    """Index of each value in `sorted_ids`, which holds every value (uint32: polars' index type)."""
    ids = sorted_ids if isinstance(sorted_ids, pl.Series) else pl.Series(values=sorted_ids)
    return ids.search_sorted(values, side="left").to_numpy()


def _score_top(
    matrix: _Interactions,
    users: pl.Series | Sequence[int],
    m: int,
    scores_of: Callable[[np.ndarray], np.ndarray],
    exclude_consumed: bool,
    *,
    threads: int = 1,
) -> pl.DataFrame:
    """Each known user's m best-scored items, by score descending then item_id. Blocks of users are scored
    on `threads` threads, each block's product on one BLAS thread, so the result does not depend on them."""
    wanted = np.unique(pl.Series(values=users, dtype=pl.Int64).drop_nulls().to_numpy())
    rows = np.searchsorted(matrix.user_ids, wanted[np.isin(wanted, matrix.user_ids)])
    batch = max(1, _SCORE_CELLS // matrix.item_ids.size)

    def top_of(block: np.ndarray) -> pl.DataFrame:
        # A fresh array (safe to overwrite) in the model's own precision: float32 for ALS.
        scores = scores_of(block)
        if exclude_consumed:
            consumed = matrix.user_items[block].tocoo()
            scores[consumed.row, consumed.col] = -np.inf
        return _top_of_block(scores, matrix.user_ids[block], matrix.item_ids, m)

    blocks = [rows[start : start + batch] for start in range(0, rows.size, batch)]
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(max(1, min(threads, len(blocks) or 1))) as pool:
        parts = [_empty_scores(), *pool.map(top_of, blocks)]
    return pl.concat(parts).sort(USER, RANK)


def _top_of_block(scores: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray, m: int) -> pl.DataFrame:
    n = scores.shape[1]
    depth = min(m, n)
    # Every item scoring at least a lower bound of the m-th best score keeps its place, ties included: the
    # exact sort below then ranks them and breaks ties by item_id, whatever order the partition left them in.
    subset = scores[:, ::_BOUND_STRIDE] if n // _BOUND_STRIDE >= _BOUND_MIN_DEPTHS * depth else scores
    width = subset.shape[1]
    threshold = np.partition(subset, width - depth, axis=1)[:, width - depth]
    kept = np.flatnonzero(scores >= threshold[:, None])
    row, col = np.divmod(kept, n)
    values = scores.ravel()[kept]
    finite = np.isfinite(values)  # consumed items (-inf) pass when a user has fewer than m others
    row, col, values = row[finite], col[finite], values[finite]
    candidates = pl.DataFrame(
        {USER: user_ids[row], ITEM: item_ids[col], SCORE: values.astype(np.float64)},
        schema={USER: pl.Int64, ITEM: pl.Int64, SCORE: pl.Float64},
    )
    return (
        candidates.sort(USER, SCORE, ITEM, descending=[False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(USER).alias(RANK))
        .filter(pl.col(RANK) <= m)
    )


def _empty_scores() -> pl.DataFrame:
    return pl.DataFrame(schema={USER: pl.Int64, ITEM: pl.Int64, SCORE: pl.Float64, RANK: pl.Int64})


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
