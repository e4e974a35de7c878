"""The training flow says when its newest labelled week is older than the one that just closed."""

from datetime import date, timedelta

from training.plan import plan_weeks, staleness

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
