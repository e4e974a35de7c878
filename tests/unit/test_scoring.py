"""Batch scoring on tiny hand-built logs, and the Redis connection URLs the flow accepts."""

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection

from features.collaborative import CollaborativeConfig
from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.transform import build_feature_tables
from inference import publish, scoring
from ranking import registry
from ranking.candidates import FEATURE_NAMES, CandidateConfig, SnapshotTables, build_ranking_frame
from ranking.scoring import IncompatibleModelError, check_model, score
from recsys.stores import connect_redis, redact_url

AS_OF = date(2026, 11, 23)
CONSUMED = {1: [1, 2, 3], 2: [2, 4], 3: [1], 4: list(range(1, 9))}  # user 4 consumed everything


def wrapped(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


def tiny_tables() -> SnapshotTables:
    """Four users and eight items, all events in the two weeks before AS_OF."""
    start = datetime(2026, 11, 9, tzinfo=UTC)
    rows = [
        (user, item, start + timedelta(hours=user * 10 + k), 1.0)
        for user, items in CONSUMED.items()
        for k, item in enumerate(items)
    ]
    events = pl.DataFrame(rows, schema=RAW_EVENTS_SCHEMA, orient="row")
    items = pl.DataFrame(
        {
            "item_id": range(1, 9),
            "category": ["rock", "jazz"] * 4,
            "creator": ["a", "b", "c", "d"] * 2,
            "release_ts": [start - timedelta(days=30)] * 8,
        },
        schema=RAW_ITEMS_SCHEMA,
    )
    return SnapshotTables.from_frames(build_feature_tables(events, items, AS_OF, recent_items=5, neighbours=5))


def tiny_booster() -> lgb.Booster:
    """A small regression model over every feature; its scores are what "best first" means."""
    rng = np.random.default_rng(7)
    x = rng.random((200, len(FEATURE_NAMES)))
    y = x[:, FEATURE_NAMES.index("item_plays_total")] + 0.5 * x[:, FEATURE_NAMES.index("pop_rank")]
    params = {"objective": "regression", "num_leaves": 4, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1}
    return lgb.train(params | {"deterministic": True, "seed": 1}, lgb.Dataset(x, y, feature_name=FEATURE_NAMES), 10)


def recommend(config: CandidateConfig = CandidateConfig(), n: int = 3) -> pl.DataFrame:  # noqa: B008
    return scoring.recommend_users(
        tiny_booster(), FEATURE_NAMES, ["jazz", "rock"], tiny_tables(), pl.Series([1, 2, 3, 4]), config, n
    )


def test_each_list_is_the_users_highest_scored_candidates_best_first():
    candidates = build_ranking_frame(tiny_tables(), pl.Series([1, 2, 3]), CandidateConfig(), ["jazz", "rock"])
    scored = score(tiny_booster(), candidates, FEATURE_NAMES)

    recs = recommend(n=3)

    assert recs.height == 3
    for user, items in recs.iter_rows():
        scores = dict(scored.filter(pl.col("user_id") == user).select("item_id", "score").iter_rows())
        chosen = [scores[item] for item in items]
        others = [value for item, value in scores.items() if item not in items]
        assert len(items) == len(set(items)) == min(3, len(scores))
        assert chosen == sorted(chosen, reverse=True)
        assert not others or min(chosen) >= max(others)


def test_consumed_items_are_never_recommended():
    recs = recommend(n=8)

    assert all(not set(items) & set(CONSUMED[user]) for user, items in recs.iter_rows())


def test_user_who_consumed_everything_gets_no_row_and_so_the_fallback():
    recs = recommend(n=8)

    assert 4 not in recs["user_id"].to_list()
    assert sorted(recs["user_id"]) == [1, 2, 3]


def test_consumed_items_can_be_recommended_when_exclusion_is_off():
    recs = recommend(CandidateConfig(exclude_consumed=False), n=8)

    lists = dict(recs.iter_rows())
    assert set(lists[4]) <= set(CONSUMED[4]) and lists[4]
    assert any(set(items) & set(CONSUMED[user]) for user, items in lists.items())


def test_lists_hold_at_most_n_items():
    recs = recommend(n=2)

    assert recs["items"].list.len().max() == 2


def test_recommending_leaves_the_snapshot_tables_unchanged():
    tables = tiny_tables()
    before = {name: frame.clone() for name, frame in vars(tables).items()}

    scoring.recommend_users(
        tiny_booster(), FEATURE_NAMES, ["jazz", "rock"], tables, pl.Series([1, 2]), CandidateConfig(), 3
    )

    assert all(frame.equals(before[name]) for name, frame in vars(tables).items())


def test_fallback_is_recent_popularity_with_ties_by_item_id():
    items = pl.DataFrame({"item_id": [5, 3, 9, 1], "popularity_rank_4w": [2, 1, 2, 4]})

    assert scoring.fallback_items(items, 3) == [3, 5, 9]
    assert scoring.fallback_items(items, 10) == [3, 5, 9, 1]


def test_partitions_cover_every_user_exactly_once():
    users = pl.Series(range(1, 1_001))

    parts = scoring.partition_users(users, 4)

    assert len(parts) == 4 and sorted(u for part in parts for u in part) == list(range(1, 1_001))
    assert min(map(len, parts)) > 150  # the hash spreads consecutive ids


def test_a_users_partition_depends_only_on_its_id_and_the_count():
    alone = scoring.partition_users(pl.Series([77]), 8)
    crowd = scoring.partition_users(pl.Series([5, 77, 77, 1_000_003, 12]), 8)

    assert [77 in part for part in alone] == [77 in part for part in crowd]
    assert sum(part.count(77) for part in crowd) == 1


def test_single_partition_holds_everyone_sorted():
    assert scoring.partition_users(pl.Series([3, 1, 2]), 1) == [[1, 2, 3]]


def test_zero_partitions_are_refused():
    with pytest.raises(ValueError, match="partitions must be at least 1, got 0"):
        scoring.partition_users(pl.Series([1]), 0)


def test_model_needing_an_unknown_feature_is_refused_with_its_name():
    with pytest.raises(IncompatibleModelError, match=r"ranker v3 .*\['plays_next_week'\]"):
        check_model([*FEATURE_NAMES, "plays_next_week"], {"category": []}, "ranker v3")


def test_model_without_a_category_encoding_is_refused():
    with pytest.raises(IncompatibleModelError, match="no category encoding"):
        check_model(FEATURE_NAMES, {}, "ranker v3")


def test_model_on_a_subset_of_the_features_is_accepted():
    check_model(FEATURE_NAMES[:5], {"category": ["rock"]}, "ranker v3")


# --- which failures the flow's I/O tasks retry ---


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (redis.ConnectionError("Connection reset by peer"), True),
        (redis.TimeoutError("Timeout reading from socket"), True),
        (wrapped(publish.PublishError("writing user keys failed"), redis.ConnectionError("reset")), True),
        (redis.AuthenticationError("invalid username-password pair"), False),
        (wrapped(publish.PublishError("writing user keys failed"), redis.ResponseError("OOM maxmemory")), False),
        (publish.StalePublication("a newer publication won"), False),
        (registry.ModelIntegrityError("sha256 mismatch"), False),
        (IncompatibleModelError("unknown features"), False),
    ],
)
def test_only_lost_connections_are_retried(error, retried):
    from prefect.states import Failed

    from flows.common import retry_if_transient

    assert retry_if_transient(None, None, Failed(data=error)) is retried


