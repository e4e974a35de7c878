from dataclasses import replace
from datetime import date

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from ranking.candidates import FEATURE_NAMES, PRIOR_FEATURE
from ranking.scoring import feature_matrix, score, top_n
from training.ranker import RankerParams, _group_sizes, attach_labels, in_key_order, sample_negatives, train_ranker

WEEK = date(2024, 3, 4)
TINY = RankerParams(n_estimators=20, num_leaves=4, min_child_samples=2, early_stopping_rounds=5, num_threads=1)


def labelled_week(as_of: date, users: int, items: int, seed: int) -> pl.DataFrame:
    """Random features; a user's positives are the items with the highest cooc_score."""
    rng = np.random.default_rng(seed)
    n = users * items
    frame = pl.DataFrame({name: rng.random(n) for name in FEATURE_NAMES}).with_columns(
        pl.lit(as_of).alias("as_of"),
        pl.Series("user_id", np.repeat(np.arange(users), items)),
        pl.Series("item_id", np.tile(np.arange(items), users)),
        pl.Series("category_code", rng.integers(0, 3, n)).cast(pl.Int32),
    )
    best = pl.col("cooc_score").rank("ordinal", descending=True).over("user_id") <= 2
    return frame.with_columns(best.cast(pl.Int32).alias("label"))


def test_attach_labels_marks_new_items_only_and_drops_users_without_positives():
    frame = pl.DataFrame({"user_id": [1, 1, 2, 2], "item_id": [10, 11, 10, 12]})
    labels = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 12], "is_new": [True, False, False]})
    labelled = attach_labels(frame, labels, WEEK)
    assert labelled.select("user_id", "item_id", "label").rows() == [(1, 10, 1), (1, 11, 0)]
    assert labelled["as_of"].to_list() == [WEEK, WEEK]


def test_sample_negatives_keeps_every_positive_and_at_most_n_negatives_per_user_week():
    frame = labelled_week(WEEK, users=5, items=40, seed=1)
    frame = pl.concat([frame, frame.with_columns(pl.lit(date(2024, 3, 11)).alias("as_of"))])
    sampled = sample_negatives(frame, per_user=7, seed=3)
    positives = frame.filter(pl.col("label") == 1)
    assert sampled.filter(pl.col("label") == 1).sort(pl.all()).equals(positives.sort(pl.all()))
    negatives = sampled.filter(pl.col("label") == 0).group_by("as_of", "user_id").len()
    assert negatives.height == 10 and (negatives["len"] == 7).all()


def test_sample_negatives_is_deterministic_for_a_seed_and_varies_with_it():
    frame = labelled_week(WEEK, users=3, items=50, seed=1)
    first = sample_negatives(frame, per_user=5, seed=3)
    assert (
        sample_negatives(frame.reverse(), per_user=5, seed=3)
        .sort("user_id", "item_id")
        .equals(first.sort("user_id", "item_id"))
    )
    assert (
        not sample_negatives(frame, per_user=5, seed=4)
        .sort("user_id", "item_id")
        .equals(first.sort("user_id", "item_id"))
    )


def test_top_n_orders_by_score_breaks_ties_by_item_id_and_cuts_at_n():
    scored = pl.DataFrame({"user_id": [1, 1, 1, 1, 2], "item_id": [9, 3, 5, 7, 4], "score": [0.5, 0.5, 0.9, 0.1, 0.0]})
    assert top_n(scored, 3).rows() == [(1, 5, 1), (1, 3, 2), (1, 9, 3), (2, 4, 1)]


def test_score_refuses_a_frame_missing_a_model_feature():
    booster = lgb.Booster(
        model_str=train_ranker(labelled_week(WEEK, 6, 20, 1), labelled_week(WEEK, 3, 20, 2), TINY).model_text
    )
    frame = labelled_week(WEEK, 2, 5, 3).drop("cooc_score")
    with pytest.raises(ValueError, match="cooc_score"):
        score(booster, frame, FEATURE_NAMES)


def test_trained_ranker_learns_the_signal_and_records_what_inference_needs():
    model = train_ranker(labelled_week(WEEK, 30, 20, 1), labelled_week(WEEK, 10, 20, 2), TINY)
    assert model.feature_names == FEATURE_NAMES and 1 <= model.best_iteration <= TINY.n_estimators
    assert max(model.feature_importance, key=model.feature_importance.get) == "cooc_score"
    test = labelled_week(WEEK, 10, 20, 3)
    ranked = top_n(score(lgb.Booster(model_str=model.model_text), test, model.feature_names), 2)
    hits = ranked.join(test.filter(pl.col("label") == 1), on=["user_id", "item_id"]).height
    assert hits >= 12  # of 20 positives; a random ranking finds about 2


