"""The gate's bounded holdout: a fixed hash sample of each week's labelled users, the same for every
recommender, and EASE's and ALS's lists read from the snapshot's collaborative_scores table."""

import dataclasses
import random
from dataclasses import replace
from datetime import date

import lightgbm as lgb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.collaborative import CollaborativeConfig
from inference import scoring
from ranking import baselines
from ranking.candidates import CandidateConfig, SnapshotTables
from ranking.scoring import ScoringModel
from tests.helpers import small_week
from training import evaluation, frames
from training.ranker import RankerParams, train_ranker

AS_OF = date(2024, 3, 4)
CONFIG = CandidateConfig(recent_items=10)
COLLABORATIVE = CollaborativeConfig(als_factors=8, als_iterations=5)
SAMPLING = {"negatives_per_user": 50, "seed": 42, "batch_users": 5_000}


@pytest.fixture(scope="module")
def week() -> tuple[SnapshotTables, pl.DataFrame, list[str]]:
    """A small synthetic week (EASE and ALS in its collaborative_scores): tables, labels, category encoding."""
    return small_week(AS_OF, COLLABORATIVE)


@pytest.fixture(scope="module")
def model(week) -> ScoringModel:
    tables, labels, categories = week
    frame = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, max_users=None)
    trained = train_ranker(frame, frame, RankerParams(n_estimators=20, num_threads=1))
    return ScoringModel(lgb.Booster(model_str=trained.model_text), trained.feature_names, categories)


def only_users(tables: SnapshotTables, users: pl.Series) -> SnapshotTables:
    """`tables` with only `users`' rows in the user-keyed tables, as `training.store.read_sampled_week` reads them."""
    keep = users.to_frame("user_id")
    frames = {f.name: getattr(tables, f.name) for f in dataclasses.fields(SnapshotTables)}
    return SnapshotTables(
        **{
            name: frame.join(keep, on="user_id", how="semi")
            if frame is not None and "user_id" in frame.columns
            else frame
            for name, frame in frames.items()
        }
    )


def evaluate(model, tables, labels, max_users, config=CONFIG):
    return evaluation.evaluate_week(
        model, tables, labels, config, 10, champion=model, collaborative=COLLABORATIVE, batch_users=40,
        max_users=max_users,
    )  # fmt: skip


def test_user_hash_is_pinned_so_every_machine_and_version_draws_the_same_users():
    hashed = evaluation.user_hash(pl.Series([0, 1, 2, -5, 2**40]))
    assert [int(h) for h in hashed] == [
        12971807826131526770, 9725615297177734973, 3910010097759680939, 5045496501967834161, 7851607550300680575,
    ]  # fmt: skip


def test_the_holdout_sample_depends_only_on_the_set_of_users():
    users = list(range(10_000, 12_000))
    sample = evaluation.sample_holdout_users(pl.Series(users), 300)
    shuffled = users[:]
    random.Random(5).shuffle(shuffled)
    again = evaluation.sample_holdout_users(pl.Series(shuffled + users[:50]), 300)  # another order, repeats
    assert sample.len() == 300 and sample.is_sorted() and sample.n_unique() == 300
    assert sample.to_list() == again.to_list()
    assert set(sample) < set(users)
    # Not the smallest ids nor every k-th one: a hash sample spread over the ids.
    assert sample.min() < 10_300 and sample.max() > 11_700
    # A sampled user stays sampled from any subset holding it: sampling the sample keeps it whole,
    # and dropping unsampled users changes nothing.
    assert evaluation.sample_holdout_users(sample, 300).to_list() == sample.to_list()
    fewer = [u for u in users if u in set(sample) or u % 3]
    assert evaluation.sample_holdout_users(pl.Series(fewer), 300).to_list() == sample.to_list()


