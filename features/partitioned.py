"""A feature snapshot computed in user partitions, so no step holds the whole event log.

Users fall into `count` partitions by a hash of their id (`recsys.partitions`: the same in
polars and in Postgres, and the one inference scores its partitions by). Each partition's
events alone give its users' rows of the user-keyed tables (user features, affinities,
history, labels) and three small partial aggregates: per-item play counts, the users'
baskets (their recent items) and the counts of item-to-next-item transitions (each user's
sequence lies in one partition). Merging them once gives the item-keyed tables. The result
equals `transform.build_week_tables` on the whole log, row for row and bit for bit
(tests/unit/test_partitioned.py), so the digests too.

Each partition also checks its own rows of the user-keyed tables (`check_partition_tables`:
every expectation made row by row, where the rows were computed), so the process that merges
them never converts a whole user table for great-expectations; it checks what needs the
whole table (row count, profile, drift against history) and the item-keyed tables. The
user-keyed tables built in that process, collaborative_scores and als_user_factors (EASE and ALS
are fitted on the merged history, and every user is scored in the same blocks as on the whole
log, so the scores are bit for bit the same), have their rows checked there one user partition at
a time (`check_merged_rows`), for the same reason.

Peak memory is one partition's events and pairs (times the partitions computed at once)
plus what does not shrink with the partition count: the snapshot's own tables (the writer
needs them whole, sorted, for the snapshot's digest and its one-transaction swap) and the
neighbour step (bounded by users x basket size, not by events). Shares spilled to Parquet
(`spill_partition_tables`, the flow's thread runner) wait for the merge on disk; in memory or not,
the merge reads one table's shares at a time and gathers it one range of user ids at a time, and
merges the transition counts one range of item ids at a time (`transform.id_ranges`), so the shares
and the merged snapshot are never held whole side by side.
"""

from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import polars as pl

from features import contracts, transform, validation
from features.collaborative import CollaborativeConfig
from features.raw import conform_items
from recsys.partitions import all_partitions, in_partition
from recsys.settings import default_of

# Rows of a user-keyed table the merge gathers at once (`_concat_sorted`): ≈ 0.3 GB of user_item_history.
MERGE_ROWS = 4_000_000


@dataclass(frozen=True, eq=False)
class PartitionTables:
    """What one partition contributes to a snapshot. The user-keyed tables and the transition counts, most of
    its size, are frames, or Parquet files scanned lazily once spilled (`spill_partition_tables`)."""

    tables: dict[str, pl.DataFrame | pl.LazyFrame]  # user-keyed tables (and labels) of the partition's users
    item_plays: pl.DataFrame  # transform.count_item_plays of the partition's pairs
    baskets: pl.DataFrame  # transform.select_baskets of the partition's pairs
    items: pl.DataFrame  # item metadata as conformed by the partition's read
    first_plays: pl.DataFrame  # (item_id, ts): each item's first event in the partition
    transitions: pl.DataFrame | pl.LazyFrame  # transform.count_transitions of the partition's events


def build_partition_tables(
    events: pl.DataFrame, items: pl.DataFrame, week: date, *, recent_items: int
) -> PartitionTables:
    """One partition's share of the snapshot computed at `week` (see `transform.build_week_tables`)."""
    pairs = transform.summarise_sorted_pairs(events, week)
    labels = transform.build_labels(events, transform.assign_as_of(contracts.LABELS.name, week))
    return PartitionTables(
        tables=transform.build_user_tables(pairs, items, week) | {contracts.LABELS.name: labels},
        item_plays=transform.count_item_plays(pairs),
        baskets=transform.select_baskets(pairs, recent_items),
        items=items,
        first_plays=events.group_by("item_id").agg(pl.col("ts").min()),
        transitions=transform.count_transitions(events, week),
    )


def spill_partition_tables(part: PartitionTables, folder: Path) -> PartitionTables:
    """`part` with its user-keyed tables and transition counts written to Parquet files in `folder` (created)
    and scanned from there: a week's partitions wait for their merge on disk, not in memory, and the merge
    reads one table's shares at a time (and the transitions one item range at a time). Parquet keeps every
    value and type, so the merged snapshot is the same (tests/unit/test_partitioned.py)."""
    folder.mkdir(parents=True, exist_ok=True)

    def spilled(name: str, frame: pl.DataFrame) -> pl.LazyFrame:
        path = folder / f"{name}.parquet"
        frame.write_parquet(path, statistics=True)  # row-group statistics: an item range skips the other groups
        return pl.scan_parquet(path)

    tables = {name: spilled(name, frame) for name, frame in part.tables.items()}
    return replace(part, tables=tables, transitions=spilled("transitions", part.transitions))


