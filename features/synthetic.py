"""Synthetic logs (worlds) with structure a ranker can learn and popularity cannot.

Two kinds (`KINDS`), each drawn from a seed alone:

- `demo` (`generate_log`): a listening log. Items belong to ~20 genres and to artists
  (creators) who mostly stay in one genre; popularity is Zipf-like; new releases appear
  during the window, trend, then fade. Users join over time, differ widely in activity,
  concentrate on a few favourite genres (Dirichlet taste) and keep returning to a few
  favourite artists. Taste is fixed, so the next week is predictable from the past ones by
  a model of user×genre/artist affinity.
- `sequential` (`generate_sequential_log`): episodes of series, watched in order. Popularity
  is nearly useless (taste clusters of equal size, each with its own series); what predicts
  the next week is collaborative and sequential: a user who watched episode k of a series
  watches k+1 next, starts new series by the creators they follow, and draws them from the
  series their taste cluster (a group of users sharing item sets) watches.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData, drop_duplicate_events
from features.transform import week_start

# fmt: off
CATEGORIES = (
    "pop", "rock", "hip-hop", "electronic", "r&b", "latin", "country", "indie", "metal", "jazz",
    "classical", "folk", "soul", "reggae", "punk", "blues", "k-pop", "ambient", "house", "techno",
)
# fmt: on
DAY_US = 86_400_000_000
WEEK_US = 7 * DAY_US
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Shape of the world; fixed so that a seed alone reproduces a log.
ITEMS_PER_CREATOR = 6
POPULARITY_EXPONENT = 0.8  # Zipf exponent of item appeal by rank
CREATOR_FAME_SIGMA = 0.7  # lognormal spread of creators' fame, which lifts all their items
ACTIVITY_SIGMA = 1.1  # lognormal spread of users' activity
CREATOR_GENRE_LOYALTY = 0.9  # share of a creator's items in the creator's own genre
NEW_RELEASE_SHARE = 0.25  # items released during the window, at the start of a week
CATALOGUE_MAX_AGE_DAYS = 3 * 365
HYPE_DAYS = 10.0  # e-folding time of a new release's extra popularity
TASTE_CONCENTRATION = 1.5  # Dirichlet total mass: small means a few favourite genres
FAVOURITE_CREATORS = 3
RETURNING_USER_SHARE = 0.6  # users present from the first day; the others join later
# An event is by a favourite creator / in a genre drawn from taste / anything trending.
BRANCH_SHARES = (0.3, 0.55, 0.15)
GENRE_EXPONENT = 0.8  # Zipf exponent of genres' overall popularity

KINDS = ("demo", "sequential")
DEFAULT_KIND = "demo"

# Shape of the sequential world.
EPISODES = (3, 12)  # episodes per series, uniform between the bounds
SERIES_PER_CREATOR = 3
USERS_PER_CLUSTER = 200  # taste clusters of about this many users, all the same size on average
CLUSTER_CREATORS = 5  # creators whose every series a cluster watches
CLUSTER_EXTRA_SERIES = 5  # and a few other series
SEQUENTIAL_ACTIVITY_SIGMA = 0.8
NEXT_EPISODE = 0.8  # after an episode, the next one of the series (otherwise a new series)
SAME_CREATOR = 0.5  # a new series: one by the creator of the last one, if any is left
OUTSIDE_CLUSTER = 0.05  # a new series: any in the catalogue (noise)
REWATCH = 0.05  # an event re-plays an item the user consumed before
KIND_FILE = "kind.txt"  # names the kind of the log written in a folder


@dataclass(frozen=True)
class SyntheticLogConfig:
    """Where a synthetic log lives, which kind of world it is and how it is drawn."""

    folder: Path
    n_users: int
    n_items: int
    n_events: int
    n_weeks: int
    seed: int
    kind: str = DEFAULT_KIND


class SyntheticKindError(ValueError):
    """A synthetic world kind that does not exist, or a folder holding another kind's log."""


