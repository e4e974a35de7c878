"""The publication summary shown in the Prefect UI."""

from datetime import date

from inference.checks import CheckReport
from inference.publish import PublishResult
from inference.serving import Recommendation
from ranking.registry import ModelRecord


def publication_markdown(
    result: PublishResult,
    record: ModelRecord,
    as_of: date,
    snapshot: date,
    stats: dict,
    samples: list[Recommendation],
    source: str | None = None,
) -> str:
    """What was published from which model and snapshot, how long each step took, and sample lists."""
    stale = [f"⚠️ the latest passed feature snapshot is {snapshot}, older than as_of {as_of}", ""]
    lines = [
        f"# Published {result.version}",
        "",
        *(stale if snapshot < as_of else []),
        f"- model: {record.label}; feature snapshot {snapshot} from source `{source or 'not recorded'}`; "
        f"previous version {result.previous}",
        f"- users with personal lists: {stats['personal']}; users on the fallback: {stats['fallback_users']}",
        f"- wall time (s): scoring and writing {stats['partitions_s']:.1f} "
        f"({stats['users_per_s']:.0f} users/s), pointer swap {stats['finish_s']:.2f}, total {stats['total_s']:.1f}",
        f"- summed over partitions (s): read {stats['read_s']:.1f}, score {stats['score_s']:.1f}, "
        f"write {stats['write_s']:.1f}"
        + "".join(f"; score: {step} {seconds:.1f}" for step, seconds in stats.get("score_steps", {}).items()),
        *(checks_lines(result.checks) if result.checks else []),
        "",
        "| user | items |",
        "|---|---|",
        *[f"| {s.user_id} | {s.items[:10]} |" for s in samples],
    ]
    return "\n".join(lines)


def checks_lines(report: CheckReport) -> list[str]:
    """The numbers the lists were checked on before they went live, as markdown list items."""
    overlap = "n/a" if report.median_overlap is None else f"{report.median_overlap:.2f}"
    changed = "n/a" if report.changed_share is None else f"{report.changed_share:.1%}"
    return [
        f"- checks: lists changed since the live version {changed}, median overlap {overlap}; catalogue coverage "
        f"{report.coverage:.1%}; fallback share {report.fallback_share:.1%}",
        f"- list lengths min {report.min_length}, median {report.median_length:g}; items not in the item table "
        f"{report.unknown_items}; lists starting with the most common top item {report.top_item_share:.1%}",
    ]
