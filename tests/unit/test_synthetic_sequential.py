"""The sequential synthetic world and the kind option: series watched in order, popularity nearly useless."""

import hashlib
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawData, RawDataError
from features.sources import read_source, resolve_synthetic, synthetic_kind
from features.synthetic import (
    KINDS,
    SyntheticKindError,
    SyntheticLogConfig,
    check_kind,
    ensure_synthetic_log,
    generate_log,
    generate_sequential_log,
    generate_world,
    synthetic_folder,
    write_log,
)
from flows.configs import source_spec, synthetic_log_config
from recsys.settings import Settings
from tests.helpers import next_week

END = datetime(2024, 6, 3, tzinfo=UTC)  # a Monday
WEEKS = 8
SIZES = {"n_users": 2_000, "n_items": 600, "n_events": 40_000, "n_weeks": WEEKS, "end": END}  # 10 taste clusters
# sha256 of the demo log drawn with the sizes of tests/unit/test_synthetic.py and seed 1, as drawn
# before the sequential world existed: adding a kind must not change a single demo event.
DEMO_SIZES = {"n_users": 300, "n_items": 200, "n_events": 20_000, "n_weeks": 10, "end": END}
DEMO_DIGEST = "f40c72149fc1cf9cecde5abf25a93ca5a8fd4dc4bf4a8d66aa19779ee04c71b9"


def digest(raw: RawData) -> str:
    return hashlib.sha256(raw.events.write_csv().encode() + raw.items.write_csv().encode()).hexdigest()


@pytest.fixture(scope="module")
def raw() -> RawData:
    return generate_sequential_log(**SIZES, seed=1)


@pytest.fixture(scope="module")
def steps(raw: RawData) -> pl.DataFrame:
    """Each user's consecutive pairs of different items, with both items' creator and release."""
    items = raw.items.select("item_id", "creator", "release_ts")
    return (
        raw.events.sort("user_id", "ts", "item_id")
        .with_columns(pl.col("item_id").shift(-1).over("user_id").alias("next_item_id"))
        .filter(pl.col("next_item_id").is_not_null() & (pl.col("next_item_id") != pl.col("item_id")))
        .join(items, on="item_id")
        .join(items, left_on="next_item_id", right_on="item_id", suffix="_next")
    )


def test_the_demo_log_is_unchanged_for_its_seed():
    assert digest(generate_log(**DEMO_SIZES, seed=1)) == DEMO_DIGEST
    assert digest(generate_world("demo", **DEMO_SIZES, seed=1)) == DEMO_DIGEST


def test_same_seed_gives_the_same_sequential_log_and_another_world_than_the_demo(raw):
    again = generate_world("sequential", **SIZES, seed=1)

    assert again.events.equals(raw.events) and again.items.equals(raw.items)
    assert not generate_sequential_log(**SIZES, seed=2).events.equals(raw.events)
    assert digest(raw) != digest(generate_log(**SIZES, seed=1))


def test_sequential_frames_follow_the_raw_schemas_within_the_window_after_release(raw):
    assert raw.events.schema == RAW_EVENTS_SCHEMA and raw.items.schema == RAW_ITEMS_SCHEMA
    assert raw.events.height > 0.99 * SIZES["n_events"]
    assert raw.items["item_id"].to_list() == list(range(1, SIZES["n_items"] + 1))
    assert raw.events["ts"].min() >= END - timedelta(weeks=WEEKS) and raw.events["ts"].max() < END
    released = raw.events.join(raw.items, on="item_id")
    assert released.filter(pl.col("ts") < pl.col("release_ts")).is_empty()


def test_episodes_are_watched_in_order(steps):
    # Episodes of a series: same creator, released a week apart, in episode order.
    gap = (pl.col("release_ts_next") - pl.col("release_ts")).dt.total_days()
    same_series = steps.filter(pl.col("creator") == pl.col("creator_next"))
    forward = same_series.filter(gap == 7).height
    backward = same_series.filter(gap == -7).height

    assert forward / steps.height > 0.6  # most steps go on to the next episode
    assert backward < 0.02 * forward  # and almost never back to the one before


def test_users_stay_with_few_creators(raw):
    top_share = (
        raw.events.join(raw.items, on="item_id")
        .group_by("user_id", "creator")
        .len()
        .filter(pl.col("len").sum().over("user_id") >= 20)
        .group_by("user_id")
        .agg(pl.col("len").max() / pl.col("len").sum())["len"]
    )

    assert top_share.median() > 0.25  # of ~30 creators