def test_same_data_and_seed_give_an_identical_model_text():
    train, valid = labelled_week(WEEK, 30, 20, 1), labelled_week(WEEK, 10, 20, 2)
    first = train_ranker(train, valid, TINY)
    again = train_ranker(train.sample(fraction=1.0, shuffle=True, seed=9), valid, TINY)
    assert first.model_text == again.model_text


def test_a_fit_on_the_frames_columns_gives_the_model_text_of_a_fit_on_the_float64_matrix():
    # train_ranker hands LightGBM the frame's columns (Arrow) instead of a float64 copy: each value must be
    # binned as the float64 it widens to, nulls as NaN, over a frame of several chunks, as the flow's are.
    def week(as_of: date, seed: int) -> pl.DataFrame:
        frame = labelled_week(as_of, 30, 20, seed)
        rng = np.random.default_rng(seed)
        return frame.with_columns(
            (pl.col("pop_rank") * 50).cast(pl.Int64),  # ranks and counts are integers in the flow's frames
            (pl.col("n_sources") * 5).cast(pl.UInt32),
            pl.when(pl.Series(rng.random(frame.height)) < 0.3).then(pl.col("cooc_rank") * 100).cast(pl.Int64),
            pl.when(pl.Series(rng.random(frame.height)) < 0.5).then(pl.col("als_score")),  # null: not proposed
        )

    train = pl.concat([week(WEEK, 1), week(date(2024, 3, 11), 2)])
    valid = pl.concat([week(date(2024, 3, 18), 3), week(date(2024, 3, 25), 4)])
    assert train[FEATURE_NAMES].n_chunks() > 1 and valid[FEATURE_NAMES].n_chunks() > 1  # as train_ranker hands them

    def fitted(features) -> str:
        model = lgb.LGBMRanker(**TINY.lightgbm_kwargs())
        model.fit(
            features(train), train.get_column("label").to_numpy(), group=[20] * 60,
            eval_X=(features(valid),), eval_y=(valid.get_column("label").to_numpy(),), eval_group=[[20] * 60],
            eval_at=[10], feature_name=FEATURE_NAMES, categorical_feature=["category_code"],
        )  # fmt: skip
        return model.booster_.model_to_string()

    assert fitted(lambda frame: frame[FEATURE_NAMES]) == fitted(lambda frame: feature_matrix(frame, FEATURE_NAMES))


def test_group_sizes_are_the_key_ordered_frames_week_user_groups_in_order():
    # The same user as the last of one week and the first of the next: two groups (runs of both keys).
    weeks = [labelled_week(date(2024, 3, 4 + 7 * w), 3, 4, w).filter(pl.col("item_id") < 2 + w) for w in range(2)]
    frame = in_key_order(pl.concat(weeks))
    expected = frame.group_by("as_of", "user_id", maintain_order=True).len().get_column("len").to_numpy()
    np.testing.assert_array_equal(_group_sizes(frame), expected)
    assert _group_sizes(frame).tolist() == [2, 2, 2, 3, 3, 3] and len(_group_sizes(frame.clear())) == 0


def test_in_key_order_keeps_a_sorted_frame_itself_and_sorts_any_other():
    weeks = [labelled_week(date(2024, 3, 4 + 7 * w), 4, 5, w) for w in range(2)]
    ordered = pl.concat(weeks)
    assert in_key_order(ordered) is ordered  # no copy of a frame built in order
    for shuffled in (
        ordered.sample(fraction=1.0, shuffle=True, seed=2),
        pl.concat(weeks[::-1]),  # weeks out of order, users and items in order within each
        ordered.sort("as_of", "user_id", "item_id", descending=[False, False, True]),  # items out of order only
    ):
        assert in_key_order(shuffled).equals(ordered)
    assert in_key_order(ordered.head(1)).equals(ordered.head(1)) and in_key_order(ordered.clear()).is_empty()


