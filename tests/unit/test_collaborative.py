from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from features.collaborative import (
    CollaborativeConfig,
    als_from_factors,
    decode_factors,
    encode_factors,
    fit_als,
    fit_ease,
)

# Users 1-3 consume items 1 and 2 together; users 5-8 consume items 3 and 4 together (more
# popular); user 4 has consumed only item 1, so item 2 is the one that goes with it.
HISTORY = pl.DataFrame(
    {
        "user_id": [1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8],
        "item_id": [1, 2, 1, 2, 1, 2, 1, 3, 4, 3, 4, 3, 4, 3, 4],
    }
)
EASE = CollaborativeConfig(ease_l2=1.0)
ALS = CollaborativeConfig(als_factors=4, als_iterations=5, als_regularization=0.01, als_alpha=10.0)


def lists(recs: pl.DataFrame) -> dict[int, list[int]]:
    ordered = recs.sort("user_id", "rank")
    return {u: g["item_id"].to_list() for (u,), g in ordered.group_by("user_id", maintain_order=True)}


def test_ease_scores_equal_a_direct_numpy_computation_of_the_closed_form():
    history = pl.DataFrame({"user_id": [1, 1, 2, 2, 2, 3, 3, 4], "item_id": [10, 20, 10, 30, 40, 20, 30, 40]})
    l2 = 0.5
    x = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=float)
    p = np.linalg.inv(x.T @ x + l2 * np.eye(4))
    b = np.eye(4) - p / np.diag(p)
    expected = x @ b

    scored = fit_ease(history, CollaborativeConfig(ease_l2=l2)).score([1, 2, 3, 4], 4, exclude_consumed=False)

    got = np.zeros((4, 4))
    for row in scored.iter_rows(named=True):
        got[row["user_id"] - 1, row["item_id"] // 10 - 1] = row["score"]
    assert scored.height == 16
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_ease_recommends_the_item_co_consumed_with_the_users_items_over_a_more_popular_one():
    assert lists(fit_ease(HISTORY, EASE).recommend([4], 1)) == {4: [2]}


def test_ease_never_recommends_consumed_items():
    recs = fit_ease(HISTORY, EASE).recommend([1, 4, 5], 10)
    assert recs.join(HISTORY, on=["user_id", "item_id"], how="semi").is_empty()
    assert lists(recs)[1] == [3, 4]


def test_ease_keeps_consumed_items_when_exclusion_is_off():
    recs = fit_ease(HISTORY, EASE).recommend([4], 4, exclude_consumed=False)
    assert sorted(lists(recs)[4]) == [1, 2, 3, 4]


def test_ease_breaks_equal_scores_by_item_id():
    # Item 9 co-occurs with nothing: user 1's scores for every other item are all zero.
    history = pl.DataFrame({"user_id": [1, 2, 2, 3, 3, 4], "item_id": [9, 30, 10, 30, 20, 40]})
    scored = fit_ease(history, CollaborativeConfig()).score([1], 2)
    assert scored["score"].to_list() == [0.0, 0.0]
    assert lists(scored) == {1: [10, 20]}


def test_ease_returns_rank_one_first_and_the_contract_columns():
    recs = fit_ease(HISTORY, EASE).recommend([1, 4], 2)
    assert recs.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64, "rank": pl.Int64})
    assert recs["rank"].to_list() == [1, 2, 1, 2]
    scored = fit_ease(HISTORY, EASE).score([4], 3)
    assert scored.columns == ["user_id", "item_id", "score", "rank"]
    assert scored["score"].is_sorted(descending=True)


def test_ease_restricts_to_the_max_items_most_popular_items_ties_by_item_id():
    # Consumed by 3, 2, 2 and 1 users: items 1 and 2 are kept (2 wins the tie with 3).
    history = pl.DataFrame({"user_id": [1, 2, 3, 1, 2, 3, 4, 5], "item_id": [1, 1, 1, 2, 2, 3, 3, 5]})
    recs = fit_ease(history, CollaborativeConfig(ease_l2=1.0, ease_max_items=2)).recommend([3, 4, 5], 5)
    assert lists(recs) == {3: [2]}  # users 4 and 5 consumed only dropped items: no rows


def test_ease_users_without_history_get_no_rows():
    recs = fit_ease(HISTORY, EASE).recommend([4, 99], 2)
    assert recs["user_id"].unique().to_list() == [4]


def test_ease_for_no_users_is_an_empty_frame_with_the_contract_columns():
    recs = fit_ease(HISTORY, CollaborativeConfig()).recommend([], 3)
    assert recs.is_empty() and recs.columns == ["user_id", "item_id", "rank"]


def test_ease_does_not_modify_the_history():
    history = HISTORY.with_columns(pl.col("user_id").cast(pl.Int32))
    before = history.clone()
    fit_ease(history, CollaborativeConfig()).recommend([1, 4], 2)
    assert history.equals(before)