def check_partition_tables(tables: dict[str, pl.DataFrame], week: date) -> dict[str, list[dict]]:
    """Per user-keyed table, the failures of the row checks on one partition's rows (`validation.check_rows`
    without the row count); merged over partitions by `validation.merge_failures`."""
    runner = validation.SuiteRunner.of_this_thread()  # one great-expectations context per worker thread
    return {
        name: validation.check_rows(
            contracts.CONTRACTS[name], frame, as_of=transform.assign_as_of(name, week), runner=runner, row_count=False
        )
        for name, frame in tables.items()
    }


def check_merged_rows(frame: pl.DataFrame, name: str, week: date, count: int) -> list[dict]:
    """The row checks of a user-keyed table built whole in this process (collaborative_scores, fitted on
    the merged history), made one user partition at a time: the failures of the whole table but its row
    count (see `check_partition_tables`), without converting the whole table for great-expectations."""
    shares = (frame.filter(in_partition("user_id", partition)) for partition in all_partitions(count))
    return validation.merge_failures([check_partition_tables({name: share}, week)[name] for share in shares])


def merge_partition_tables(
    parts: list[PartitionTables],
    week: date,
    *,
    neighbours: int,
    collaborative: CollaborativeConfig = transform.DEFAULT_COLLABORATIVE,
    collaborative_items: int = default_of("collaborative_items_per_user"),
) -> dict[str, pl.DataFrame]:
    """The snapshot computed at `week` from its partitions: `transform.build_week_tables` of the whole log.

    Consumes the parts' user-keyed tables: each table's shares leave the parts once merged."""
    if not parts:
        raise ValueError("merge_partition_tables: no partitions to merge")
    # A release date after an item's first event moves back to it: the first event over all partitions.
    items = conform_items(parts[0].items, pl.concat([p.first_plays for p in parts]), source="merged partitions")
    tables = {name: _concat_sorted(name, [p.tables.pop(name) for p in parts]) for name in list(parts[0].tables)}
    if not tables[contracts.LABELS.name].height:
        del tables[contracts.LABELS.name]  # as for the whole log: a week without events has no labels
    plays = transform.merge_item_plays([p.item_plays for p in parts])
    baskets = pl.concat([p.baskets for p in parts])
    tables[contracts.ITEM_FEATURES.name] = transform.build_item_features(plays, items, week)
    tables[contracts.ITEM_NEIGHBOURS.name] = transform.build_item_neighbours(baskets, week, neighbours)
    # EASE and ALS learn from the whole user × item matrix: fitted once, on the merged history.
    tables |= transform.build_collaborative_tables(
        tables[contracts.USER_ITEM_HISTORY.name], week, collaborative, items_per_user=collaborative_items
    )
    transitions = [p.transitions for p in parts]
    tables[contracts.ITEM_TRANSITIONS.name] = transform.build_item_transitions_of_parts(transitions, week, neighbours)
    return transform.order_tables(tables)


def build_week_tables(
    events: pl.DataFrame,
    items: pl.DataFrame,
    week: date,
    *,
    partitions: int,
    recent_items: int,
    neighbours: int,
    collaborative: CollaborativeConfig = transform.DEFAULT_COLLABORATIVE,
    collaborative_items: int = default_of("collaborative_items_per_user"),
) -> dict[str, pl.DataFrame]:
    """`transform.build_week_tables` computed in `partitions` user partitions within this process."""
    merged = {"neighbours": neighbours, "collaborative": collaborative, "collaborative_items": collaborative_items}
    if partitions == 1:
        return transform.build_week_tables(events, items, week, recent_items=recent_items, **merged)
    parts = []
    for partition in all_partitions(partitions):
        own = events.filter(in_partition("user_id", partition))
        parts.append(build_partition_tables(own, items, week, recent_items=recent_items))
    return merge_partition_tables(parts, week, **merged)


def _concat_sorted(name: str, frames: list[pl.DataFrame | pl.LazyFrame]) -> pl.DataFrame:
    """The partitions' rows of a user-keyed table, sorted by its key (user_id first) as each part is. Consumes
    `frames` (emptied). Gathered one range of user ids at a time (`MERGE_ROWS` rows), so the merge holds the
    table once plus one range, not the concatenated parts beside the sorted copy (3 GB at a million users)."""
    entity = [k for k in contracts.CONTRACTS[name].key if k != "as_of"]
    if entity[0] != "user_id":
        raise ValueError(f"table {name}: key {entity} does not start with user_id: not a user-keyed table")
    lazy = [frame.lazy() for frame in frames]
    frames.clear()
    # Each part is sorted by the whole key and holds all rows of its users: a stable order by
    # user_id alone is the key's order. Gathering a range's rows by it copies them once (a
    # frame's sort needed about twice the table's size on top at 10M events).
    ranges = []
    for within in transform.id_ranges(lazy, "user_id", MERGE_ROWS):
        rows = pl.concat([frame.filter(within) for frame in lazy]).collect()
        order = rows.select(pl.int_range(pl.len(), dtype=pl.get_index_type()).sort_by("user_id", maintain_order=True))
        ranges.append(rows[order.to_series()])
    return pl.concat(ranges)
