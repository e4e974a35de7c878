"""Checks of a new publication before readers see it: its lists against the live ones and against bounds.

Pure: frames in (each `user_id, items`), a `CheckReport` with the numbers and the reasons
to hold the publication out. The publish protocol (`inference.publish`) reads the frames
from Redis and holds a publication whose report has reasons.
"""

from dataclasses import asdict, dataclass

import polars as pl


@dataclass(frozen=True)
class CheckBounds:
    """What a publication may look like (settings `RECSYS_PUBLISH_<FIELD>`); the defaults hold only broken lists."""

    max_top_item_share: float = 0.98
    max_unknown_items: int = 0
    min_list_length: int = 1
    max_fallback_share: float = 0.9
    hold_unchanged: bool = True


@dataclass(frozen=True)
class CheckReport:
    """A publication's numbers; `reasons` is empty when it is within bounds.

    Shares over personal lists; `changed_share` and `median_overlap` are None without a live version.
    """

    users: int
    fallback_users: int
    changed_share: float | None
    median_overlap: float | None
    coverage: float
    fallback_share: float
    min_length: int
    median_length: float
    unknown_items: int
    top_item_share: float
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        """The report as plain JSON-able values."""
        return asdict(self) | {"reasons": list(self.reasons)}


def check_publication(
    new: pl.DataFrame,
    live: pl.DataFrame | None,
    catalogue: pl.Series,
    *,
    fallback_users: int,
    snapshot_changed: bool,
    bounds: CheckBounds,
) -> CheckReport:
    """Compare the new lists with the live ones (None: nothing live) and with themselves, then with `bounds`.

    `catalogue` is the item ids of the snapshot's item table; `fallback_users` the scored users
    without a personal list; `snapshot_changed` whether the feature snapshot differs from the live one's.
    """
    lengths = new["items"].list.len()
    items = new["items"].explode().drop_nulls().unique()
    tops = new["items"].list.first().value_counts(sort=True)
    changed, overlap = compare_lists(new, live) if live is not None else (None, None)
    report = CheckReport(
        users=new.height,
        fallback_users=fallback_users,
        changed_share=changed,
        median_overlap=overlap,
        coverage=_share(items.is_in(catalogue.implode()).sum(), catalogue.n_unique()),
        fallback_share=_share(fallback_users, new.height + fallback_users),
        min_length=int(lengths.min() or 0),
        median_length=float(lengths.median() or 0.0),
        unknown_items=int((~items.is_in(catalogue.implode())).sum()),
        top_item_share=_share(tops["count"][0], new.height) if new.height else 0.0,
        reasons=(),
    )
    return CheckReport(**{**asdict(report), "reasons": _reasons(report, bounds, snapshot_changed)})


def compare_lists(new: pl.DataFrame, live: pl.DataFrame) -> tuple[float, float | None]:
    """Share of users (of either version) whose list changed; median per-user overlap |new ∩ live| / n.

    n is the longer of the user's two lists; the overlap is over users in both (None if none is).
    """
    joined = new.join(live, on="user_id", how="full", coalesce=True, suffix="_live")
    changed = joined.select(pl.col("items").ne_missing(pl.col("items_live")).sum()).item()
    both = joined.drop_nulls(["items", "items_live"])
    overlap = both.select(
        (
            pl.col("items").list.set_intersection("items_live").list.len()
            / pl.max_horizontal(pl.col("items").list.len(), pl.col("items_live").list.len())
        ).median()
    ).item()
    return _share(changed, joined.height), overlap


def _reasons(report: CheckReport, bounds: CheckBounds, snapshot_changed: bool) -> tuple[str, ...]:
    checks = [
        (
            report.top_item_share > bounds.max_top_item_share,
            f"{report.top_item_share:.1%} of lists start with the same item "
            f"(above max_top_item_share {bounds.max_top_item_share})",
        ),
        (
            report.unknown_items > bounds.max_unknown_items,
            f"{report.unknown_items} recommended items are not in the snapshot's item table "
            f"(above max_unknown_items {bounds.max_unknown_items})",
        ),
        (
            report.users > 0 and report.min_length < bounds.min_list_length,
            f"the shortest list has {report.min_length} items (below min_list_length {bounds.min_list_length})",
        ),
        (
            report.fallback_share > bounds.max_fallback_share,
            f"{report.fallback_share:.1%} of users get the fallback (above max_fallback_share "
            f"{bounds.max_fallback_share})",
        ),
        (
            bounds.hold_unchanged and snapshot_changed and report.changed_share == 0,
            "no user's list changed although the feature snapshot did (hold_unchanged)",
        ),
    ]
    return tuple(reason for failed, reason in checks if failed)


def _share(part: int, whole: int) -> float:
    return float(part) / whole if whole else 0.0
