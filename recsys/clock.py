"""The weekly clock: `as_of` is a Monday 00:00 UTC."""

from datetime import UTC, date, datetime, timedelta


def week_floor(moment: datetime | date) -> date:
    """The Monday on or before `moment` (in UTC)."""
    if isinstance(moment, datetime):
        moment = (moment.astimezone(UTC) if moment.tzinfo else moment).date()
    return moment - timedelta(days=moment.weekday())


def parse_as_of(value: str | date) -> date:
    """An `as_of` from user input: an ISO date that must be a Monday."""
    try:
        day = value if isinstance(value, date) else date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"as_of {value!r} is not an ISO date (YYYY-MM-DD)") from None
    if day.weekday() != 0:
        raise ValueError(f"as_of {day} is a {day:%A}; as_of must be a Monday (week boundary), e.g. {week_floor(day)}")
    return day


def mondays(first: date | str, last: date | str) -> list[date]:
    """Every week boundary from `first` to `last` inclusive, oldest first; both must be Mondays."""
    start, end = parse_as_of(first), parse_as_of(last)
    if start > end:
        raise ValueError(f"the first week {start} is after the last week {end}")
    return [start + timedelta(weeks=k) for k in range((end - start).days // 7 + 1)]