# --- Redis connection URLs (RECSYS_REDIS_URL) ---


def connection(url: str) -> tuple[type, dict]:
    pool = connect_redis(url).connection_pool
    return pool.connection_class, pool.connection_kwargs


def test_password_only_url_authenticates_as_the_default_user():
    cls, kwargs = connection("redis://:s3cret@cache.internal:6380/2")

    assert kwargs["password"] == "s3cret" and kwargs.get("username") is None
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6380, 2)
    assert kwargs["decode_responses"] is True and cls.__name__ == "Connection"


def test_acl_user_and_percent_encoded_password_are_decoded():
    _, kwargs = connection("redis://recs-app:p%40ss%3Aw%2Fd@cache:6379/0")

    assert (kwargs["username"], kwargs["password"]) == ("recs-app", "p@ss:w/d")


def test_rediss_url_uses_tls_with_its_certificate_options():
    cls, kwargs = connection(
        "rediss://recs-app:pw@cache:6380/0?ssl_ca_certs=/etc/ssl/ca.pem&ssl_cert_reqs=required&ssl_check_hostname=true"
    )

    assert cls is SSLConnection
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem" and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True and kwargs["username"] == "recs-app"


def test_unix_socket_url_with_user_and_password():
    cls, kwargs = connection("unix://recs-app:pw@/run/redis/redis.sock?db=3")

    assert cls is UnixDomainSocketConnection
    assert (kwargs["path"], kwargs["db"], kwargs["username"], kwargs["password"]) == (
        "/run/redis/redis.sock",
        3,
        "recs-app",
        "pw",
    )


