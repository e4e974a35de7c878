"""How many candidates each source gives per user, chosen by measured recall (issue #14, part 3).

The sources overlap: on MovieLens recent popularity and EASE propose many of the same items, so
fixed counts per source spend the budget on duplicates, and the mix held less of the next week
than popularity's own list of the same length. Here each source's ranked list is computed to the
whole budget on labelled weeks before the holdout (the training plan's training and validation
weeks), and the counts are grown greedily, `ALLOCATION_STEP` candidates per user at a time: each
step extends the source whose next items add the most next-week items (truth pairs) per new
candidate, until the candidates per user would exceed the budget. The counts are stored with the
model and used wherever it is served or evaluated (`ranking.candidates.with_stored_counts`).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date

import numpy as np
import polars as pl

from ranking import metrics
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, source_candidates
from training.frames import labelled_users, sample_users

ALLOCATION_STEP = 10  # candidates per user a source gains at each greedy step


@dataclass(frozen=True)
class SourceRanks:
    """One week's candidates from every source at full depth, for its labelled users: per (user, item)
    proposed by any source, each source's rank (null where it did not propose it) and `truth`
    (consumed, new to the user, that week); `truth_items` counts every truth pair, proposed or not."""

    week: date
    ranks: pl.DataFrame
    users: int
    truth_items: int


@dataclass(frozen=True)
class Allocation:
    """The chosen counts per source and what they held on the weeks they were measured on: the recall
    (share of truth pairs among the candidates), the candidates per (user, week), and each source alone
    cut at that many candidates per user (`single_source`), for comparison."""

    counts: dict[str, int]
    budget: int
    candidates_per_user: float
    recall: float
    single_source: dict[str, float]
    weeks: list[date]
    users: int
    truth_items: int

    def config(self, base: CandidateConfig) -> CandidateConfig:
        """`base` with these counts."""
        return replace(base, **self.counts)

    @property
    def best_single_source(self) -> tuple[str, float]:
        return max(self.single_source.items(), key=lambda pair: (pair[1], -SOURCES.index(pair[0])))

    def record(self) -> dict:
        """As the registry stores it (JSON), beside the counts in the model's `candidates` params."""
        best, best_recall = self.best_single_source
        return {
            "counts": self.counts,
            "budget": self.budget,
            "step": ALLOCATION_STEP,
            "candidates_per_user": self.candidates_per_user,
            "recall": self.recall,
            "single_source": self.single_source,
            "best_single_source": best,
            "gain_over_best_single_source": self.recall - best_recall,
            "weeks": [str(w) for w in self.weeks],
            "users": self.users,
            "truth_items": self.truth_items,
        }


def source_ranks(
    tables: SnapshotTables, labels: pl.DataFrame, week: date, config: CandidateConfig, depth: int, users: pl.Series
) -> SourceRanks:
    """Every source's top `depth` candidates of `users` on one week, with the week's truth (`SourceRanks`)."""
    deep = replace(config, **dict.fromkeys(SOURCES, depth))
    lists, _ = source_candidates(tables, users, deep)
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id")).join(
        users.cast(pl.Int64).to_frame("user_id"), on="user_id", how="semi"
    )
    ranks = (
        pl.concat([lists[s].select("user_id", "item_id", f"{s}_rank") for s in SOURCES], how="diagonal")
        .group_by("user_id", "item_id")
        .agg(pl.all().max())
        .join(truth.with_columns(truth=pl.lit(True)), on=["user_id", "item_id"], how="left")
        .with_columns(pl.col("truth").fill_null(False))
        .sort("user_id", "item_id")
    )
    return SourceRanks(week, ranks, users.len(), truth.height)


def measure_weeks(
    weeks: list[date],
    *,
    week_of: Callable[[date], tuple[SnapshotTables, pl.DataFrame]],
    config: CandidateConfig,
    depth: int,
    max_users: int | None,
    seed: int,
) -> list[SourceRanks]:
    """`source_ranks` of each week's labelled users (at most `max_users`, the training frames' fixed-seed
    sample); `week_of(week)` gives the week's snapshot tables and labels."""
    measured = []
    for week in weeks:
        tables, labels = week_of(week)
        users = sample_users(labelled_users(labels, tables), max_users, seed)
        measured.append(source_ranks(tables, labels, week, config, depth, users))
    return measured


def allocate(measured: list[SourceRanks], budget: int, step: int = ALLOCATION_STEP) -> Allocation:
    """Counts per source, grown `step` at a time by the most truth pairs per new candidate, while the
    candidates per (user, week) stay within `budget` (see the module's docstring); ties go to the
    source listed first in `SOURCES`. Every source starts at 0: one that never adds a truth pair
    ahead of the others gets none."""
    if budget < 1:
        raise ValueError(f"candidate budget must be at least 1 per user, got {budget}")
    if step < 1:
        raise ValueError(f"allocation step must be at least 1, got {step}")
    if not measured:
        raise ValueError("allocate: no measured week to allocate on")
    frame = pl.concat([m.ranks for m in measured], how="vertical_relaxed")
    units = sum(m.users for m in measured)
    truth_items = sum(m.truth_items for m in measured)
    ranks = {s: frame.get_column(f"{s}_rank").cast(pl.Float64).fill_null(np.inf).to_numpy() for s in SOURCES}
    truth = frame.get_column("truth").to_numpy()
    covered = np.zeros(frame.height, dtype=bool)
    counts = dict.fromkeys(SOURCES, 0)
    while units:
        best, n_covered = None, int(covered.sum())
        for source in SOURCES:
            added = (ranks[source] > counts[source]) & (ranks[source] <= counts[source] + step) & ~covered
            n_added = int(added.sum())
            if n_added == 0 or (n_covered + n_added) / units > budget:
                continue
            hits_per_candidate = (added & truth).sum() / n_added
            if best is None or hits_per_candidate > best[0]:
                best = (hits_per_candidate, source, added)
        if best is None:
            break
        _, source, added = best
        covered |= added
        counts[source] += step
    per_user = covered.sum() / units if units else 0.0
    return Allocation(
        counts=counts,
        budget=budget,
        candidates_per_user=float(per_user),
        recall=float((covered & truth).sum() / truth_items) if truth_items else 0.0,
        single_source=single_source_recall(measured, per_user),
        weeks=[m.week for m in measured],
        users=units,
        truth_items=truth_items,
    )


def single_source_recall(measured: list[SourceRanks], per_user: float) -> dict[str, float]:
    """Each source alone, its top `per_user` (rounded) candidates per user: the share of truth pairs it holds."""
    frame = pl.concat([m.ranks for m in measured], how="vertical_relaxed").filter("truth")
    truth_items = sum(m.truth_items for m in measured)
    cut = max(int(round(per_user)), 1)
    return {s: (frame.filter(pl.col(f"{s}_rank") <= cut).height / truth_items if truth_items else 0.0) for s in SOURCES}
