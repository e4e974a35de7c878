"""More training weeks where weeks are small (issue #14): older labelled weeks join the training weeks,
newest first, while they hold fewer than `min_users` labelled users, up to `max_weeks`; a log with
many users a week plans exactly as without the widening."""

from datetime import date, timedelta

import pytest

from recsys.settings import default_of
from training.plan import Widening, plan_gate, plan_weeks

AS_OF = date(2026, 11, 23)
WEEK = timedelta(weeks=1)
LABELLED = [AS_OF - n * WEEK for n in range(30, 0, -1)]  # 30 labelled weeks, oldest first


def weeks_before(*ns: int) -> list[date]:
    return [AS_OF - n * WEEK for n in ns]


def each_week(users: int) -> dict[date, int]:
    return dict.fromkeys(LABELLED, users)


def test_small_weeks_train_on_max_weeks_newest_first():
    # MovieLens 100K: 27-47 labelled users a week, 4 weeks hold ~160.
    plan = plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(40), min_users=1_000, max_weeks=12))
    assert plan.train == weeks_before(*range(16, 4, -1))
    assert (plan.validation, plan.holdout) == (weeks_before(4, 3, 2), AS_OF - WEEK)


def test_widening_stops_at_the_first_week_that_reaches_min_users():
    plan = plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(100), min_users=700, max_weeks=12))
    assert plan.train == weeks_before(*range(11, 4, -1))  # 7 weeks: 700 users
    plan = plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(100), min_users=701, max_weeks=12))
    assert len(plan.train) == 8


def test_weeks_that_already_hold_min_users_plan_as_without_widening():
    plain = plan_weeks(LABELLED, AS_OF, 4, 3)
    assert plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(250), min_users=1_000, max_weeks=12)) == plain
    assert plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(40), min_users=0, max_weeks=12)) == plain


def test_never_fewer_than_training_weeks_even_with_max_weeks_below_them():
    plan = plan_weeks(LABELLED, AS_OF, 4, 3, Widening(each_week(1), min_users=1_000, max_weeks=2))
    assert plan == plan_weeks(LABELLED, AS_OF, 4, 3)


def test_widening_takes_only_the_history_there_is():
    labelled = weeks_before(*range(9, 0, -1))
    plan = plan_weeks(labelled, AS_OF, 4, 3, Widening(each_week(40), min_users=1_000, max_weeks=12))
    assert plan.train == weeks_before(9, 8, 7, 6, 5)


def test_a_week_without_a_count_adds_no_users_and_is_passed_over_for_the_next():
    users = each_week(300) | {AS_OF - 5 * WEEK: 0} | {AS_OF - 6 * WEEK: 0}
    del users[AS_OF - 7 * WEEK]
    # Training weeks 8, 7, 6, 5 hold 300 users: three more (9, 10, 11) reach 1,200 >= 1,000.
    plan = plan_weeks(LABELLED, AS_OF, 4, 3, Widening(users, min_users=1_000, max_weeks=12))
    assert plan.train == weeks_before(*range(11, 4, -1))


def test_every_gate_plan_widens_on_its_own_past():
    plans = plan_gate(LABELLED, AS_OF, 4, 4, 3, Widening(each_week(40), min_users=1_000, max_weeks=12))
    assert [p.holdout for p in plans] == weeks_before(4, 3, 2, 1)
    for p in plans:
        assert p.train == [p.holdout - n * WEEK for n in range(15, 3, -1)]


def default_plans(weekly_users: int) -> tuple[list, list]:
    """The gate's plans at the default settings with and without the widening, `weekly_users` every week."""
    weeks = tuple(default_of(f"{n}_weeks") for n in ("training", "gate", "validation"))
    widening = Widening(each_week(weekly_users), default_of("min_training_users"), default_of("max_training_weeks"))
    return plan_gate(LABELLED, AS_OF, *weeks, widening), plan_gate(LABELLED, AS_OF, *weeks)


# The quietest labelled week (the first with history) of the demo world holds 2,420 users, of the sequential
# world 2,718, of the weekly job's small size 5,193 (larger sizes more); every default plan of a log with at
# least 250 a week (4 training weeks x 250 = RECSYS_MIN_TRAINING_USERS) is unchanged.
@pytest.mark.parametrize("weekly_users", [250, 2_420, 2_718, 5_193])
def test_logs_with_250_users_a_week_or_more_keep_their_plans_at_the_default_settings(weekly_users):
    widened, plain = default_plans(weekly_users)
    assert widened == plain


def test_at_the_default_settings_logs_with_fewer_users_a_week_widen():
    widened, plain = default_plans(249)
    assert [len(p.train) for p in widened] == [5] * len(plain)
    assert [len(p.train) for p in default_plans(40)[0]] == [12] * len(plain)
