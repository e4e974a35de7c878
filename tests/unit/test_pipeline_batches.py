"""Training frames and holdout evaluation built in user batches give exactly the unbatched result."""

from dataclasses import replace
from datetime import date

import lightgbm as lgb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.collaborative import CollaborativeConfig
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables
from ranking.scoring import ScoringModel, user_batches
from tests.helpers import small_week
from training import evaluation, frames
from training.ranker import RankerParams, train_ranker

AS_OF = date(2024, 3, 4)
CONFIG = CandidateConfig(recent_items=10)
SAMPLING = {"negatives_per_user": 50, "seed": 42, "max_users": None}


@pytest.fixture(scope="module")
def week() -> tuple[SnapshotTables, pl.DataFrame, list[str]]:
    """A small synthetic week: its snapshot tables, labels and category encoding."""
    return small_week(AS_OF)


def test_sample_users_is_a_fixed_subset_of_the_requested_size():
    users = pl.Series("user_id", range(1000), pl.Int64)
    first = frames.sample_users(users, 100, seed=7)
    assert first.len() == 100 and first.is_sorted() and first.is_in(users).all()
    assert first.to_list() == frames.sample_users(users, 100, seed=7).to_list()
    assert first.to_list() != frames.sample_users(users, 100, seed=8).to_list()
    assert frames.sample_users(users, 5000, seed=7).to_list() == users.to_list()
    assert frames.sample_users(users, None, seed=7).to_list() == users.to_list()


def test_user_batches_cover_every_user_once_in_order():
    users = pl.Series("user_id", range(11), pl.Int64)
    batches = user_batches(users, 4)
    assert [b.to_list() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert user_batches(users.head(0), 4) == []
    assert user_batches([5, 1, 4, 2, 3], 2) == [[5, 1], [4, 2], [3]]  # lists too, as the partitions pass
    assert user_batches([], 3) == []
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        user_batches(users, 0)


def test_labelled_frame_in_batches_equals_one_batch_and_respects_the_user_cap(week):
    tables, labels, categories = week
    whole = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, batch_users=10**6)
    batched = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, batch_users=17)
    assert whole.height > 0
    assert_frame_equal(batched, whole)

    capped = frames.labelled_frame(
        tables, labels, AS_OF, CONFIG, categories, **(SAMPLING | {"max_users": 25}), batch_users=10
    )
    sample = set(frames.sample_users(frames.labelled_users(labels, tables), 25, seed=42))
    assert len(sample) == 25
    assert set(capped["user_id"]) == sample & set(whole["user_id"])
    assert_frame_equal(capped, whole.filter(pl.col("user_id").is_in(list(sample))))


def test_evaluation_in_batches_equals_one_batch(week):
    tables, labels, categories = week
    frame = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, batch_users=5_000)
    trained = train_ranker(frame, frame, RankerParams(n_estimators=20, num_threads=1))
    model = ScoringModel(lgb.Booster(model_str=trained.model_text), trained.feature_names, categories)

    small = CollaborativeConfig(als_factors=4, als_iterations=3)
    whole = evaluation.evaluate_week(
        model, tables, labels, CONFIG, 10, champion=model, collaborative=small, batch_users=10**6
    )
    batched = evaluation.evaluate_week(
        model, tables, labels, CONFIG, 10, champion=model, collaborative=small, batch_users=23
    )

    assert whole.metrics["model"]["users"] > 23, "the test needs several batches"
    assert batched.metrics.keys() == whole.metrics.keys()
    for name, metrics in whole.metrics.items():
        assert batched.metrics[name] == pytest.approx(metrics), name
    assert batched.candidate_recall == pytest.approx(whole.candidate_recall)
    assert {"ease", "als"} <= whole.metrics.keys()
    assert_frame_equal(batched.per_user, whole.per_user)
    # The gate's units average to the reported NDCG of every recommender.
    for name, metrics in whole.metrics.items():
        assert whole.per_user[name].mean() == pytest.approx(metrics["ndcg@10"]), name


def test_the_champion_is_evaluated_on_the_candidate_counts_it_was_trained_on(week):
    tables, labels, categories = week
    frame = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, batch_users=5_000)
    trained = train_ranker(frame, frame, RankerParams(n_estimators=20, num_threads=1))
    booster = lgb.Booster(model_str=trained.model_text)
    model = ScoringModel(booster, trained.feature_names, categories)
    narrow = replace(CONFIG, **dict.fromkeys(SOURCES, 0) | {"pop": 10})
    held = ScoringModel(booster, trained.feature_names, categories, narrow)  # the same trees, other candidates
    small = CollaborativeConfig(als_factors=4, als_iterations=3)

    scored = evaluation.evaluate_week(model, tables, labels, CONFIG, 10, champion=held, collaborative=small,
                                      batch_users=10**6)  # fmt: skip
    alone = evaluation.evaluate_week(
        replace(held, config=None), tables, labels, narrow, 10, collaborative=small, batch_users=10**6
    )

    assert scored.metrics["champion"] == pytest.approx(alone.metrics["model"])
    assert scored.metrics["champion"] != pytest.approx(scored.metrics["model"])
