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

from inference import serving
from recsys.settings import Settings
from recsys.stores import open_stores
from tests.reliability.services import free_port, redis_server_binary, wait_for

pytestmark = pytest.mark.reliability

PASSWORD = "cluster-pw"
AS_OF = date(2025, 3, 3)
USERS = 3_000
METADATA = {"model_version": "ranker:7", "generated_at": "2025-03-03T05:00:00", "n": 3, "fallback_user_count": 0}


class Cluster:
    """Three redis-server masters on free ports, joined into one cluster covering all 16384 slots."""

    def __init__(self, folder: Path) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen] = []
        for port in self.ports:
            node_dir = folder / str(port)
            node_dir.mkdir(parents=True)
            self.processes.append(
                subprocess.Popen(
                    [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                     "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                     "--save", "", "--appendonly", "no", "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                     "--loglevel", "warning"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for node in self.nodes():
            wait_for(lambda node=node: _answers(node), f"cluster node {node}", timeout=20)
        subprocess.run(
            ["redis-cli", "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for node in self.nodes():
            wait_for(lambda node=node: _cluster_ok(node), f"cluster_state:ok on {node}", timeout=30, every=0.1)

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.ports[0]}/0"

    def nodes(self) -> list[redis.Redis]:
        """One plain (non-cluster) client per master, to look at what each node holds."""
        return [redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, decode_responses=True) for port in self.ports]

    def keys_per_node(self, pattern: str) -> list[int]:
        return [sum(1 for _ in node.scan_iter(match=pattern, count=1_000)) for node in self.nodes()]

    def close(self) -> None:
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
    if shutil.which("redis-cli") is None or not Path(redis_server_binary()).exists():
        pytest.skip("redis-server and redis-cli are needed to start a Redis Cluster; install redis-server")
    started = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[redis.RedisCluster]:
    r = serving.connect(cluster.url, cluster=True)
    yield r
    r.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return request.node.name.removeprefix("test_")[:40]


def recs_for(users: range, first_item: int) -> pl.DataFrame:
    """User u gets items [first_item + u % 50, first_item + 1, u]: a list that differs per user and per week."""
    return pl.DataFrame({"user_id": list(users)}).with_columns(
        items=pl.concat_list(pl.col("user_id") % 50 + first_item, pl.lit(first_item + 1), pl.col("user_id"))
    )


def publish_week(r: redis.RedisCluster, prefix: str, week: int, **options) -> serving.PublishResult:
    as_of = AS_OF + timedelta(weeks=week)
    return serving.publish_recommendations(
        r, prefix, as_of, recs_for(range(USERS), 1_000 * (week + 1)), [week, 999], METADATA, chunk=500, **options
    )
