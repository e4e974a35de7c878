"""How many candidates each source gives per user, chosen by measured recall (issue #14, part 3).

The sources overlap: on MovieLens recent popularity and EASE propose many of the same items, so
fixed counts per source spend the budget on duplicates, and the mix held less of the next week
than popularity's own list of the same length. Here each source's ranked list is computed to the
whole budget on labelled weeks before the holdout (the training plan's training and validation
weeks), and the counts are grown greedily, `ALLOCATION_STEP` candidates per user at a time: each
step extends the source whose next items add the most next-week items (truth pairs) per new
candidate, until the candidates per user would exceed the budget. The counts are stored with the
model and used wherever it is served or evaluated (`ranking.candidates.with_stored_counts`).

The sources differ by kind of user more than by kind of item (on MovieLens popularity holds most of
the next week of users with a short history, EASE and co-occurrence more of heavy raters'), so the
counts can be chosen per history band: the measured (user, week) units are split into a few bands
of about as many units each by their history length (events before the week, `events_total`; the
edges from the measured weeks only, `band_edges`), and each band gets its own greedy counts within
the same budget per user. Candidate generation then keeps each user's band's counts
(`ranking.candidates.keep_band_counts`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date

import numpy as np
import polars as pl

from ranking import metrics
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, history_band, source_candidates
from training.frames import labelled_users, sample_users

ALLOCATION_STEP = 10  # candidates per user a source gains at each greedy step


@dataclass(frozen=True)
class SourceRanks:
    """One week's candidates from every source at full depth, for its labelled users: per (user, item)
    proposed by any source, each source's rank (null where it did not propose it) and `truth`
    (consumed, new to the user, that week); per user (`users`) the history length (`events`: events before
    the week, `events_total` of the snapshot) and the count of truth pairs, proposed or not (`truth_items`)."""

    week: date
    ranks: pl.DataFrame
    users: pl.DataFrame

    @property
    def units(self) -> int:
        return self.users.height

    @property
    def truth_items(self) -> int:
        return int(self.users.get_column("truth_items").sum())


@dataclass(frozen=True)
class Allocation:
    """The chosen counts per source and what they held on the weeks they were measured on: the recall
    (share of truth pairs among the candidates), the candidates per (user, week), and each source alone
    cut at that many candidates per user (`single_source`), for comparison.

    With history bands, `band_counts[i]` are the counts of users with at least `band_edges[i - 1]` and fewer
    than `band_edges[i]` past events (`band_units[i]` of the measured (user, week) units), and `counts` the
    most of any band (how deep each source is generated); with one band, `band_edges` is empty and
    `band_counts == [counts]`."""

    counts: dict[str, int]
    budget: int
    candidates_per_user: float
    recall: float
    single_source: dict[str, float]
    weeks: list[date]
    users: int
    truth_items: int
    band_edges: tuple[int, ...] = ()
    band_counts: list[dict[str, int]] = field(default_factory=list)
    band_units: list[int] = field(default_factory=list)

    def config(self, base: CandidateConfig) -> CandidateConfig:
        """`base` with these counts (and, with bands, each band's)."""
        bands = tuple(tuple(c[s] for s in SOURCES) for c in self.band_counts) if self.band_edges else ()
        return replace(base, **self.counts, band_edges=self.band_edges, band_counts=bands)

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
            "band_edges": list(self.band_edges),
            "band_counts": self.band_counts,
            "band_units": self.band_units,
        }


def source_ranks(
    tables: SnapshotTables, labels: pl.DataFrame, week: date, config: CandidateConfig, depth: int, users: pl.Series
) -> SourceRanks:
    """Every source's top `depth` candidates of `users` on one week, with the week's truth (`SourceRanks`)."""
    deep = replace(config, **dict.fromkeys(SOURCES, depth))
    lists, _ = source_candidates(tables, users, deep)
    who = users.cast(pl.Int64).unique().sort().to_frame("user_id")
    truth = metrics.evaluation_truth(labels, tables.user_features.select("user_id")).join(who, on="user_id", how="semi")
    ranks = (
        pl.concat([lists[s].select("user_id", "item_id", f"{s}_rank") for s in SOURCES], how="diagonal")
        .group_by("user_id", "item_id")
        .agg(pl.all().max())
        .join(truth.with_columns(truth=pl.lit(True)), on=["user_id", "item_id"], how="left")
        .with_columns(pl.col("truth").fill_null(False))
        .sort("user_id", "item_id")
    )
    per_user = (
        who.join(tables.user_features.select("user_id", events="events_total"), on="user_id", how="left")
        .join(truth.group_by("user_id").agg(truth_items=pl.len()), on="user_id", how="left")
        .select(
            "user_id", pl.col("events").fill_null(0).cast(pl.Int64), pl.col("truth_items").fill_null(0).cast(pl.Int64)
        )
    )
    return SourceRanks(week, ranks, per_user)


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