def test_a_bound_at_or_above_the_users_keeps_every_user_and_a_smaller_one_exactly_that_many():
    users = pl.Series([5, 3, 9, 1])
    assert evaluation.sample_holdout_users(users, None).to_list() == [1, 3, 5, 9]
    assert evaluation.sample_holdout_users(users, 4).to_list() == [1, 3, 5, 9]
    assert evaluation.sample_holdout_users(users, 100).to_list() == [1, 3, 5, 9]
    assert evaluation.sample_holdout_users(users, 3).len() == 3
    assert evaluation.sample_holdout_users(users.head(0), 3).len() == 0


def test_a_week_with_fewer_users_than_the_bound_is_evaluated_whole_as_before(week, model):
    tables, labels, _ = week
    every = evaluate(model, tables, labels, None)
    bounded = evaluate(model, tables, labels, 20_000)
    assert every.metrics["model"]["users"] == frames.labelled_users(labels, tables).len() > 100
    assert bounded.metrics == every.metrics
    assert bounded.candidate_recall == every.candidate_recall
    assert_frame_equal(bounded.per_user, every.per_user)


def test_a_smaller_bound_evaluates_exactly_that_many_users_the_same_for_every_recommender(week, model):
    tables, labels, _ = week
    every = evaluate(model, tables, labels, None)
    bounded = evaluate(model, tables, labels, 60)
    sample = evaluation.sample_holdout_users(frames.labelled_users(labels, tables), 60)
    assert bounded.metrics.keys() == every.metrics.keys() >= {"model", "champion", *baselines.NAMES}
    assert {m["users"] for m in bounded.metrics.values()} == {60}
    assert bounded.per_user["user_id"].to_list() == sample.to_list()
    assert bounded.per_user.null_count().sum_horizontal().item() == 0  # every recommender scored every user
    # The sampled users' results are theirs in the whole week's evaluation: nothing else changes.
    assert_frame_equal(bounded.per_user, every.per_user.join(sample.to_frame(), on="user_id", how="semi"))
    for name, metrics in bounded.metrics.items():
        assert metrics["ndcg@10"] == pytest.approx(bounded.per_user[name].mean()), name


def test_the_sampled_users_rows_alone_give_the_same_evaluation_as_the_whole_week(week, model):
    tables, labels, _ = week
    bounded = evaluate(model, tables, labels, 60)
    sample = evaluation.sample_holdout_users(frames.labelled_users(labels, tables), 60)
    alone = evaluate(model, only_users(tables, sample), labels.join(sample.to_frame(), on="user_id", how="semi"), 60)
    assert alone.metrics == bounded.metrics
    assert alone.candidate_recall == bounded.candidate_recall
    assert_frame_equal(alone.per_user, bounded.per_user)


def test_a_training_frame_of_the_sampled_users_rows_alone_equals_the_whole_weeks(week):
    tables, labels, categories = week
    sample = frames.sample_users(frames.labelled_users(labels, tables), 40, SAMPLING["seed"])
    whole = frames.labelled_frame(tables, labels, AS_OF, CONFIG, categories, **SAMPLING, max_users=40)
    alone = frames.labelled_frame(
        only_users(tables, sample), labels.join(sample.to_frame(), on="user_id", how="semi"), AS_OF, CONFIG,
        categories, **SAMPLING, max_users=40,
    )  # fmt: skip
    assert set(whole["user_id"]) <= set(sample) and whole["user_id"].n_unique() > 20  # users with a positive
    assert_frame_equal(alone, whole)


@pytest.mark.parametrize("name", baselines.COLLABORATIVE)
@pytest.mark.parametrize("k", [10, 100])
def test_ease_and_als_lists_from_collaborative_scores_equal_the_models_fitted_on_the_history(week, name, k):
    tables, _, _ = week
    users = tables.user_features["user_id"]
    fitted = baselines.fit_collaborative(tables.user_item_history, COLLABORATIVE)
    stored = baselines.stored_collaborative(tables.collaborative_scores)
    assert stored.keys() == fitted.keys() == {"ease", "als"}
    assert stored[name].depth == 100
    from_table = stored[name].recommend(users, k)
    assert from_table["user_id"].n_unique() > 250
    assert_frame_equal(from_table, fitted[name].recommend(users, k))
    # And as the baseline reports them: cold users filled with recent popularity alike.
    assert_frame_equal(
        baselines.recommend(name, tables, users, k, CONFIG, stored),
        baselines.recommend(name, tables, users, k, CONFIG, fitted),
    )


