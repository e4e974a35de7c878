"""The synthetic log: deterministic, point-in-time valid, and structured like real listening."""

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData
from features.sources import read_source
from features.synthetic import SyntheticLogConfig, ensure_synthetic_log, generate_log, write_log
from tests.helpers import next_week, read_log

END = datetime(2024, 6, 3, tzinfo=UTC)  # a Monday
WEEKS = 10
SIZES = {"n_users": 300, "n_items": 200, "n_events": 20_000, "n_weeks": WEEKS, "end": END}


@pytest.fixture(scope="module")
def raw() -> RawData:
    return generate_log(**SIZES, seed=1)


@pytest.fixture(scope="module")
def joined(raw: RawData) -> pl.DataFrame:
    return raw.events.join(raw.items, on="item_id", how="left")


def test_same_seed_gives_identical_frames(raw):
    again = generate_log(**SIZES, seed=1)

    assert again.events.equals(raw.events)
    assert again.items.equals(raw.items)


def test_different_seed_gives_a_different_log(raw):
    other = generate_log(**SIZES, seed=2)

    assert not other.events.equals(raw.events)
    assert not other.items.equals(raw.items)


def test_frames_follow_the_raw_schemas_sorted_without_duplicates(raw):
    assert raw.events.schema == RAW_EVENTS_SCHEMA
    assert raw.items.schema == RAW_ITEMS_SCHEMA
    assert raw.events.height > 0.99 * SIZES["n_events"]
    assert raw.events.equals(raw.events.sort(["ts", "user_id", "item_id", "weight"]))
    assert not raw.events.select(pl.struct("user_id", "item_id", "ts").is_duplicated().any()).item()
    assert raw.items["item_id"].to_list() == list(range(1, SIZES["n_items"] + 1))
    assert raw.items.null_count().sum_horizontal().item() == 0


def test_events_lie_within_the_window(raw):
    start = END - timedelta(weeks=WEEKS)

    assert raw.events["ts"].min() >= start
    assert raw.events["ts"].max() < END


def test_no_event_precedes_its_items_release(joined):
    assert joined["release_ts"].null_count() == 0
    assert joined.filter(pl.col("ts") < pl.col("release_ts")).height == 0


def test_weights_are_positive_play_counts(raw):
    weights = raw.events["weight"]

    assert weights.min() >= 1
    assert (weights == weights.round()).all()
    assert weights.mean() > 1


def test_catalogue_mixes_older_items_and_new_releases_in_the_window(raw):
    new = raw.items.filter(pl.col("release_ts") >= END - timedelta(weeks=WEEKS))

    assert 0.1 < new.height / raw.items.height < 0.5
    assert raw.items["category"].n_unique() >= 15
    items_per_creator = raw.items.group_by("creator").len()["len"]
    assert items_per_creator.mean() >= 3


def test_creators_mostly_stay_in_one_category(raw):
    main_share = (
        raw.items.group_by("creator", "category")
        .len()
        .group_by("creator")
        .agg(pl.col("len").max() / pl.col("len").sum())["len"]
    )

    assert main_share.mean() > 0.8


