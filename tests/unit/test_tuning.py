"""Optuna tuning of the ranker (issue #14): on the validation week, within its budget, stored with the model."""

from dataclasses import replace
from datetime import date, timedelta

import polars as pl
import pytest

from tests.unit.test_ranker import TINY, labelled_week
from training import gate
from training.plan import WeekPlan
from training.tuning import SEARCH_SPACE, TuningConfig, tune_params

WEEK = date(2024, 3, 4)


@pytest.fixture(scope="module")
def weeks() -> tuple[pl.DataFrame, pl.DataFrame]:
    train = pl.concat([labelled_week(WEEK, users=30, items=20, seed=s) for s in (1, 2)])
    return train, labelled_week(WEEK + timedelta(7), users=30, items=20, seed=3)


def test_the_first_trial_is_the_untuned_parameters_and_the_choice_is_no_worse_on_validation(weeks):
    train, valid = weeks
    result = tune_params(train, valid, TINY, TuningConfig(seconds=120, trials=4))

    assert result.trials == 4
    assert result.best_ndcg >= result.untuned_ndcg
    assert set(result.chosen) == set(SEARCH_SPACE)
    assert all(getattr(result.params, name) == value for name, value in result.chosen.items())
    assert result.params.n_estimators == TINY.n_estimators  # only the searched parameters change
    record = result.record()
    assert record["trials"] == 4 and record["chosen"] == result.chosen


def test_the_same_seed_and_trial_budget_choose_the_same_values(weeks):
    train, valid = weeks
    first = tune_params(train, valid, TINY, TuningConfig(seconds=120, trials=3))
    assert tune_params(train, valid, TINY, TuningConfig(seconds=120, trials=3)).chosen == first.chosen


def test_a_disabled_or_bad_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="tuning needs seconds >= 0 and trials >= 1, got -1"):
        TuningConfig(seconds=-1, trials=3)
    with pytest.raises(ValueError, match="tuning is disabled"):
        tune_params(pl.DataFrame(), pl.DataFrame(), TINY, TuningConfig(seconds=0, trials=3))


def test_tuning_on_a_plan_reads_its_training_and_validation_weeks_never_its_holdout(weeks):
    train, valid = weeks
    plan = WeekPlan(
        as_of=WEEK + timedelta(21), train=[WEEK], validation=[WEEK + timedelta(7)], holdout=WEEK + timedelta(14)
    )
    read: list[date] = []

    def frame_of(week: date, categories: list[str]) -> pl.DataFrame:
        read.append(week)
        return {WEEK: train, WEEK + timedelta(7): valid}[week]

    result = gate.tune_on_plan(plan, [], frame_of=frame_of, params=replace(TINY), tuning=TuningConfig(60, 2))

    assert sorted(set(read)) == [WEEK, WEEK + timedelta(7)] and result.trials == 2
