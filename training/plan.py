"""Which weeks train, validate and evaluate a model: the one planning rule of the training
flow and the backtest."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta

from recsys.errors import ExpectedError

WEEK = timedelta(weeks=1)


@dataclass(frozen=True)
class WeekPlan:
    """Which labelled snapshots train, validate and evaluate a model trained at `as_of`.

    `validation` holds the weeks early stopping and tuning score on, pooled (oldest first); the
    refit then trains on `train` and `validation` together."""

    as_of: date
    train: list[date]
    validation: list[date]
    holdout: date

    @property
    def weeks(self) -> list[date]:
        """Every week the model is built from, oldest first."""
        return [*self.train, *self.validation, self.holdout]


class NotEnoughHistory(ExpectedError, ValueError):
    """Fewer labelled snapshots before `as_of` than a model needs."""


@dataclass(frozen=True)
class Widening:
    """More training weeks where weeks are small: older labelled weeks join the training weeks, newest first,
    while these hold fewer than `min_users` labelled users (summed over weeks, `users` per week), up to
    `max_weeks` training weeks in all. A log whose `training_weeks` already hold `min_users` plans as without it."""

    users: Mapping[date, int]
    min_users: int
    max_weeks: int


def plan_weeks(
    labelled: list[date],
    as_of: date,
    training_weeks: int,
    validation_weeks: int = 1,
    widening: Widening | None = None,
) -> WeekPlan:
    """Latest labelled week before `as_of` is the holdout, up to `validation_weeks` before it validate,
    up to `training_weeks` earlier ones train (more with a `widening`, when they hold few users). Only weeks
    whose labels are complete count. With little history both shrink, the validation weeks last (a fresh
    deployment trains from 3 labelled weeks): at least one week trains and one validates."""
    if training_weeks < 1 or validation_weeks < 1:
        raise ValueError(
            f"plan_weeks: training_weeks and validation_weeks must be >= 1, got {training_weeks} and {validation_weeks}"
        )
    usable = sorted(d for d in set(labelled) if d + WEEK <= as_of)
    if len(usable) < 3:
        raise NotEnoughHistory(
            f"training as of {as_of} needs at least 3 weeks with labelled users before it (training weeks, "
            f"a validation week, a holdout week); found {len(usable)}: {[str(d) for d in usable]}. "
            "Compute feature snapshots of earlier weeks (recsys features --from ... --to ...) or pick a later week"
        )
    first_validation = len(usable) - 1 - min(validation_weeks, len(usable) - 2)
    first_train = max(0, first_validation - training_weeks)
    if widening is not None:
        oldest = max(0, first_validation - widening.max_weeks)
        while first_train > oldest and _users(widening, usable[first_train:first_validation]) < widening.min_users:
            first_train -= 1
    return WeekPlan(
        as_of=as_of,
        train=usable[first_train:first_validation],
        validation=usable[first_validation:-1],
        holdout=usable[-1],
    )


def widens(training_weeks: int, min_users: int, max_weeks: int) -> bool:
    """Whether a `Widening(min_users, max_weeks)` can add weeks to `training_weeks`: a minimum is set and the
    maximum lies beyond them (the training flow, the backtest and its report ask this one rule)."""
    return min_users > 0 and max_weeks > training_weeks


def _users(widening: Widening, weeks: list[date]) -> int:
    return sum(widening.users.get(w, 0) for w in weeks)


def plan_gate(
    labelled: list[date],
    as_of: date,
    training_weeks: int,
    gate_weeks: int,
    validation_weeks: int = 1,
    widening: Widening | None = None,
) -> list[WeekPlan]:
    """The plans of the gate's weeks, oldest first: the latest `gate_weeks` labelled weeks as holdouts,
    each with the plan a run one week after it makes (trained on its past only). The last is the
    plan at `as_of` (raises NotEnoughHistory like `plan_weeks`); earlier weeks with too little
    history before them are left out."""
    if gate_weeks < 1:
        raise ValueError(f"plan_gate: gate_weeks must be >= 1, got {gate_weeks}")
    latest = plan_weeks(labelled, as_of, training_weeks, validation_weeks, widening)
    earlier = sorted(d for d in set(labelled) if d < latest.holdout)
    plans = []
    for holdout in earlier[max(0, len(earlier) - gate_weeks + 1) :]:
        try:
            plans.append(plan_weeks(labelled, holdout + WEEK, training_weeks, validation_weeks, widening))
        except NotEnoughHistory:
            continue
    return [*plans, latest]


def plan_refit(
    labelled: list[date],
    latest: WeekPlan,
    training_weeks: int,
    validation_weeks: int = 1,
    widening: Widening | None = None,
) -> WeekPlan:
    """The model served after the gate: `latest`'s recipe refitted through its holdout H, on the weeks the next
    week's run plans for its gate model of holdout H + 1 week (that plan, its holdout not yet labelled), so that
    run reuses it as that gate model instead of training it again. Weeks after H are left out, as at H + 1 week."""
    following = latest.holdout + WEEK
    known = [d for d in labelled if d <= latest.holdout]
    return plan_weeks([*known, following], following + WEEK, training_weeks, validation_weeks, widening)


def staleness(plan: WeekPlan) -> str | None:
    """A warning when the newest labelled week is older than the week that closed at `as_of`."""
    expected = plan.as_of - WEEK
    if plan.holdout >= expected:
        return None
    return (
        f"the newest labelled snapshot is {plan.holdout}, older than the expected {expected} "
        f"({(expected - plan.holdout).days // 7} week(s) behind): training on what the feature flow last "
        f"produced that passed; run the feature flow as of {plan.as_of} to catch up"
    )