@pytest.mark.parametrize("options", [{"ease_l2": 0.0}, {"ease_max_items": 0}])
def test_ease_rejects_non_positive_settings(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        fit_ease(HISTORY, CollaborativeConfig(**options))


def test_collaborative_recommenders_reject_k_below_one():
    with pytest.raises(ValueError, match="must be > 0"):
        fit_ease(HISTORY, EASE).recommend([1], 0)


def test_collaborative_recommenders_reject_a_history_of_several_snapshots():
    history = HISTORY.with_columns(as_of=pl.Series([1, 2] * 7 + [1]))
    with pytest.raises(ValueError, match="2 as_of snapshots"):
        fit_ease(history, EASE)


def test_collaborative_recommenders_reject_an_empty_history():
    with pytest.raises(ValueError, match="no \\(user_id, item_id\\) pairs"):
        fit_ease(HISTORY.clear(), EASE)


def test_collaborative_recommenders_name_missing_history_columns():
    with pytest.raises(ValueError, match="missing columns \\['item_id'\\]"):
        fit_ease(HISTORY.select("user_id"), EASE)


def test_als_returns_k_unconsumed_items_per_user():
    recs = fit_als(HISTORY, ALS).recommend([1, 4, 5], 2)
    assert recs.group_by("user_id").len().sort("user_id")["len"].to_list() == [2, 2, 2]
    assert recs.join(HISTORY, on=["user_id", "item_id"], how="semi").is_empty()


def test_als_is_deterministic_for_a_fixed_seed():
    first = fit_als(HISTORY, replace(ALS, seed=7)).score([1, 4, 5], 3)
    again = fit_als(HISTORY, replace(ALS, seed=7)).score([1, 4, 5], 3)
    assert first.equals(again)


def test_als_gives_the_same_scores_on_one_thread_and_on_two():
    one = fit_als(HISTORY, replace(ALS, threads=1)).score([1, 4, 5], 3)
    two = fit_als(HISTORY, replace(ALS, threads=2)).score([1, 4, 5], 3)
    assert one.equals(two)


def test_als_ranks_the_co_consumed_item_first():
    assert lists(fit_als(HISTORY, ALS).recommend([4], 1)) == {4: [2]}


def test_als_over_several_seeds_scores_the_mean_of_each_seeds_fit():
    users = [1, 2, 3, 4, 5]
    averaged = fit_als(HISTORY, replace(ALS, seed=7, als_seeds=3)).score(users, 3, exclude_consumed=False)
    each = [fit_als(HISTORY, replace(ALS, seed=s)).score(users, 6, exclude_consumed=False) for s in (7, 8, 9)]
    mean = pl.concat(each).group_by("user_id", "item_id").agg(pl.col("score").mean())
    joined = averaged.join(mean, on=["user_id", "item_id"], suffix="_mean")
    assert joined.height == averaged.height == 15
    assert joined["score"].to_numpy() == pytest.approx(joined["score_mean"].to_numpy(), rel=1e-5, abs=1e-6)
    # One seed is the plain fit.
    assert fit_als(HISTORY, replace(ALS, als_seeds=1)).score(users, 3).equals(fit_als(HISTORY, ALS).score(users, 3))


def test_als_needs_at_least_one_seed():
    with pytest.raises(ValueError, match="als_seeds must be > 0, got 0"):
        fit_als(HISTORY, replace(ALS, als_seeds=0))


# The block scoring (`_score_top`) against the plain definition: every known user's m best unconsumed
# items by score descending, ties by item_id; on grids of few distinct scores (many ties), with users who
# consumed every item or all but a few, catalogues below and above the bounded partition's threshold,
# several blocks per call and several threads.
def reference_top(scores: np.ndarray, consumed: np.ndarray, user_ids, item_ids, m: int) -> pl.DataFrame:
    rows = []
    for r, user in enumerate(user_ids):
        ranked = sorted(
            ((-scores[r, c], item_ids[c], c) for c in range(scores.shape[1]) if not consumed[r, c]), key=lambda t: t[:2]
        )
        rows += [(user, item, float(scores[r, c]), rank) for rank, (_, item, c) in enumerate(ranked[:m], start=1)]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "score": pl.Float64, "rank": pl.Int64},
                        orient="row")  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    users=st.integers(1, 12),
    items=st.sampled_from([1, 3, 17, 64, 203]),
    levels=st.integers(1, 6),
    m=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    cells=st.sampled_from([64, 1 << 22]),
    threads=st.integers(1, 3),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_block_top_m_equals_the_plain_sort(users, items, levels, m, seed, cells, threads, dtype):
    from scipy import sparse

    from features import collaborative as cf

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (users, items)).astype(dtype) / 4
    consumed = rng.random((users, items)) < rng.choice([0.0, 0.3, 0.97, 1.0], size=(users, 1))
    user_ids = np.sort(rng.choice(10_000, users, replace=False))
    item_ids = np.sort(rng.choice(10_000, items, replace=False))
    matrix = cf._Interactions(sparse.csr_matrix(consumed.astype(float)), user_ids, item_ids, items)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cf, "_SCORE_CELLS", cells)
        got = cf._score_top(matrix, pl.Series(user_ids), m, lambda rows: scores[rows].copy(), True, threads=threads)
    assert got.equals(reference_top(scores, consumed, user_ids, item_ids, m))


