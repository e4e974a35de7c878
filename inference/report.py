"""The publication summary shown in the Prefect UI."""

from datetime import date

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
) -> str:
    """What was published from which model and snapshot, how long each step took, and sample lists."""
    stale = [f"⚠️ the latest passed feature snapshot is {snapshot}, older than as_of {as_of}", ""]
    lines = [
        f"# Published {result.version}",
        "",
        *(stale if snapshot < as_of else []),
        f"- model: {record.name} v{record.version}; feature snapshot {snapshot}; previous version {result.previous}",
        f"- users with personal lists: {stats['personal']}; users on the fallback: {stats['fallback_users']}",
        f"- wall time (s): scoring and writing {stats['partitions_s']:.1f} "
        f"({stats['users_per_s']:.0f} users/s), pointer swap {stats['finish_s']:.2f}, total {stats['total_s']:.1f}",
        f"- summed over partitions (s): read {stats['read_s']:.1f}, score {stats['score_s']:.1f}, "
        f"write {stats['write_s']:.1f}",
        "",
        "| user | items |",
        "|---|---|",
        *[f"| {s.user_id} | {s.items[:10]} |" for s in samples],
    ]
    return "\n".join(lines)