def check_kind(kind: str) -> str:
    """`kind` if it is one of `KINDS`; otherwise a SyntheticKindError naming it and the allowed kinds."""
    if kind not in KINDS:
        raise SyntheticKindError(f"synthetic kind {kind!r} is unknown; allowed kinds: {', '.join(KINDS)}")
    return kind


def synthetic_folder(data_dir: Path, kind: str) -> Path:
    """The folder of the `kind` log under `data_dir`: one per kind, so a cached log is never read as another."""
    return data_dir / ("synthetic" if check_kind(kind) == DEFAULT_KIND else f"synthetic-{kind}")


def folder_kind(folder: Path) -> str:
    """The kind of the log written in `folder` (logs written before kinds existed are the demo's)."""
    marker = folder / KIND_FILE
    return marker.read_text().strip() if marker.exists() else DEFAULT_KIND


@dataclass(frozen=True)
class _Catalogue:
    category: np.ndarray  # genre index per item
    creator: np.ndarray  # creator index per item
    release_day: np.ndarray  # day of release relative to the window start (negative: catalogue)
    appeal: np.ndarray  # (weeks, items) sampling weight; zero before release
    creator_category: np.ndarray
    creator_fame: np.ndarray


@dataclass(frozen=True)
class _Users:
    taste: np.ndarray  # (users, genres), rows sum to 1
    join_us: np.ndarray  # epoch microseconds
    rate: np.ndarray  # relative number of events
    favourite_creators: np.ndarray  # (users, FAVOURITE_CREATORS)


def generate_log(*, n_users: int, n_items: int, n_events: int, n_weeks: int, end: datetime, seed: int) -> RawData:
    """Draw about n_events events in [end - n_weeks weeks, end); same arguments, same log."""
    if min(n_users, n_items, n_events, n_weeks) < 1:
        raise ValueError(
            f"generate_log: sizes must be positive, got n_users={n_users}, n_items={n_items}, "
            f"n_events={n_events}, n_weeks={n_weeks}"
        )
    rng = np.random.default_rng(seed)
    end_us = _epoch_us(end)
    start_us = end_us - n_weeks * WEEK_US
    catalogue = _draw_catalogue(rng, n_items, n_weeks)
    users = _draw_users(rng, n_users, start_us, end_us, catalogue)
    events = _draw_events(rng, n_events, start_us, end_us, catalogue, users)
    items = _items_frame(catalogue, start_us)
    return RawData(events=events, items=items)


def generate_world(
    kind: str, *, n_users: int, n_items: int, n_events: int, n_weeks: int, end: datetime, seed: int
) -> RawData:
    """The log of the world `kind` (`KINDS`): `generate_log` for demo, `generate_sequential_log` for sequential."""
    generate = generate_log if check_kind(kind) == DEFAULT_KIND else generate_sequential_log
    return generate(n_users=n_users, n_items=n_items, n_events=n_events, n_weeks=n_weeks, end=end, seed=seed)


def ensure_synthetic_log(config: SyntheticLogConfig, end: date) -> None:
    """Draw the `config.kind` log ending at the Monday `end` and write it, unless `config.folder` already
    holds one; a folder holding another kind's log is an error, never read as this kind."""
    check_kind(config.kind)
    if (config.folder / "events.parquet").exists():
        if (found := folder_kind(config.folder)) != config.kind:
            raise SyntheticKindError(
                f"{config.folder} holds a {found} synthetic log, not a {config.kind} one: "
                "use that kind's folder (features.synthetic.synthetic_folder) or remove the folder"
            )
        return
    raw = generate_world(
        config.kind,
        n_users=config.n_users,
        n_items=config.n_items,
        n_events=config.n_events,
        n_weeks=config.n_weeks,
        end=week_start(end),
        seed=config.seed,
    )
    write_log(raw, config.folder, kind=config.kind)


