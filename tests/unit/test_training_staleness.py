"""The training flow says when its newest labelled week is older than the one that just closed."""

from datetime import date, timedelta

import pytest

from training.plan import NotEnoughHistory, plan_gate, plan_weeks, staleness

AS_OF = date(2026, 11, 23)
WEEK = timedelta(weeks=1)


def test_up_to_date_labels_are_not_reported():
    labelled = [AS_OF - n * WEEK for n in range(1, 6)]
    assert staleness(plan_weeks(labelled, AS_OF, training_weeks=2)) is None


def test_labels_two_weeks_behind_name_both_weeks_and_the_catch_up_command():
    labelled = [AS_OF - n * WEEK for n in range(3, 8)]
    message = staleness(plan_weeks(labelled, AS_OF, training_weeks=2))
    assert message is not None
    assert str(AS_OF - 3 * WEEK) in message and str(AS_OF - WEEK) in message
    assert "2 week(s) behind" in message and f"feature flow as of {AS_OF}" in message


def test_the_gate_plans_each_of_its_weeks_on_that_weeks_past_only():
    labelled = [date(2024, 1, 1) + timedelta(weeks=n) for n in range(8)]  # Jan 1 … Feb 19
    plans = plan_gate(labelled, date(2024, 2, 26), training_weeks=2, gate_weeks=4)
    assert [p.holdout for p in plans] == labelled[-4:]
    assert plans[-1] == plan_weeks(labelled, date(2024, 2, 26), 2)
    for p in plans:
        assert max(p.train) < min(p.validation) and max(p.validation) < p.holdout and len(p.train) == 2
        assert p.validation == [p.holdout - timedelta(weeks=1)]


def test_the_gate_leaves_out_weeks_with_too_little_history_and_needs_one_week_at_least():
    labelled = [date(2024, 1, 1) + timedelta(weeks=n) for n in range(4)]
    plans = plan_gate(labelled, date(2024, 1, 29), training_weeks=4, gate_weeks=4)
    assert [p.holdout for p in plans] == labelled[-2:]  # the first two weeks have no validation week before them
    assert [p.holdout for p in plan_gate(labelled, date(2024, 1, 29), 4, 1)] == labelled[-1:]
    with pytest.raises(NotEnoughHistory):
        plan_gate(labelled[:2], date(2024, 1, 29), 4, 4)