def test_column_major_feature_matrix_holds_the_frame_values_as_float64_with_nulls_as_nan():
    frame = pl.DataFrame(
        {"a": [1, None, 3], "b": [0.5, 1.5, None], "c": [7, 8, 9], "d": ["x", "y", "z"]},
        schema={"a": pl.Int64, "b": pl.Float64, "c": pl.Int32, "d": pl.String},
    )
    matrix = feature_matrix(frame, ["c", "a", "b"])
    assert matrix.dtype == np.float64 and matrix.flags["F_CONTIGUOUS"]
    expected = frame.select(pl.col("c", "a", "b").cast(pl.Float64)).to_numpy()
    np.testing.assert_array_equal(matrix, expected)  # NaN where null, columns in the order asked
    assert np.isnan(matrix[1, 1]) and np.isnan(matrix[2, 2])
    rows = feature_matrix(frame, ["c", "a", "b"], rows_contiguous=True)
    assert rows.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(rows, matrix)
    assert feature_matrix(frame.clear(), ["a", "b"]).shape == (0, 2)


def test_training_refuses_an_empty_validation_week():
    with pytest.raises(ValueError, match="validation week"):
        train_ranker(labelled_week(WEEK, 5, 10, 1), labelled_week(WEEK, 5, 10, 2).clear(), TINY)


def test_score_adds_the_prior_only_for_models_trained_from_it():
    model = train_ranker(labelled_week(WEEK, 6, 20, 1), labelled_week(WEEK, 3, 20, 2), TINY)
    booster = lgb.Booster(model_str=model.model_text)
    frame = labelled_week(WEEK, 2, 5, 3)
    trees = booster.predict(frame.select(pl.col(FEATURE_NAMES).cast(pl.Float64)).to_numpy())
    with_prior = score(booster, frame, FEATURE_NAMES)["score"].to_numpy()
    assert with_prior == pytest.approx(trees + frame[PRIOR_FEATURE].to_numpy())
    # A model registered before the prior existed lists no prior feature: its trees alone.
    older = [n for n in FEATURE_NAMES if n != PRIOR_FEATURE]
    older_booster = lgb.train(
        {"objective": "regression", "verbose": -1, "min_data_in_leaf": 2},
        lgb.Dataset(frame.select(older).to_numpy(), frame["label"].to_numpy(), feature_name=older),
        3,
    )
    alone = older_booster.predict(frame.select(pl.col(older).cast(pl.Float64)).to_numpy())
    assert score(older_booster, frame, older)["score"].to_numpy() == pytest.approx(alone)


def test_ranker_without_signal_beyond_the_prior_ranks_by_the_prior():
    def prior_labelled(as_of: date, users: int, seed: int) -> pl.DataFrame:
        best = pl.col(PRIOR_FEATURE).rank("ordinal", descending=True).over("user_id") <= 2
        return labelled_week(as_of, users, 20, seed).with_columns(best.cast(pl.Int32).alias("label"))

    model = train_ranker(prior_labelled(WEEK, 30, 1), prior_labelled(WEEK, 10, 2), TINY)
    test = prior_labelled(WEEK, 10, 3)
    ranked = top_n(score(lgb.Booster(model_str=model.model_text), test, model.feature_names), 2)
    hits = ranked.join(test.filter(pl.col("label") == 1), on=["user_id", "item_id"]).height
    assert hits >= 18  # of 20 positives


def test_lambdarank_weighs_every_pair_of_a_candidate_list():
    # LightGBM's default truncation (30) would ignore pairs below the top 30 of ~170 candidates.
    assert RankerParams().lightgbm_kwargs()["lambdarank_truncation_level"] >= 1_000


def _root_rows(model_text: str) -> int:
    """Rows the first tree was grown on (its root's internal_count; no bagging, so every row)."""
    first_tree = model_text.split("Tree=0", 1)[1]
    return int(first_tree.split("internal_count=", 1)[1].split()[0])


def test_refit_grows_the_chosen_number_of_trees_on_the_training_and_validation_weeks_together():
    train, valid = labelled_week(WEEK, 30, 20, 1), labelled_week(date(2024, 3, 11), 10, 20, 2)
    stopped = train_ranker(train, valid, replace(TINY, refit=False))
    refitted = train_ranker(train, valid, replace(TINY, refit=True))
    assert _root_rows(stopped.model_text) == train.height
    assert _root_rows(refitted.model_text) == train.height + valid.height
    assert refitted.best_iteration == stopped.best_iteration
    assert lgb.Booster(model_str=refitted.model_text).num_trees() == refitted.best_iteration
    # The validation score is the early-stopped fit's: measured on rows that model never saw.
    assert refitted.validation_ndcg == stopped.validation_ndcg