def test_new_releases_trend_then_fade(joined):
    new = joined.filter(pl.col("release_ts") >= END - timedelta(weeks=WEEKS))
    age = ((pl.col("ts") - pl.col("release_ts")).dt.total_days() // 7).alias("weeks_out")
    plays = dict(new.group_by(age).len().rows())

    assert plays[0] > 1.5 * plays[3]


def test_popularity_is_skewed(raw):
    plays = raw.events["item_id"].value_counts()["count"].sort(descending=True)

    top_decile = plays.head(len(plays) // 10).sum() / plays.sum()
    assert top_decile > 0.3


def test_user_activity_is_heavy_tailed(raw):
    per_user = raw.events.group_by("user_id").len()["len"]

    assert per_user.max() > 8 * per_user.median()


def test_new_users_join_during_the_window(raw):
    first_seen = raw.events.group_by("user_id").agg(pl.col("ts").min())["ts"]

    assert (first_seen >= END - timedelta(weeks=WEEKS // 2)).sum() >= 0.1 * first_seen.len()


@pytest.mark.parametrize(("column", "lift"), [("category", 2.0), ("creator", 4.0)])
def test_users_concentrate_on_favourite_categories_and_creators(joined, column, lift):
    # A user's top value takes a far larger share of their plays than of everyone's plays.
    overall = joined.group_by(column).agg(overall=pl.len() / joined.height)
    top = (
        joined.group_by("user_id", column)
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("user_id"))
        .filter(pl.col("len").sum().over("user_id") >= 20)
        .sort(["user_id", "share", column], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .first()
        .join(overall, on=column)
    )

    assert (top["share"] / top["overall"]).median() > lift


def test_users_mostly_discover_new_items_each_week_with_some_repeats(raw):
    weekly = raw.events.with_columns(week=pl.col("ts").dt.truncate("1w")).unique(["user_id", "item_id", "week"])
    first_week = pl.col("week").min().over("user_id", "item_id")
    repeat_share = weekly.select((pl.col("week") > first_week).mean()).item()

    assert 0.05 < repeat_share < 0.5


def test_taste_predicts_next_week_better_than_recent_popularity(raw):
    as_of = END - timedelta(weeks=1)
    popularity, affinity = _ndcg_at_10_of_popularity_and_affinity(raw, as_of)

    assert affinity > 1.2 * popularity


def test_write_then_read_returns_the_same_log(raw, tmp_path):
    write_log(raw, tmp_path / "log")

    back = read_log(tmp_path / "log")

    assert back.events.equals(raw.events)
    assert back.items.equals(raw.items)


def test_synthetic_source_reads_the_written_log_and_applies_before(raw, tmp_path):
    write_log(raw, tmp_path)
    before = END - timedelta(weeks=2)

    full = read_source("synthetic", synthetic_dir=tmp_path)
    early = read_source("synthetic", synthetic_dir=tmp_path, before=before)

    assert full.events.equals(raw.events)
    assert full.items.equals(raw.items)
    assert early.events.equals(raw.events.filter(pl.col("ts") < before))


def test_ensure_synthetic_log_draws_the_log_once(tmp_path):
    config = SyntheticLogConfig(folder=tmp_path / "log", n_users=20, n_items=15, n_events=300, n_weeks=6, seed=3)
    end = date(2024, 3, 4)

    ensure_synthetic_log(config, end)
    first = read_log(config.folder)
    ensure_synthetic_log(SyntheticLogConfig(**{**vars(config), "seed": 4}), end)

    assert first.events.height > 0
    assert first.events["ts"].max() < datetime(2024, 3, 4, tzinfo=UTC)
    assert read_log(config.folder).events.equals(first.events)  # kept, not redrawn with the new seed


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="n_events=0"):
        generate_log(**{**SIZES, "n_events": 0}, seed=1)


def _ndcg_at_10_of_popularity_and_affinity(raw: RawData, as_of: datetime) -> tuple[float, float]:
    """NDCG@10 on items new to each user in [as_of, as_of+7d), for two simple scorers.

    Popularity: plays in the 4 weeks before as_of. Affinity: the same, times the user's
    share of past plays in the item's category and by the item's creator.
    """
    nw = next_week(raw, as_of)
    past, popularity, n_users = nw.past, nw.popularity, nw.n_users
    affinity = popularity[None, :] * (0.02 + _share(past, "category", raw.items, n_users))
    affinity *= 1 + 5 * _share(past, "creator", raw.items, n_users)

    return nw.ndcg_at_10(popularity), nw.ndcg_at_10(affinity)


def _share(past: pl.DataFrame, column: str, items: pl.DataFrame, n_users: int) -> np.ndarray:
    """(users, items) matrix: each user's share of past plays in the item's `column` value."""
    codes = items[column].cast(pl.Categorical).to_physical().to_numpy()
    item_code = np.zeros(items["item_id"].max() + 1, dtype=np.int64)
    item_code[items["item_id"].to_numpy()] = codes
    counts = np.zeros((n_users, codes.max() + 1))
    np.add.at(counts, (past["user_id"].to_numpy(), item_code[past["item_id"].to_numpy()]), 1)
    counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return counts[:, item_code]
