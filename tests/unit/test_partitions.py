"""The one user-partition hash: the documented integer hash, spread evenly, and the same in every pipeline."""

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features import partitioned
from inference import scoring
from recsys.partitions import Partition, partition_of

INT64 = st.integers(-(2**63), 2**63 - 1)


def reference_partition(user_id: int, count: int) -> int:
    """The hash in plain Python integers: low 32 bits times Knuth's constant, modulo 2^32, modulo count."""
    return (user_id % 2**32) * 2_654_435_761 % 2**32 % count


@given(ids=st.lists(INT64, min_size=1, max_size=50), count=st.integers(1, 64))
def test_partition_of_is_the_documented_integer_hash_for_any_int64_id(ids, count):
    found = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.Int64}).select(partition_of("user_id", count))
    assert found.to_series().to_list() == [reference_partition(i, count) for i in ids]


def test_consecutive_ids_spread_evenly_over_partitions():
    ids = pl.DataFrame({"user_id": range(10_000)})
    sizes = ids.group_by(partition_of("user_id", 8).alias("p")).len()["len"]
    assert sizes.min() > 1_100 and sizes.max() < 1_400


@pytest.mark.parametrize(("index", "count"), [(0, 0), (-1, 2), (2, 2)])
def test_a_partition_outside_its_count_is_refused(index, count):
    with pytest.raises(ValueError, match=f"partition {index} of {count}"):
        Partition(index, count)


def feature_partition_of(user_id: int, count: int) -> int:
    """The partition whose events give `user_id`'s feature rows (`features.partitioned.build_week_tables`)."""
    events = pl.DataFrame({"user_id": [user_id]}, schema={"user_id": pl.Int64})
    (holder,) = [
        p.index
        for p in partitioned.all_partitions(count)
        if events.filter(partitioned.in_partition("user_id", p)).height
    ]
    return holder


# Ids that differ only above bit 32, negative ids, and the int64 extremes included on purpose.
EDGE_IDS = [0, 1, -1, 7, 2**32, 2**32 + 7, -(2**32) + 7, 2**40 + 3, -(2**40) - 3, 2**63 - 1, -(2**63)]


@pytest.mark.parametrize("count", [2, 3, 4, 7, 16])
def test_a_user_lands_in_the_same_partition_in_the_feature_flow_and_in_inference(count):
    scored = scoring.partition_users(pl.Series(EDGE_IDS, dtype=pl.Int64), count)

    for user_id in EDGE_IDS:
        (holder,) = [index for index, users in enumerate(scored) if user_id in users]
        assert holder == feature_partition_of(user_id, count) == reference_partition(user_id, count), user_id


@given(ids=st.lists(INT64, min_size=1, max_size=30, unique=True), count=st.integers(2, 9))
def test_inference_partitions_are_the_feature_partitions_for_any_int64_ids(ids, count):
    scored = scoring.partition_users(pl.Series(ids, dtype=pl.Int64), count)
    assert scored == [sorted(i for i in ids if reference_partition(i, count) == index) for index in range(count)]
