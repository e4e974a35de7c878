import json
import re
from datetime import date

import polars as pl
import pytest
from redis.crc import key_slot

from inference.serving import (
    KeySpace,
    check_version,
    encode_items,
    encode_recommendations,
    format_version,
)

VERSION = "20261123-000007"


def hash_tag(key: str) -> str | None:
    """The part of a key Redis Cluster hashes: the text inside the first {...}, if any."""
    match = re.search(r"\{([^}]*)\}", key)
    return match.group(1) if match and match.group(1) else None


def recs_frame(user_ids: list[int], items: list[list[int] | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": user_ids, "items": items},
        schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)},
    )


def test_keys_follow_the_documented_names():
    keys = KeySpace("recs")

    assert keys.live == "recs:{recs}:live"
    assert keys.previous == "recs:{recs}:previous"
    assert keys.seq == "recs:{recs}:seq"
    assert keys.versions == "recs:{recs}:versions"
    assert keys.meta(VERSION) == "recs:{recs}:meta:20261123-000007"
    assert keys.user(VERSION, 42) == "recs:20261123-000007:u:42"
    assert keys.fallback(VERSION) == "recs:20261123-000007:fallback"
    assert keys.namespace_pattern(VERSION) == "recs:20261123-000007:*"


def test_pointer_and_metadata_keys_share_one_hash_tag_and_cluster_slot():
    keys = KeySpace("shop-eu.v2")
    tagged = [keys.live, keys.previous, keys.seq, keys.versions, keys.meta(VERSION)]

    assert {hash_tag(k) for k in tagged} == {"shop-eu.v2"}
    assert len({key_slot(k.encode()) for k in tagged}) == 1


def test_user_and_fallback_keys_have_no_hash_tag_so_they_spread():
    keys = KeySpace("recs")

    assert hash_tag(keys.user(VERSION, 1)) is None
    assert hash_tag(keys.fallback(VERSION)) is None
    assert len({key_slot(keys.user(VERSION, u).encode()) for u in range(100)}) > 90


def test_namespace_pattern_matches_only_its_own_version():
    keys = KeySpace("recs")
    pattern = re.compile(keys.namespace_pattern(VERSION).replace("*", ".*"))

    assert pattern.fullmatch(keys.user(VERSION, 3))
    assert pattern.fullmatch(keys.fallback(VERSION))
    assert not pattern.fullmatch(keys.user("20261123-000008", 3))
    assert not pattern.fullmatch(keys.meta(VERSION))


@pytest.mark.parametrize("prefix", ["", "a b", "a:b", "{recs}", "recs*", "réc"])
def test_invalid_prefix_is_refused(prefix):
    with pytest.raises(ValueError, match="prefix"):
        KeySpace(prefix)


def test_version_is_as_of_and_zero_padded_sequence():
    assert format_version(date(2026, 11, 23), 7) == VERSION
    assert check_version(format_version(date(2026, 11, 23), 1_234_567)) == "20261123-1234567"


@pytest.mark.parametrize("version", ["*", "20261123", "20261123-*", "recs:20261123-000001"])
def test_version_that_could_widen_a_scan_pattern_is_refused(version):
    with pytest.raises(ValueError, match="not a publication version"):
        KeySpace("recs").namespace_pattern(version)


def test_encoded_recommendations_are_compact_json_that_round_trips():
    recs = recs_frame([12, 5], [[12, 5, 9], [-1]])

    encoded = encode_recommendations("recs", VERSION, recs)

    assert encoded["key"].to_list() == ["recs:20261123-000007:u:12", "recs:20261123-000007:u:5"]
    assert encoded["value"].to_list() == ["[12,5,9]", "[-1]"]
    assert [json.loads(v) for v in encoded["value"]] == recs["items"].to_list()


def test_frame_encoding_equals_single_list_encoding():
    items = [3, 1, 4, 1, 5, 9, 2, 6]

    encoded = encode_recommendations("recs", VERSION, recs_frame([1], [items]))

    assert encoded["value"][0] == encode_items(items) == "[3,1,4,1,5,9,2,6]"


def test_encoding_leaves_the_input_frame_unchanged():
    recs = recs_frame([1, 2], [[1], [2, 3]])
    before = recs.clone()

    encode_recommendations("recs", VERSION, recs)

    assert recs.equals(before)


@pytest.mark.parametrize(
    ("recs", "problem"),
    [
        (recs_frame([1, 2], [[1], []]), "empty item lists for users \\[2\\]"),
        (recs_frame([1, 2], [[1], None]), "empty item lists for users \\[2\\]"),
        (recs_frame([1, 1], [[1], [2]]), "repeat users \\[1\\]"),
        (recs_frame([1], [[1, None]]), "null item ids"),
        (pl.DataFrame({"user_id": [1], "items": [["a"]]}), "list of integers"),
        (pl.DataFrame({"user_id": ["u1"], "items": [[1]]}), "user_id must be integers"),
        (pl.DataFrame({"user_id": [1]}), "lacks columns \\['items'\\]"),
    ],
)
def test_invalid_recommendations_are_refused_with_the_problem(recs, problem):
    with pytest.raises(ValueError, match=problem):
        encode_recommendations("recs", VERSION, recs)


@pytest.mark.parametrize("items", [[], [1, "2"], [1.0], [True]])
def test_invalid_fallback_list_is_refused(items):
    with pytest.raises(ValueError, match="item"):
        encode_items(items)
