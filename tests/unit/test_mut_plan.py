"""Week selection: which labelled weeks train, validate and hold out a model, and the weekly clock.

Written to kill mutmut's survivors in `training/plan.py` and `recsys/clock.py` (issue #17):
each test pins one rule of the plan, so dropping or loosening the rule fails it.
"""

import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from recsys.clock import mondays, parse_as_of, week_floor
from recsys.errors import ExpectedError
from training.plan import NotEnoughHistory, WeekPlan, plan_gate, plan_weeks, staleness

AS_OF = date(2026, 11, 23)
WEEK = timedelta(weeks=1)


def weeks_before(*ns: int) -> list[date]:
    return [AS_OF - n * WEEK for n in ns]


def test_the_newest_week_holds_out_the_one_before_validates_and_earlier_ones_train():
    plan = plan_weeks(weeks_before(1, 2, 3, 4, 5), AS_OF, training_weeks=2)
    assert plan == WeekPlan(as_of=AS_OF, train=weeks_before(4, 3), validation=[AS_OF - 2 * WEEK], holdout=AS_OF - WEEK)
    assert plan.weeks == weeks_before(4, 3, 2, 1)


def test_training_weeks_bounds_how_many_earlier_weeks_train():
    labelled = weeks_before(*range(1, 11))
    assert plan_weeks(labelled, AS_OF, training_weeks=1).train == weeks_before(3)
    assert plan_weeks(labelled, AS_OF, training_weeks=3).train == weeks_before(5, 4, 3)
    # Fewer weeks than asked for: every earlier week trains.
    assert plan_weeks(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=8).train == weeks_before(4, 3)


def test_a_week_whose_labels_are_not_complete_at_as_of_is_never_used():
    # The week starting at as_of (and later ones) close after as_of: their labels are the future.
    plan = plan_weeks([*weeks_before(1, 2, 3, 4), AS_OF, AS_OF + WEEK, AS_OF + 2 * WEEK], AS_OF, training_weeks=5)
    assert plan.holdout == AS_OF - WEEK
    assert max(plan.weeks) == AS_OF - WEEK


def test_a_week_that_closes_exactly_at_as_of_is_the_holdout():
    # d + 7 days == as_of: complete, the newest usable week.
    assert plan_weeks(weeks_before(1, 2, 3), AS_OF, training_weeks=2).holdout == AS_OF - WEEK


def test_unsorted_and_repeated_weeks_plan_like_the_sorted_set():
    shuffled = [*weeks_before(3, 1, 5, 2, 4), *weeks_before(1, 3)]
    assert plan_weeks(shuffled, AS_OF, training_weeks=2) == plan_weeks(weeks_before(5, 4, 3, 2, 1), AS_OF, 2)
    assert plan_weeks(shuffled, AS_OF, training_weeks=2).train == weeks_before(4, 3)


def test_three_usable_weeks_are_enough_and_two_are_not():
    plan = plan_weeks(weeks_before(1, 2, 3), AS_OF, training_weeks=2)
    assert (plan.train, plan.validation, plan.holdout) == (weeks_before(3), [AS_OF - 2 * WEEK], AS_OF - WEEK)
    with pytest.raises(NotEnoughHistory, match=r"needs at least 3 weeks .* found 2: \['2026-11-09', '2026-11-16'\]"):
        plan_weeks(weeks_before(1, 2), AS_OF, training_weeks=2)


def test_future_weeks_do_not_count_towards_the_three_needed():
    with pytest.raises(NotEnoughHistory, match="found 2"):
        plan_weeks([*weeks_before(1, 2), AS_OF, AS_OF + WEEK], AS_OF, training_weeks=2)


def test_not_enough_history_is_an_expected_error_naming_the_fix():
    with pytest.raises(NotEnoughHistory) as raised:
        plan_weeks([], AS_OF, training_weeks=2)
    assert isinstance(raised.value, ExpectedError) and isinstance(raised.value, ValueError)
    assert f"training as of {AS_OF}" in str(raised.value) and "found 0: []" in str(raised.value)
    assert str(raised.value).endswith(
        ". Compute feature snapshots of earlier weeks (recsys features --from ... --to ...) or pick a later week"
    )


def test_a_gate_without_weeks_is_refused_naming_the_setting_and_its_value():
    with pytest.raises(ValueError, match="^plan_gate: gate_weeks must be >= 1, got 0$"):
        plan_gate(weeks_before(1, 2, 3, 4), AS_OF, training_weeks=2, gate_weeks=0)


def test_a_holdout_one_week_behind_is_stale_by_one_week():
    message = staleness(plan_weeks(weeks_before(2, 3, 4), AS_OF, training_weeks=2))
    assert message is not None
    assert f"newest labelled snapshot is {AS_OF - 2 * WEEK}, older than the expected {AS_OF - WEEK}" in message
    assert "(1 week(s) behind)" in message


def test_week_floor_of_a_naive_datetime_is_its_own_days_monday():
    assert week_floor(datetime(2026, 11, 29, 23, 59)) == date(2026, 11, 23)
    assert week_floor(datetime(2026, 11, 30, 0, 0)) == date(2026, 11, 30)


@pytest.fixture
def machine_in_new_york(monkeypatch):
    """The process's local time zone is UTC-5 (November): the clock must not depend on it."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_week_floor_reads_naive_and_aware_moments_in_utc_whatever_the_local_zone(machine_in_new_york):
    # Monday 01:00 as a naive value is UTC (Sunday 20:00 in New York, but the clock is UTC).
    assert week_floor(datetime(2026, 11, 30, 1, 0)) == date(2026, 11, 30)
    # Sunday 23:00 naive stays Sunday (in New York's zone it would be Monday 04:00 UTC).
    assert week_floor(datetime(2026, 11, 29, 23, 0)) == date(2026, 11, 23)
    assert week_floor(datetime(2026, 11, 30, 1, 0, tzinfo=UTC)) == date(2026, 11, 30)


def test_week_floor_converts_an_aware_moment_to_utc_first():
    # Sunday 23:00 at UTC-2 is Monday 01:00 UTC: the next week.
    assert week_floor(datetime(2026, 11, 29, 23, 0, tzinfo=timezone(timedelta(hours=-2)))) == date(2026, 11, 30)
    assert week_floor(datetime(2026, 11, 30, 0, 0, tzinfo=UTC)) == date(2026, 11, 30)


def test_parse_as_of_takes_a_date_as_it_is_and_suggests_the_monday_before():
    assert parse_as_of(date(2026, 11, 23)) == date(2026, 11, 23)
    with pytest.raises(ValueError, match=r"^as_of 2026-11-29 is a Sunday; as_of must be a Monday .*e\.g\. 2026-11-23$"):
        parse_as_of(date(2026, 11, 29))
    with pytest.raises(ValueError, match=r"^as_of 'monday' is not an ISO date \(YYYY-MM-DD\)$") as raised:
        parse_as_of("monday")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_mondays_spanning_many_weeks_step_one_week():
    weeks = mondays("2026-10-05", "2026-11-23")
    assert len(weeks) == 8 and weeks[0] == date(2026, 10, 5) and weeks[-1] == date(2026, 11, 23)
    assert all(b - a == WEEK for a, b in zip(weeks, weeks[1:], strict=False))
