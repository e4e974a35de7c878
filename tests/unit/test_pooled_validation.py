"""Early stopping and tuning on several validation weeks pooled (issue #14): the plan carries them,
the ranker stops on all of them at once, the refit trains on them, tuning scores trials on them."""

from dataclasses import replace
from datetime import date, timedelta

import polars as pl
import pytest

from tests.unit.test_ranker import TINY, labelled_week
from training import gate
from training.plan import NotEnoughHistory, WeekPlan, plan_gate, plan_weeks
from training.ranker import train_ranker
from training.tuning import TuningConfig

AS_OF = date(2026, 11, 23)
WEEK = timedelta(weeks=1)


def weeks_before(*ns: int) -> list[date]:
    return [AS_OF - n * WEEK for n in ns]


def test_the_latest_v_weeks_before_the_holdout_validate_and_the_training_weeks_before_them_train():
    plan = plan_weeks(weeks_before(*range(1, 9)), AS_OF, training_weeks=3, validation_weeks=2)
    assert plan == WeekPlan(AS_OF, train=weeks_before(6, 5, 4), validation=weeks_before(3, 2), holdout=AS_OF - WEEK)
    assert plan.weeks == weeks_before(6, 5, 4, 3, 2, 1)
    three = plan_weeks(weeks_before(*range(1, 9)), AS_OF, training_weeks=3, validation_weeks=3)
    assert (three.train, three.validation) == (weeks_before(7, 6, 5), weeks_before(4, 3, 2))


def test_one_validation_week_is_the_plan_of_before():
    labelled = weeks_before(*range(1, 9))
    assert plan_weeks(labelled, AS_OF, 3, validation_weeks=1) == plan_weeks(labelled, AS_OF, 3)
    assert plan_weeks(labelled, AS_OF, 3).validation == weeks_before(2)


def test_validation_weeks_come_first_when_history_is_short_and_one_training_week_is_enough():
    plan = plan_weeks(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=4, validation_weeks=2)
    assert (plan.train, plan.validation, plan.holdout) == (weeks_before(4), weeks_before(3, 2), AS_OF - WEEK)


def test_short_history_shrinks_the_validation_weeks_to_leave_one_training_week():
    plan = plan_weeks(weeks_before(1, 2, 3), AS_OF, training_weeks=2, validation_weeks=3)
    assert (plan.train, plan.validation, plan.holdout) == (weeks_before(3), weeks_before(2), AS_OF - WEEK)
    plan = plan_weeks(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=2, validation_weeks=3)
    assert (plan.train, plan.validation) == (weeks_before(4), weeks_before(3, 2))


def test_too_little_history_names_the_weeks_found_whatever_the_validation_weeks():
    with pytest.raises(NotEnoughHistory) as raised:
        plan_weeks(weeks_before(1, 2), AS_OF, training_weeks=2, validation_weeks=3)
    message = str(raised.value)
    assert "needs at least 3 weeks" in message and "found 2: ['2026-11-09', '2026-11-16']" in message


def test_zero_validation_or_training_weeks_are_refused_by_name():
    with pytest.raises(ValueError, match="training_weeks and validation_weeks must be >= 1, got 2 and 0"):
        plan_weeks(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=2, validation_weeks=0)
    with pytest.raises(ValueError, match="got 0 and 1"):
        plan_weeks(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=0)


def test_every_gate_plan_validates_on_its_own_v_weeks_before_its_holdout():
    labelled = weeks_before(*range(1, 11))
    plans = plan_gate(labelled, AS_OF, training_weeks=2, gate_weeks=3, validation_weeks=3)
    assert [p.holdout for p in plans] == weeks_before(3, 2, 1)
    for p in plans:
        assert p.validation == [p.holdout - n * WEEK for n in (3, 2, 1)]
        assert p.train == [p.holdout - n * WEEK for n in (5, 4)]
    # With less history, the earlier gate weeks validate on fewer weeks; one with fewer than 3 is left out.
    short = plan_gate(labelled[:4], AS_OF, 2, gate_weeks=3, validation_weeks=3)
    assert [(p.holdout, len(p.validation), len(p.train)) for p in short] == [
        (AS_OF - 2 * WEEK, 1, 1),
        (AS_OF - WEEK, 2, 1),
    ]


# Two validation weeks that disagree: the older (30 users) rewards the training weeks' signal (the
# top cooc_score items are the positives), the latest (10 users) reverses it (the bottom ones are).
TRAIN_WEEK, OLDER, LATEST, HOLDOUT = (AS_OF - n * WEEK for n in (4, 3, 2, 1))
PLAN = WeekPlan(AS_OF, train=[TRAIN_WEEK], validation=[OLDER, LATEST], holdout=HOLDOUT)


def _reversed(frame: pl.DataFrame) -> pl.DataFrame:
    worst = pl.col("cooc_score").rank("ordinal").over("user_id") <= 2
    return frame.with_columns(worst.cast(pl.Int32).alias("label"))


FRAMES = {
    TRAIN_WEEK: labelled_week(TRAIN_WEEK, users=40, items=20, seed=1),
    OLDER: labelled_week(OLDER, users=30, items=20, seed=2),
    LATEST: _reversed(labelled_week(LATEST, users=10, items=20, seed=3)),
}
PARAMS = replace(TINY, n_estimators=40, early_stopping_rounds=10)


def frame_of(week: date, categories: list[str]) -> pl.DataFrame:
    if week == HOLDOUT:
        raise AssertionError("the holdout week was read for training")
    return FRAMES[week]


def test_the_ranker_early_stops_on_every_validation_week_pooled_not_only_the_latest():
    train, valid = gate.plan_frames(PLAN, [], frame_of)
    assert valid.height == FRAMES[OLDER].height + FRAMES[LATEST].height
    pooled = train_ranker(train, valid, PARAMS)
    latest_only = train_ranker(train, FRAMES[LATEST], PARAMS)
    # On the latest week alone every tree hurts; pooled, the older week's 30 users want the signal.
    assert latest_only.best_iteration == 1
    assert pooled.best_iteration > 5


def test_the_refit_trains_on_the_training_and_every_validation_week():
    model = train_ranker(*gate.plan_frames(PLAN, [], frame_of), PARAMS)
    first_tree = model.model_text.split("Tree=0", 1)[1]
    rows = int(first_tree.split("internal_count=", 1)[1].split()[0])
    assert rows == sum(frame.height for frame in FRAMES.values())


def test_tuning_scores_its_trials_on_every_validation_week_never_the_holdout():
    read: list[date] = []

    def recording(week: date, categories: list[str]) -> pl.DataFrame:
        read.append(week)
        return frame_of(week, categories)

    result = gate.tune_on_plan(PLAN, [], frame_of=recording, params=PARAMS, tuning=TuningConfig(60, 1))
    assert sorted(set(read)) == [TRAIN_WEEK, OLDER, LATEST]
    # The one trial is the untuned parameters, scored as early stopping scores them: on both weeks.
    stopped = train_ranker(*gate.plan_frames(PLAN, [], frame_of), replace(PARAMS, refit=False))
    assert result.untuned_ndcg == stopped.validation_ndcg