def test_cluster_client_is_refused_a_unix_socket_url_before_connecting():
    with pytest.raises(ValueError, match="Redis Cluster is reached over redis:// or rediss://, got a unix://"):
        connect_redis("unix:///run/redis/redis.sock", cluster=True)


def test_cluster_client_is_refused_a_database_other_than_zero():
    with pytest.raises(redis.RedisClusterException, match="only be 0 in cluster mode"):
        connect_redis("redis://127.0.0.1:1/2", cluster=True)


def test_cluster_client_names_the_node_it_could_not_reach():
    with pytest.raises(redis.RedisClusterException, match="127.0.0.1:1") as raised:
        connect_redis("redis://:pw@127.0.0.1:1/0", cluster=True)

    assert isinstance(raised.value.__cause__, redis.ConnectionError)  # so the flow's tasks retry it


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6380/2", "redis://:***@cache:6380/2"),
        (
            "rediss://app:s3cret@cache:6380/0?ssl_cert_reqs=required",
            "rediss://app:***@cache:6380/0?ssl_cert_reqs=required",
        ),
        ("unix://app:s3cret@/run/redis.sock?db=1", "unix://app:***@/run/redis.sock?db=1"),
        ("redis://cache:6379/0?password=s3cret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***"),
    ],
)
def test_redacted_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


def test_a_baseline_champion_other_than_ease_or_als_is_served_without_reading_or_fitting():
    record = scoring.default_baseline_record()  # recent popularity

    served = scoring.fit_served_baseline(None, record, AS_OF, CollaborativeConfig(), config=CandidateConfig(), n=10)

    assert served == scoring.ServedBaseline("recent_popular", {})


def test_a_trained_ranker_needs_no_served_baseline():
    record = replace(scoring.default_baseline_record(), kind="ranker")
    assert (
        scoring.fit_served_baseline(None, record, AS_OF, CollaborativeConfig(), config=CandidateConfig(), n=10) is None
    )


def test_an_unknown_baseline_champion_is_refused_before_any_partition_runs():
    record = replace(scoring.default_baseline_record(), params={"baseline": "svd"})
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        scoring.fit_served_baseline(None, record, AS_OF, CollaborativeConfig(), config=CandidateConfig(), n=10)


def test_a_partition_of_a_baseline_champion_without_the_runs_fitted_baseline_is_refused():
    options = {"snapshot": AS_OF, "version": "v", "config": CandidateConfig(), "n": 5, "batch_users": 10}
    with pytest.raises(ValueError, match="fitted once per run"):
        scoring.score_partition(
            None, None, [1], record=scoring.default_baseline_record(), prefix="recs", chunk=10, **options
        )