def test_popularity_is_nearly_useless_and_the_next_episode_is_not(raw):
    as_of = END - timedelta(weeks=1)
    popularity, next_episode = _ndcg_at_10_of_popularity_and_next_episode(raw, as_of)

    assert popularity < 0.1  # 0.064 here: 10 taste clusters; 0.018 at the default sizes (25 clusters)
    assert next_episode > 5 * popularity


def test_bad_kind_errors_name_it_and_the_allowed_kinds(tmp_path):
    with pytest.raises(SyntheticKindError, match=r"'serial' is unknown; allowed kinds: demo, sequential"):
        check_kind("serial")
    with pytest.raises(SyntheticKindError, match="'serial'"):
        generate_world("serial", **SIZES, seed=1)
    with pytest.raises(RawDataError, match=r"unknown synthetic kind 'serial'; allowed kinds: demo, sequential"):
        read_source("synthetic:serial", synthetic_dir=tmp_path)
    with pytest.raises(ValidationError, match="synthetic_kind") as error:
        Settings(synthetic_kind="serial")
    assert "'demo'" in str(error.value) and "'sequential'" in str(error.value)
    assert KINDS == ("demo", "sequential")


def test_spec_and_settings_name_the_world_and_each_world_has_its_own_folder(tmp_path):
    assert synthetic_kind("synthetic") == "demo" and synthetic_kind("synthetic:sequential") == "sequential"
    assert synthetic_kind("movielens:x") is None
    assert resolve_synthetic("synthetic", "sequential") == "synthetic:sequential"
    assert resolve_synthetic("synthetic:demo", "sequential") == "synthetic"
    assert resolve_synthetic("csv:a.csv", "sequential") == "csv:a.csv"
    settings = Settings(data_dir=tmp_path, synthetic_kind="sequential")
    assert source_spec(settings) == "synthetic:sequential"
    assert synthetic_log_config(settings).kind == "sequential"
    assert synthetic_log_config(settings, "synthetic:demo").folder == tmp_path / "synthetic"
    assert synthetic_log_config(settings).folder == synthetic_folder(tmp_path, "sequential") != tmp_path / "synthetic"


def test_a_cached_log_of_one_kind_is_never_read_as_another(tmp_path):
    small = {"n_users": 20, "n_items": 30, "n_events": 300, "n_weeks": 6, "seed": 3}
    demo = SyntheticLogConfig(folder=tmp_path / "log", **small)
    ensure_synthetic_log(demo, date(2024, 3, 4))

    with pytest.raises(SyntheticKindError, match="holds a demo synthetic log, not a sequential one"):
        ensure_synthetic_log(SyntheticLogConfig(folder=tmp_path / "log", kind="sequential", **small), date(2024, 3, 4))
    with pytest.raises(RawDataError, match="holds a demo log, not a sequential one"):
        read_source("synthetic:sequential", synthetic_dir=tmp_path / "log")
    assert read_source("synthetic", synthetic_dir=tmp_path / "log").events.height > 0

    sequential = generate_sequential_log(**SIZES, seed=1)
    write_log(sequential, tmp_path / "seq", kind="sequential")
    assert read_source("synthetic:sequential", synthetic_dir=tmp_path / "seq").events.equals(sequential.events)
    with pytest.raises(RawDataError, match="holds a sequential log, not a demo one"):
        read_source("synthetic", synthetic_dir=tmp_path / "seq")


def test_sequential_sizes_must_be_positive():
    with pytest.raises(ValueError, match="n_users=0"):
        generate_sequential_log(**{**SIZES, "n_users": 0}, seed=1)


def _ndcg_at_10_of_popularity_and_next_episode(raw: RawData, as_of: datetime) -> tuple[float, float]:
    """NDCG@10 on items new to each user in [as_of, as_of+7d) of two scorers: plays in the 4 weeks before
    as_of, and the next episodes (same creator, released 1, 2, ... weeks later) of the user's last item."""
    nw = next_week(raw, as_of)
    past, popularity, n_users, n_items = nw.past, nw.popularity, nw.n_users, nw.n_items

    last = past.sort("ts").group_by("user_id").last().select("user_id", "creator", "release_ts")
    later = last.join(raw.items, on="creator", suffix="_item").with_columns(
        weeks=(pl.col("release_ts_item") - pl.col("release_ts")).dt.total_days() / 7
    )
    following = later.filter((pl.col("weeks") >= 1) & (pl.col("weeks") <= 10))
    next_episode = np.zeros((n_users, n_items))
    next_episode[following["user_id"].to_numpy(), following["item_id"].to_numpy()] = 20 - following["weeks"].to_numpy()

    return nw.ndcg_at_10(popularity), nw.ndcg_at_10(next_episode + popularity[None, :] * 1e-6)
