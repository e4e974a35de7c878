"""The feature flow's validation report in markdown: what was read, each week's tables, failures."""

from datetime import date

from features.validation import ValidationReport


def describe_read(events: int, duplicates: int, spec: str) -> str:
    """One line: how many events (and dropped duplicates) came from which source."""
    return f"Read {events} events ({duplicates} duplicates dropped) from `{spec}`."


def summarise_week(week: date, reports: dict[str, ValidationReport]) -> str:
    """A markdown section for one written snapshot: rows and warnings per table."""
    rows = [
        f"| {r.table} | {r.as_of} | {r.row_count} | {'passed' if r.success else 'FAILED'} | {len(r.all_warnings)} |"
        for r in reports.values()
    ]
    drift = [f"- ⚠️ {w}" for r in reports.values() for w in r.warnings]
    row_counts = [f"- ⚠️ {r.row_count_warning}" for r in reports.values() if r.row_count_warning]
    return "\n".join(
        [
            f"## Snapshot {week}",
            "",
            "| table | as_of | rows | validation | warnings |",
            "|---|---|---|---|---|",
            *rows,
            *(["", "Drift (warnings, not blocking):", "", *drift] if drift else []),
            *(["", "Row counts (warnings, not blocking):", "", *row_counts] if row_counts else []),
            "",
        ]
    )


def render_passed(read: str, sections: list[str]) -> str:
    """The report of a run whose snapshots all passed and were written."""
    return "\n".join(["# Feature validation passed", "", read, "", *sections])


def render_failed(read: str, reports: dict[str, ValidationReport], written: list[str]) -> str:
    """The report of a run stopped by a failed snapshot: its tables, then what was written before it."""
    earlier = ["", "## Written before the failure", "", *written] if written else []
    return "\n".join(
        ["# Feature validation FAILED", "", read, "", *(r.to_markdown() for r in reports.values()), *earlier]
    )


def render_nothing_to_do(weeks: list[date], spec: str) -> str:
    """The report of a run that found every requested week already passed: why the run wrote nothing."""
    span = f"{weeks[0]} … {weeks[-1]}" if len(weeks) > 1 else str(weeks[0])
    return "\n".join(
        [
            "# Feature validation: nothing to compute",
            "",
            f"All {len(weeks)} week(s) already passed validation: {span} (source `{spec}`); nothing was read or "
            "written. `--force` (parameter `force=True`) recomputes them.",
        ]
    )