def test_the_gate_reads_ease_and_als_from_the_table_and_fits_them_only_when_the_table_cannot_serve(week):
    tables, _, _ = week
    stored = evaluation.collaborative_baselines(tables, CONFIG, COLLABORATIVE, 10)
    assert {n: type(s) for n, s in stored.items()} == {"ease": baselines.StoredLists, "als": baselines.StoredLists}
    # Lists longer than the table keeps, or consumed items allowed: fitted on the history.
    deeper = evaluation.collaborative_baselines(tables, CONFIG, COLLABORATIVE, 101)
    assert {type(s) for s in deeper.values()} == {baselines.collaborative.FittedScorer}
    repeats = evaluation.collaborative_baselines(tables, replace(CONFIG, exclude_consumed=False), COLLABORATIVE, 10)
    assert repeats.keys() == {"ease", "als"}
    assert {type(s) for s in repeats.values()} == {baselines.collaborative.FittedScorer}
    with pytest.raises(ValueError, match="unconsumed items only"):
        stored["als"].recommend([1], 10, exclude_consumed=False)


def test_ease_left_out_of_the_table_is_left_out_of_the_gate_as_when_fitted(week):
    tables, _, _ = week
    no_ease = tables.collaborative_scores.with_columns(
        pl.lit(None, pl.Float64).alias("ease_score"), pl.lit(None, pl.Int64).alias("ease_rank")
    ).filter(pl.col("als_rank").is_not_null())
    stored = evaluation.collaborative_baselines(
        replace(tables, collaborative_scores=no_ease), CONFIG, COLLABORATIVE, 10
    )
    assert stored.keys() == {"als"}
    bounded = CollaborativeConfig(als_factors=8, als_iterations=5, ease_max_items=10)
    assert baselines.fit_collaborative(tables.user_item_history, bounded).keys() == {"als"}


def test_a_week_computes_its_truth_once_for_the_labelled_users_and_once_for_the_evaluated_ones(
    week, model, monkeypatch
):
    tables, labels, _ = week
    calls = []
    truth = evaluation.metrics.evaluation_truth

    def counted(labels, users):
        calls.append(type(users).__name__)
        return truth(labels, users)

    monkeypatch.setattr(evaluation.metrics, "evaluation_truth", counted)
    scored = evaluate(model, tables, labels, 60)
    # The week's labelled users (from the user features), then the sampled users' truth, passed down.
    assert calls == ["DataFrame", "Series"]
    assert {m["users"] for m in scored.metrics.values()} == {60}


def test_the_labelled_users_of_a_week_are_the_same_from_its_tables_or_its_user_ids_alone(week):
    tables, labels, _ = week
    every = frames.labelled_users(labels, tables)
    assert 100 < every.len() < tables.user_features.height
    assert frames.labelled_users(labels, tables.user_features.select("user_id")).to_list() == every.to_list()
    assert frames.labelled_users(labels, tables.user_features["user_id"]).to_list() == every.to_list()


@pytest.mark.parametrize("name", baselines.COLLABORATIVE)
def test_a_baseline_champion_served_from_each_batchs_stored_lists_equals_the_fitted_models(week, name):
    tables, _, _ = week
    fitted = baselines.fit_collaborative(tables.user_item_history, COLLABORATIVE)
    served = scoring.ServedBaseline(name, {}, stored_depth=100)
    users = tables.user_features["user_id"]
    for batch in (users.head(70), users.tail(70)):  # a partition's batch reads only its users' rows
        batch_tables = only_users(tables, batch)
        from_table = scoring.recommend_baseline(name, batch_tables, batch, CONFIG, 20, served.lists(batch_tables))
        assert from_table.height > 60
        assert_frame_equal(from_table, scoring.recommend_baseline(name, tables, batch, CONFIG, 20, fitted))