def write_log(raw: RawData, folder: Path, *, kind: str = DEFAULT_KIND) -> None:
    """Write events.parquet, items.parquet and the world's kind under `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw.events.write_parquet(folder / "events.parquet")
    raw.items.write_parquet(folder / "items.parquet")
    (folder / KIND_FILE).write_text(check_kind(kind) + "\n")


def generate_sequential_log(
    *, n_users: int, n_items: int, n_events: int, n_weeks: int, end: datetime, seed: int
) -> RawData:
    """Draw about n_events events of the sequential world in [end - n_weeks weeks, end); same arguments, same log.

    Every item is an episode of a series by one creator, released before the window. Each
    user belongs to a taste cluster and walks through series: after an episode, the next one
    (`NEXT_EPISODE`), else a new series, from episode 1: by the same creator (`SAME_CREATOR`),
    else one their cluster watches, rarely any (`OUTSIDE_CLUSTER`); now and then a re-play.
    """
    if min(n_users, n_items, n_events, n_weeks) < 1:
        raise ValueError(
            f"generate_sequential_log: sizes must be positive, got n_users={n_users}, n_items={n_items}, "
            f"n_events={n_events}, n_weeks={n_weeks}"
        )
    rng = np.random.default_rng(seed)
    end_us = _epoch_us(end)
    start_us = end_us - n_weeks * WEEK_US
    # Series and their episodes, in catalogue order; item ids are shuffled so they say nothing.
    lengths = rng.integers(EPISODES[0], EPISODES[1] + 1, n_items)
    n_series = int(np.searchsorted(np.cumsum(lengths), n_items)) + 1
    series = np.repeat(np.arange(n_series), lengths[:n_series])[:n_items]
    first = np.searchsorted(series, np.arange(n_series))
    episode = np.arange(n_items) - first[series]
    n_creators = max(1, n_series // SERIES_PER_CREATOR)
    creator = rng.integers(0, n_creators, n_series)
    genre = rng.integers(0, len(CATEGORIES), n_creators)[creator]
    genre = np.where(rng.random(n_series) < CREATOR_GENRE_LOYALTY, genre, rng.integers(0, len(CATEGORIES), n_series))
    start_day = -rng.integers(7 * EPISODES[1] + 1, CATALOGUE_MAX_AGE_DAYS, n_series)
    item_id = rng.permutation(n_items) + 1
    # Taste clusters: the series of a few creators, and a few more.
    n_clusters = max(1, n_users // USERS_PER_CLUSTER)
    cluster_series = []
    for _ in range(n_clusters):
        creators = rng.choice(n_creators, min(CLUSTER_CREATORS, n_creators), replace=False)
        extra = rng.choice(n_series, min(CLUSTER_EXTRA_SERIES, n_series), replace=False)
        cluster_series.append(np.union1d(np.flatnonzero(np.isin(creator, creators)), extra))
    # Users: who joins when, how active.
    cluster = rng.integers(0, n_clusters, n_users)
    late = rng.random(n_users) >= RETURNING_USER_SHARE
    join_us = start_us + np.where(late, rng.random(n_users) * (end_us - start_us), 0).astype(np.int64)
    rate = rng.lognormal(0.0, SEQUENTIAL_ACTIVITY_SIGMA, n_users) * (end_us - join_us) / (end_us - start_us)
    counts = rng.multinomial(n_events, rate / rate.sum())
    user = np.repeat(np.arange(n_users), counts)
    ts = join_us[user] + (rng.random(n_events) * (end_us - join_us[user])).astype(np.int64)
    ts = np.concatenate([np.sort(part) for part in np.split(ts, np.cumsum(counts)[:-1])])
    draws = rng.random((n_events, 4))
    by_creator = [np.flatnonzero(creator == c) for c in range(n_creators)]
    walk = _SeriesWalk(first, lengths[:n_series].copy(), creator, by_creator, cluster_series)
    walk.lengths[-1] = n_items - first[-1]
    positions = np.concatenate([[0], np.cumsum(counts)])
    picked = np.empty(n_events, dtype=np.int64)
    for u in range(n_users):
        lo, hi = positions[u], positions[u + 1]
        picked[lo:hi] = walk.walk(draws[lo:hi], cluster[u])
    plays = rng.geometric(0.5, n_events)
    weight = plays.astype(np.float64)
    events = pl.DataFrame({"user_id": user + 1, "item_id": item_id[picked], "ts": ts, "weight": weight})
    events = events.with_columns(pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    items = (
        pl.DataFrame(
            {
                "item_id": item_id,
                "category": np.asarray(CATEGORIES)[genre[series]],
                "creator": creator[series] + 1,
                "release_ts": start_us + (start_day[series] + 7 * episode) * DAY_US,
            }
        )
        .select(
            "item_id",
            "category",
            pl.format("creator_{}", pl.col("creator").cast(pl.Utf8).str.zfill(5)).alias("creator"),
            pl.col("release_ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        )
        .sort("item_id")
        .cast(RAW_ITEMS_SCHEMA)
    )
    return RawData(events=drop_duplicate_events(events.cast(RAW_EVENTS_SCHEMA))[0], items=items)


@dataclass
class _SeriesWalk:
    """One user's walk through series (catalogue positions of items), from uniform draws."""

    first: np.ndarray  # catalogue position of each series' first episode
    lengths: np.ndarray  # episodes per series
    creator: np.ndarray  # creator of each series
    by_creator: list[np.ndarray]  # series of each creator
    cluster_series: list[np.ndarray]  # series each cluster watches

    def walk(self, draws: np.ndarray, cluster: int) -> np.ndarray:
        """Catalogue positions of one user's events, in time order; `draws` holds 4 uniforms per event."""
        picked = np.empty(len(draws), dtype=np.int64)
        started: set[int] = set()
        current, episode = -1, 0
        for i, (replay, go_on, branch, choice) in enumerate(draws.tolist()):
            if i and replay < REWATCH:
                picked[i] = picked[int(choice * i)]
                continue
            if current >= 0 and go_on < NEXT_EPISODE and episode + 1 < self.lengths[current]:
                episode += 1
            else:
                current, episode = self._new_series(current, started, cluster, branch, choice), 0
                started.add(current)
            picked[i] = self.first[current] + episode
        return picked

    def _new_series(self, current: int, started: set[int], cluster: int, branch: float, choice: float) -> int:
        own = self.cluster_series[cluster]
        if current >= 0 and branch < SAME_CREATOR:
            pool = [s for s in self.by_creator[self.creator[current]] if s not in started]
        elif branch > 1 - OUTSIDE_CLUSTER:
            pool = range(len(self.first))
        else:
            pool = [s for s in own if s not in started]
        if not pool:  # the creator's or the cluster's series are all started: any other one
            pool = [s for s in own if s not in started] or range(len(self.first))
        return int(pool[int(choice * len(pool))])


