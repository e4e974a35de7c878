"""Publishing and reading on a real three-master Redis Cluster (RECSYS_REDIS_CLUSTER=true).

The cluster is started here from redis-server processes on free loopback ports, with a
password, so every multi-key step of `inference.serving` meets the CROSSSLOT rules and
the routing of a real cluster. Each test writes under its own prefix.
"""

import shutil
import subprocess
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
import redis

from inference import publish, serving
from recsys.settings import Settings
from recsys.stores import connect_redis, open_stores
from tests.helpers import publish_recommendations
from tests.reliability.services import free_port, redis_cli_binary, redis_server_binary, wait_for

pytestmark = pytest.mark.reliability

PASSWORD = "cluster-pw"
AS_OF = date(2025, 3, 3)
USERS = 3_000
METADATA = {"model_version": "ranker:7", "generated_at": "2025-03-03T05:00:00", "n": 3, "fallback_user_count": 0}


class Cluster:
    """Three redis-server masters on free ports, joined into one cluster covering all 16384 slots."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen] = []
        # Plain (non-cluster) clients, one per master, to look at what each node holds.
        self.nodes = [
            redis.Redis(host="127.0.0.1", port=p, password=PASSWORD, decode_responses=True) for p in self.ports
        ]

    def start(self) -> None:
        server = redis_server_binary("cluster-port")
        for port in self.ports:
            node_dir = self.folder / str(port)
            node_dir.mkdir(parents=True)
            self.processes.append(
                subprocess.Popen(
                    # The bus port is given too: the default, port + 10000, may exceed 65535.
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                     "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                     "--cluster-config-file", str(node_dir / "nodes.conf"),
                     "--save", "", "--appendonly", "no", "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                     "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port, node in zip(self.ports, self.nodes, strict=True):
            wait_for(lambda node=node: _answers(node), f"cluster node on port {port}", timeout=20)
        subprocess.run(
            [redis_cli_binary(server), "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port, node in zip(self.ports, self.nodes, strict=True):
            wait_for(lambda node=node: _cluster_ok(node), f"cluster_state:ok on port {port}", timeout=30, every=0.1)

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.ports[0]}/0"

    def keys_per_node(self, pattern: str) -> list[int]:
        return [sum(1 for _ in node.scan_iter(match=pattern, count=1_000)) for node in self.nodes]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(timeout=10)


def _answers(node: redis.Redis) -> bool:
    try:
        return bool(node.ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(node: redis.Redis) -> bool:
    return node.cluster("info")["cluster_state"] == "ok"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH: a Redis Cluster cannot be created (install redis-server/redis-tools)")
    started = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        started.start()
        yield started
    finally:
        started.close()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[redis.RedisCluster]:
    r = connect_redis(cluster.url, cluster=True)
    yield r
    r.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.name.removeprefix("test_")[:40]


def recs_for(users: range, first_item: int) -> pl.DataFrame:
    """User u gets [first_item + 100 + u % 50, first_item, u]: a list that differs per user and per week."""
    return pl.DataFrame({"user_id": list(users)}).with_columns(
        items=pl.concat_list(pl.col("user_id") % 50 + first_item + 100, pl.lit(first_item), pl.col("user_id"))
    )


def expected_items(user: int, week: int) -> list[int]:
    first_item = 1_000 * (week + 1)
    return [user % 50 + first_item + 100, first_item, user]


def publish_week(r: redis.RedisCluster, prefix: str, week: int, **options) -> publish.PublishResult:
    as_of = AS_OF + timedelta(weeks=week)
    return publish_recommendations(
        r, prefix, as_of, recs_for(range(USERS), 1_000 * (week + 1)), [week, 999], METADATA, chunk=500, **options
    )


def version_keys(cluster: Cluster, prefix: str, version: str) -> list[int]:
    """Per node, how many user and fallback keys of `version` it holds."""
    return cluster.keys_per_node(f"{prefix}:{version}:*")


def test_two_weekly_publications_spread_user_keys_over_every_node_and_read_back(cluster, client, prefix):
    first = publish_week(client, prefix, 0)
    second = publish_week(client, prefix, 1)

    assert (second.previous, second.user_count, second.removed) == (first.version, USERS, ())
    for result in (first, second):
        per_node = version_keys(cluster, prefix, result.version)
        assert sum(per_node) == USERS + 1 and min(per_node) > USERS // 5, per_node
    pointer_nodes = cluster.keys_per_node(f"{prefix}:{{{prefix}}}:*")
    assert sorted(pointer_nodes) == [0, 0, 6], "live, previous, seq, versions and two metas share one slot"
    unknown = 10**6
    recs = serving.get_recommendations(client, prefix, [0, 1_234, USERS - 1, unknown])
    assert [r.items for r in recs] == [expected_items(0, 1), expected_items(1_234, 1), expected_items(USERS - 1, 1),
                                       [1, 999]]  # fmt: skip
    assert [r.is_fallback for r in recs] == [False, False, False, True]
    assert {(r.version, r.as_of, r.model_version) for r in recs} == {(second.version, second.as_of, "ranker:7")}


def test_an_older_publication_is_refused_and_leaves_no_key_on_any_node(cluster, client, prefix):
    newer = publish_week(client, prefix, 1)

    with pytest.raises(publish.StalePublication, match="older than the live version"):
        publish.refuse_stale(client, prefix, AS_OF)
    with pytest.raises(publish.StalePublication, match="lost"):
        publish_week(client, prefix, 0)

    assert serving.get_recommendations(client, prefix, [7])[0].items == expected_items(7, 1)
    assert client.smembers(serving.KeySpace(prefix).versions) == {newer.version}
    assert cluster.keys_per_node(f"{prefix}:{AS_OF:%Y%m%d}-*") == [0, 0, 0]
    assert cluster.keys_per_node(f"{prefix}:{{{prefix}}}:meta:{AS_OF:%Y%m%d}-*") == [0, 0, 0]


def test_rollback_serves_the_previous_week_and_back(client, prefix):
    first = publish_week(client, prefix, 0)
    second = publish_week(client, prefix, 1)

    assert publish.rollback(client, prefix) == first.version
    assert serving.get_recommendations(client, prefix, [42])[0].items == expected_items(42, 0)
    assert publish.rollback(client, prefix) == second.version
    assert serving.get_recommendations(client, prefix, [42])[0].items == expected_items(42, 1)


def test_versions_beyond_keep_are_removed_from_every_node(cluster, client, prefix):
    results = [publish_week(client, prefix, week) for week in range(4)]

    removed = [r.version for r in results[:2]]
    assert [r.removed for r in results] == [(), (), (removed[0],), (removed[1],)]
    for version in removed:
        assert version_keys(cluster, prefix, version) == [0, 0, 0]
        assert not client.exists(serving.KeySpace(prefix).meta(version))
    assert client.smembers(serving.KeySpace(prefix).versions) == {r.version for r in results[2:]}
    assert sum(version_keys(cluster, prefix, results[2].version)) == USERS + 1


def test_a_publication_whose_namespace_was_removed_is_refused(cluster, client, prefix):
    publish_week(client, prefix, 0)
    version = publish.begin_publication(client, prefix, AS_OF + timedelta(weeks=1))
    recs = recs_for(range(USERS), 2_000)
    publish.write_recommendations(client, prefix, version, recs.head(1_000), chunk=500)

    # A concurrent publisher's cleanup claims the unfinished version and removes its keys.
    assert publish.cleanup_stale_versions(client, prefix) == [version]
    with pytest.raises(publish.StalePublication, match="not being written"):
        publish.write_recommendations(client, prefix, version, recs.tail(2_000), chunk=500)
    with pytest.raises(publish.StalePublication, match="removed by a concurrent publish"):
        publish.finish_publication(client, prefix, version, expected_users=USERS, metadata=METADATA)

    assert version_keys(cluster, prefix, version) == [0, 0, 0]
    assert serving.get_recommendations(client, prefix, [3])[0].items == expected_items(3, 0)


def test_a_chunk_written_but_not_counted_before_a_crash_is_counted_from_the_keys(cluster, client, prefix):
    version = publish.begin_publication(client, prefix, AS_OF)
    recs = recs_for(range(USERS), 1_000)
    # What a writer killed between its MSET and its count leaves: keys on the nodes, not in written_users.
    crashed = serving.encode_recommendations(prefix, version, recs.head(500))
    client.mset_nonatomic(dict(zip(crashed["key"], crashed["value"], strict=True)))

    publish.write_recommendations(client, prefix, version, recs, chunk=500)  # the retried partition
    publish.write_fallback(client, prefix, version, [1, 999])

    assert client.hget(serving.KeySpace(prefix).meta(version), "written_users") == str(USERS - 500)
    result = publish.finish_publication(client, prefix, version, expected_users=USERS, metadata=METADATA)
    assert result.version == version
    assert serving.get_recommendations(client, prefix, [10])[0].items == expected_items(10, 0)


def test_a_publication_missing_a_user_key_is_refused_after_counting_the_keys(client, prefix):
    version = publish.begin_publication(client, prefix, AS_OF)
    recs = recs_for(range(USERS), 1_000).filter(pl.col("user_id") != 17)
    publish.write_recommendations(client, prefix, version, recs, chunk=500)
    publish.write_fallback(client, prefix, version, [1, 999])

    with pytest.raises(publish.PublishError, match=f"incomplete: {USERS - 1} of {USERS}"):
        publish.finish_publication(client, prefix, version, expected_users=USERS, metadata=METADATA)
    assert client.get(serving.KeySpace(prefix).live) is None


def test_open_stores_builds_a_cluster_client_from_the_settings(cluster, private_postgres, monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_REDIS_CLUSTER", "true")
    monkeypatch.setenv("RECSYS_REDIS_URL", cluster.url)
    monkeypatch.setenv("RECSYS_DATABASE_URL", private_postgres.url())
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))

    with open_stores(Settings()) as stores:
        assert isinstance(stores.redis, redis.RedisCluster)
        assert len(stores.redis.get_primaries()) == 3
        publish_recommendations(stores.redis, "stores", AS_OF, recs_for(range(10), 1_000), [1], METADATA)
        assert serving.get_recommendations(stores.redis, "stores", [4])[0].items == expected_items(4, 0)


def test_cluster_setting_without_a_url_is_refused_before_anything_starts(tmp_path):
    settings = Settings(redis_cluster=True, redis_url=None, database_url=None, data_dir=tmp_path / "data")

    with (
        pytest.raises(ValueError, match="RECSYS_REDIS_CLUSTER is true but RECSYS_REDIS_URL is empty"),
        open_stores(settings),
    ):
        pass
    assert not (tmp_path / "data").exists()