def test_block_top_m_bounds_its_partition_on_large_catalogues():
    """Above _BOUND_MIN_DEPTHS × _BOUND_STRIDE × m items the first pass partitions a subset of the items; the
    lists still equal the plain sort, here with the best items all outside that subset."""
    from scipy import sparse

    from features import collaborative as cf

    items, m = cf._BOUND_MIN_DEPTHS * cf._BOUND_STRIDE * 5 + 3, 5
    scores = np.zeros((2, items))
    # The bounding subset (every stride-th item from the first) holds zeros; the best items lie between.
    scores[:, 1 :: cf._BOUND_STRIDE] = np.arange(items)[1 :: cf._BOUND_STRIDE]
    consumed = np.zeros_like(scores, dtype=bool)
    ids = np.arange(items)
    matrix = cf._Interactions(sparse.csr_matrix((2, items)), np.array([1, 2]), ids, items)
    got = cf._score_top(matrix, pl.Series([1, 2]), m, lambda rows: scores[rows].copy(), True)
    assert got.equals(reference_top(scores, consumed, [1, 2], ids, m))
    assert got.filter(pl.col("user_id") == 1)["item_id"].to_list() == list(range(1, items, cf._BOUND_STRIDE))[::-1][:m]


# --- ALS kept as factors (the feature store's als_user_factors / als_item_factors) ---


def als_of_factors(model, users=None, consumed=HISTORY, threads=1):
    """`model`'s ALS rebuilt from its factors as stored (encoded, decoded), for `users` (default: all)."""
    user_factors, item_factors = model.factors
    rows = np.arange(model.matrix.user_ids.size) if users is None else np.searchsorted(model.matrix.user_ids, users)
    return als_from_factors(
        model.matrix.user_ids[rows], decode_factors(encode_factors(user_factors[rows]), "users"),
        model.matrix.item_ids, decode_factors(encode_factors(item_factors.T), "items"), consumed, threads=threads,
    )  # fmt: skip


def test_factors_survive_their_hex_encoding_bit_for_bit():
    factors = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    factors[0, 0], factors[1] = -0.0, np.float32(1e-40)  # signed zero and a subnormal
    encoded = encode_factors(factors)
    assert encoded.dtype == pl.Utf8 and encoded.str.len_bytes().to_list() == [40] * 6
    assert decode_factors(encoded, "x").tobytes() == factors.tobytes()
    assert decode_factors(encode_factors(np.zeros((0, 3), np.float32)), "x").shape == (0, 0)


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (["00000000", None], "1 rows have no factors"),
        (["00000000", "0000000000000000"], r"factors of \[8, 16\] hex digits"),
        (["0000000"], r"factors of \[7\] hex digits"),
        (["zz000000"], "factors are not hex"),
    ],
)
def test_stored_factors_that_are_not_one_width_of_float32_hex_are_refused_by_name(encoded, message):
    with pytest.raises(ValueError, match=f"als_user_factors: {message}"):
        decode_factors(pl.Series(encoded, dtype=pl.Utf8), "als_user_factors")


def test_non_finite_factors_are_never_encoded():
    with pytest.raises(ValueError, match="1 rows hold NaN or inf"):
        encode_factors(np.array([[0.0, np.nan], [1.0, 2.0]], np.float32))


def test_als_from_its_stored_factors_gives_the_fitted_models_lists_bit_for_bit():
    model = fit_als(HISTORY, ALS)
    users = HISTORY["user_id"].unique()
    assert_frame_equal(als_of_factors(model).score(users, 3), model.score(users, 3))


def test_als_from_the_factors_of_some_users_scores_them_as_the_fitted_model_up_to_float32_rounding():
    history = pl.DataFrame({"user_id": np.repeat(np.arange(40), 5), "item_id": np.arange(200) % 37})
    model = fit_als(history, replace(ALS, als_factors=8))
    some = [3, 17, 18, 39]
    alone = als_of_factors(model, some, consumed=history.filter(pl.col("user_id").is_in(some))).score(some, 10)
    whole = model.score(some, 10)
    assert (
        alone.select("user_id", "item_id")
        .sort("user_id", "item_id")
        .equals(whole.select("user_id", "item_id").sort("user_id", "item_id"))
    )
    np.testing.assert_allclose(
        alone.sort("user_id", "item_id")["score"], whole.sort("user_id", "item_id")["score"], rtol=1e-5
    )
    # Each user's consumed items stay out: the history given is theirs.
    assert alone.join(history, on=["user_id", "item_id"], how="semi").is_empty()


def test_als_from_factors_refuses_factors_that_do_not_match_their_ids():
    with pytest.raises(ValueError, match="2 user rows for 3 users"):
        als_from_factors(np.arange(3), np.zeros((2, 4), np.float32), np.arange(2), np.zeros((2, 4), np.float32),
                         HISTORY, threads=1)  # fmt: skip
    with pytest.raises(ValueError, match="users have 4 factors, items 3"):
        als_from_factors(np.arange(2), np.zeros((2, 4), np.float32), np.arange(2), np.zeros((2, 3), np.float32),
                         HISTORY, threads=1)  # fmt: skip