def _draw_catalogue(rng: np.random.Generator, n_items: int, n_weeks: int) -> _Catalogue:
    n_genres = len(CATEGORIES)
    genre_share = _zipf(n_genres, GENRE_EXPONENT)
    n_creators = max(1, n_items // ITEMS_PER_CREATOR)
    creator_category = rng.choice(n_genres, n_creators, p=genre_share)
    creator_fame = rng.lognormal(0.0, CREATOR_FAME_SIGMA, n_creators)
    creator = rng.integers(0, n_creators, n_items)
    category = np.where(
        rng.random(n_items) < CREATOR_GENRE_LOYALTY,
        creator_category[creator],
        rng.choice(n_genres, n_items, p=genre_share),
    )
    rank = rng.permutation(n_items)
    base = (rank + 1.0) ** -POPULARITY_EXPONENT * creator_fame[creator]
    # Releases fall on week starts so that a weekly appeal table is exact: an item can be
    # drawn in week w only if it was out when w began, hence never before its release.
    release_day = np.where(
        rng.random(n_items) < NEW_RELEASE_SHARE,
        7 * rng.integers(0, n_weeks, n_items),
        -rng.integers(1, CATALOGUE_MAX_AGE_DAYS, n_items),
    )
    release_day[rank == 0] = -CATALOGUE_MAX_AGE_DAYS  # every week has at least one released item
    hype = rng.lognormal(np.log(6.0), 0.7, n_items)
    age = 7 * np.arange(n_weeks)[:, None] - release_day[None, :]
    trend = 1.0 + hype * np.exp(-np.maximum(age, 0) / HYPE_DAYS)
    appeal = np.where(age >= 0, base * trend, 0.0)
    return _Catalogue(category, creator, release_day, appeal, creator_category, creator_fame)


def _draw_users(rng: np.random.Generator, n_users: int, start_us: int, end_us: int, catalogue: _Catalogue) -> _Users:
    genre_share = _zipf(len(CATEGORIES), GENRE_EXPONENT)
    taste = rng.dirichlet(TASTE_CONCENTRATION * genre_share, n_users)
    taste = np.where(np.isfinite(taste), taste, 0.0)
    taste[taste.sum(axis=1) == 0] = genre_share  # Dirichlet can underflow to all zeros
    taste /= taste.sum(axis=1, keepdims=True)
    late = rng.random(n_users) >= RETURNING_USER_SHARE
    join_us = start_us + np.where(late, rng.random(n_users) * (end_us - start_us), 0).astype(np.int64)
    active_share = (end_us - join_us) / (end_us - start_us)
    rate = rng.lognormal(0.0, ACTIVITY_SIGMA, n_users) * active_share
    # Favourite creators: a genre from the user's taste, then one of its creators by fame.
    creators = _shelve(catalogue.creator_fame[None, :], catalogue.creator_category, len(CATEGORIES))
    genres = _draw_rows(rng, taste, np.repeat(np.arange(n_users), FAVOURITE_CREATORS))
    row = np.zeros(len(genres), dtype=np.int64)
    favourites = _draw_from(rng, creators, row, genres)
    anyone = favourites < 0  # a genre without creators
    favourites[anyone] = _draw_from(rng, creators, row[anyone], None)
    return _Users(taste, join_us, rate, favourites.reshape(n_users, FAVOURITE_CREATORS))


def _draw_events(
    rng: np.random.Generator,
    n_events: int,
    start_us: int,
    end_us: int,
    catalogue: _Catalogue,
    users: _Users,
) -> pl.DataFrame:
    # Events come grouped by user; a stable (radix, linear) sort on the uint16 week keeps
    # them grouped by user within each week, so consecutive draws search the same few
    # shelves and stay in cache. The returned frame is sorted by time.
    user = np.repeat(np.arange(len(users.rate)), rng.multinomial(n_events, users.rate / users.rate.sum()))
    ts = users.join_us[user] + (rng.random(n_events) * (end_us - users.join_us[user])).astype(np.int64)
    by_week = np.argsort(((ts - start_us) // WEEK_US).astype(np.uint16), kind="stable")
    user, ts = user[by_week], ts[by_week]
    week = (ts - start_us) // WEEK_US
    branch = rng.choice(3, n_events, p=BRANCH_SHARES)
    item = np.full(n_events, -1)

    favourite = np.flatnonzero(branch == 0)
    chosen = users.favourite_creators[user[favourite], rng.integers(0, FAVOURITE_CREATORS, len(favourite))]
    creators = _shelve(catalogue.appeal, catalogue.creator, len(catalogue.creator_fame))
    item[favourite] = _draw_from(rng, creators, week[favourite], chosen)
    by_favourite = item >= 0

    # Taste, also for favourite-creator events whose creator had nothing out yet.
    genres = _shelve(catalogue.appeal, catalogue.category, len(CATEGORIES))
    taste = np.flatnonzero((branch == 1) | ((branch == 0) & ~by_favourite))
    item[taste] = _draw_from(rng, genres, week[taste], _draw_rows(rng, users.taste, user[taste]))

    # Anything trending that week, also for taste events whose genre had nothing out yet.
    rest = np.flatnonzero(item < 0)
    item[rest] = _draw_from(rng, genres, week[rest], None)

    plays = rng.geometric(np.where(by_favourite, 0.3, 0.5))
    events = pl.DataFrame({"user_id": user + 1, "item_id": item + 1, "ts": ts, "weight": plays.astype(np.float64)})
    events = events.with_columns(pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"))
    return drop_duplicate_events(events.cast(RAW_EVENTS_SCHEMA))[0]


def _items_frame(catalogue: _Catalogue, start_us: int) -> pl.DataFrame:
    n_items = len(catalogue.category)
    return (
        pl.DataFrame(
            {
                "item_id": np.arange(1, n_items + 1),
                "category": np.asarray(CATEGORIES)[catalogue.category],
                "creator": catalogue.creator + 1,
                "release_ts": start_us + catalogue.release_day * DAY_US,
            }
        )
        .select(
            "item_id",
            "category",
            pl.format("artist_{}", pl.col("creator").cast(pl.Utf8).str.zfill(5)).alias("creator"),
            pl.col("release_ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        )
        .cast(RAW_ITEMS_SCHEMA)
    )


@dataclass(frozen=True)
class _Shelves:
    """Items sorted by a key (genre, creator), with every row's cumulative appeal.

    Key k spans sorted positions [bounds[k], bounds[k+1]) of each row; row r, position p
    has mass edges[r * width + p + 1] - edges[r * width + p].
    """

    order: np.ndarray
    bounds: np.ndarray
    edges: np.ndarray
    width: int


def _shelve(appeal: np.ndarray, key: np.ndarray, n_keys: int) -> _Shelves:
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(n_keys + 1))
    edges = np.concatenate([[0.0], np.cumsum(appeal[:, order].ravel())])
    return _Shelves(order, bounds, edges, appeal.shape[1])


def _draw_from(rng: np.random.Generator, shelves: _Shelves, row: np.ndarray, key: np.ndarray | None) -> np.ndarray:
    """Per draw, an index with that key (any key if None) from `row`, by appeal; -1 if all zero.

    Each draw lies in (edges[lo], edges[hi]], so the chosen position has positive appeal:
    an item is never drawn in a week before its release.
    """
    start = row * shelves.width
    lo = start + (0 if key is None else shelves.bounds[key])
    hi = start + (shelves.width if key is None else shelves.bounds[key + 1])
    a, b = shelves.edges[lo], shelves.edges[hi]
    found = b > a
    a, b = a[found], b[found]
    x = np.clip(a + (1.0 - rng.random(len(a))) * (b - a), np.nextafter(a, np.inf), b)
    position = np.searchsorted(shelves.edges, x, side="left") - 1 - start[found]
    drawn = np.full(len(row), -1)
    drawn[found] = shelves.order[position]
    return drawn


def _draw_rows(rng: np.random.Generator, probabilities: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One column index per entry of `rows`, drawn from that row of `probabilities`."""
    # One contiguous gather per column: far faster than a search over all rows' cumsum.
    cumulative = np.ascontiguousarray(np.cumsum(probabilities, axis=1).T)
    u = rng.random(len(rows))
    index = np.zeros(len(rows), dtype=np.int64)
    for column in cumulative[:-1]:
        index += column[rows] < u
    return index


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1) ** -exponent
    return weights / weights.sum()


def _epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return (aware - EPOCH) // timedelta(microseconds=1)