def band_edges(measured: list[SourceRanks], bands: int) -> tuple[int, ...]:
    """History lengths that split the measured (user, week) units into `bands` bands of about as many units
    each: the i-th edge is the history length of the unit at position ceil(i × units / bands) in ascending
    order (a band holds the lengths from its edge up to the next). Equal edges and one at the shortest length
    are dropped, so many users of one length make fewer bands; () for one band."""
    if bands < 1:
        raise ValueError(f"history bands must be at least 1, got {bands}")
    events = np.sort(np.concatenate([m.users.get_column("events").to_numpy() for m in measured]))
    if bands == 1 or not len(events):
        return ()
    at = [min(math.ceil(i * len(events) / bands), len(events) - 1) for i in range(1, bands)]
    return tuple(sorted({int(events[i]) for i in at if events[i] > events[0]}))


def allocate(measured: list[SourceRanks], budget: int, step: int = ALLOCATION_STEP, bands: int = 1) -> Allocation:
    """Counts per source, grown `step` at a time by the most truth pairs per new candidate, while the
    candidates per (user, week) stay within `budget` (see the module's docstring); ties go to the
    source listed first in `SOURCES`. Every source starts at 0: one that never adds a truth pair
    ahead of the others gets none. With `bands` > 1 the units are split by history length
    (`band_edges`) and each band gets its own counts, chosen the same way on its units alone, its
    candidates per (user, week) within `budget` too."""
    if budget < 1:
        raise ValueError(f"candidate budget must be at least 1 per user, got {budget}")
    if step < 1:
        raise ValueError(f"allocation step must be at least 1, got {step}")
    if not measured:
        raise ValueError("allocate: no measured week to allocate on")
    edges = band_edges(measured, bands)
    bands_of = [m.users.select("user_id", band=history_band(pl.col("events"), edges)) for m in measured]
    frame = pl.concat(
        [m.ranks.join(b, on="user_id") for m, b in zip(measured, bands_of, strict=True)], how="vertical_relaxed"
    )
    unit_bands = pl.concat(bands_of).get_column("band").to_numpy()
    units = sum(m.units for m in measured)
    truth_items = sum(m.truth_items for m in measured)
    ranks = {s: frame.get_column(f"{s}_rank").cast(pl.Float64).fill_null(np.inf).to_numpy() for s in SOURCES}
    truth = frame.get_column("truth").to_numpy()
    row_bands = frame.get_column("band").to_numpy()
    covered = np.zeros(frame.height, dtype=bool)
    band_counts, band_units = [], []
    for band in range(len(edges) + 1):
        rows = row_bands == band
        band_units.append(int((unit_bands == band).sum()))
        counts, in_band = _greedy({s: r[rows] for s, r in ranks.items()}, truth[rows], band_units[-1], budget, step)
        covered[rows] = in_band
        band_counts.append(counts)
    per_user = covered.sum() / units if units else 0.0
    return Allocation(
        counts={s: max(c[s] for c in band_counts) for s in SOURCES},
        budget=budget,
        candidates_per_user=float(per_user),
        recall=float((covered & truth).sum() / truth_items) if truth_items else 0.0,
        single_source=single_source_recall(measured, per_user),
        weeks=[m.week for m in measured],
        users=units,
        truth_items=truth_items,
        band_edges=edges,
        band_counts=band_counts,
        band_units=band_units,
    )


def _greedy(
    ranks: dict[str, np.ndarray], truth: np.ndarray, units: int, budget: int, step: int
) -> tuple[dict[str, int], np.ndarray]:
    """`allocate`'s greedy over one set of (user, item) rows of `units` (user, week) units: the counts per
    source and which rows they cover."""
    covered = np.zeros(len(truth), dtype=bool)
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
    return counts, covered


def single_source_recall(measured: list[SourceRanks], per_user: float) -> dict[str, float]:
    """Each source alone, its top `per_user` (rounded) candidates per user: the share of truth pairs it holds."""
    frame = pl.concat([m.ranks for m in measured], how="vertical_relaxed").filter("truth")
    truth_items = sum(m.truth_items for m in measured)
    cut = max(int(round(per_user)), 1)
    return {s: (frame.filter(pl.col(f"{s}_rank") <= cut).height / truth_items if truth_items else 0.0) for s in SOURCES}


def counts_text(record: dict) -> str:
    """The counts of an `Allocation.record()` as one line: "pop 80, cf 100", or per history band "< 60 events:
    pop 120, cf 80; 60–149 events: …; ≥ 150 events: …" (a record stored before the bands: the first form)."""

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{source} {n}" for source, n in counts.items() if n) or "none"

    edges = record.get("band_edges") or []
    if not edges:
        return listed(record["counts"])
    labels = [
        f"< {edges[0]}",
        *[f"{low}–{high - 1}" for low, high in zip(edges, edges[1:], strict=False)],
        f"≥ {edges[-1]}",
    ]
    return "; ".join(
        f"{label} events: {listed(counts)}" for label, counts in zip(labels, record["band_counts"], strict=True)
    )
