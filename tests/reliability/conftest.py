"""Fixtures of the reliability tests: private servers to break, and a trained job to copy.

`trained_template` runs the feature and training flows once per session into a database of
a private Postgres, with passwords in every URL; each flow-level test then works on its
own copy of that database (`CREATE DATABASE ... TEMPLATE`, milliseconds) and its own Redis.
"""

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from types import ModuleType

import prefect
import pytest
import sqlalchemy as sa

from recsys.settings import Settings
from tests.conftest import SMALL_JOB
from tests.reliability.services import PrivatePostgres, PrivateRedis

AS_OF = date(2025, 3, 3)  # a Monday in the past on any CI clock
TEMPLATE = "recsys_template"
# The small job of the integration tests, with one training week so four snapshot weeks suffice.
JOB = {**SMALL_JOB, "RECSYS_TRAINING_WEEKS": "1"}
LIBRARY_LOGGERS = ("features", "training", "inference", "flows", "recsys")


class CollectedLogs(logging.Handler):
    """Every record (message and traceback) emitted while attached, formatted as text."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Secrets:
    """Passwords that must never show up in a log line, an artifact or Prefect's database."""

    postgres: str
    redis: str

    def found_in(self, text: str) -> list[str]:
        return [name for name, value in (("postgres", self.postgres), ("redis", self.redis)) if value in text]


@dataclass(frozen=True)
class Template:
    """The database holding a trained job (4 passed snapshot weeks, a champion) and how it was made."""

    name: str
    data_dir: Path
    logs: str
    champion_version: int


@pytest.fixture(scope="session")
def private_postgres(server_dir) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(server_dir("private-pg") / "data")
    yield server
    server.close()


@pytest.fixture(scope="session")
def job_secrets() -> Secrets:
    return Secrets(postgres=f"pg-S3cret-{secrets.token_hex(8)}", redis=f"redis-S3cret-{secrets.token_hex(8)}")


@pytest.fixture
def redis_servers(tmp_path: Path, job_secrets: Secrets) -> Iterator[list[PrivateRedis]]:
    """Start private Redis servers with `start_redis(redis_servers)`; all are killed afterwards."""
    started: list[PrivateRedis] = []
    yield started
    for server in started:
        server.close()


def start_redis(
    started: list[PrivateRedis], folder: Path, password: str | None = None, appendonly: bool = True
) -> PrivateRedis:
    server = PrivateRedis(folder / f"redis-{len(started)}", password=password, appendonly=appendonly)
    started.append(server)
    return server


def job_environment(patch: pytest.MonkeyPatch, database_url: str, redis_url: str, data_dir: Path) -> Settings:
    """Point flows (which build Settings from RECSYS_* variables) at these stores; return their Settings."""
    env = {
        "RECSYS_DATABASE_URL": database_url,
        "RECSYS_REDIS_URL": redis_url,
        "RECSYS_DATA_DIR": str(data_dir),
        **JOB,
    }
    for key, value in env.items():
        patch.setenv(key, value)
    return Settings()


def shorten_retries(patch: pytest.MonkeyPatch, module: ModuleType, delays: list[float]) -> None:
    """Give every retrying task of a flow module these retry delays (count and conditions unchanged).

    The flows look their tasks up as module globals at run time, so this is what they run.
    """
    for name, value in list(vars(module).items()):
        if isinstance(value, prefect.Task) and value.retries:
            patch.setattr(module, name, value.with_options(retry_delay_seconds=delays))


def collect_logs() -> tuple[CollectedLogs, list[tuple[logging.Logger, int]]]:
    """Attach a collector to the root and `prefect` loggers and open the library loggers at INFO."""
    handler = CollectedLogs()
    previous = [(logging.getLogger(name), logging.getLogger(name).level) for name in LIBRARY_LOGGERS]
    for logger, _ in previous:
        logger.setLevel(logging.INFO)
    for name in ("", "prefect"):
        logging.getLogger(name).addHandler(handler)
    return handler, previous


def stop_collecting(handler: CollectedLogs, previous: list[tuple[logging.Logger, int]]) -> None:
    for name in ("", "prefect"):
        logging.getLogger(name).removeHandler(handler)
    for logger, level in previous:
        logger.setLevel(level)


@pytest.fixture(scope="session")
def trained_template(
    private_postgres: PrivatePostgres,
    job_secrets: Secrets,
    prefect_harness,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Template]:
    """Features for the weeks the gate needs and a champion model, made by the real flows with passwords in the URLs."""
    from features.synthetic import ensure_synthetic_log
    from flows.configs import history_weeks, synthetic_log_config
    from flows.feature_flow import feature_flow
    from flows.training_flow import training_flow

    folder = tmp_path_factory.mktemp("template")
    redis_server = PrivateRedis(folder / "redis", password=job_secrets.redis)
    private_postgres.create_database(TEMPLATE)
    database_url = private_postgres.url(TEMPLATE, password=job_secrets.postgres)
    handler, levels = collect_logs()
    try:
        with pytest.MonkeyPatch.context() as patch:
            settings = job_environment(patch, database_url, redis_server.url(), folder)
            ensure_synthetic_log(synthetic_log_config(settings), AS_OF)
            # Training and validation weeks + the gate's weeks, so the gate pools RECSYS_GATE_WEEKS holdouts.
            weeks = history_weeks(settings)
            feature_flow(as_of=AS_OF, backfill_from=AS_OF - timedelta(weeks=weeks))
            trained = training_flow(as_of=AS_OF)
            if not trained["promote"]:
                # These tests are about faults, not quality: on a log this small the gate may leave a
                # baseline serving (ALS is strong here); the suite needs a trained model as champion.
                from ranking import registry

                engine = sa.create_engine(database_url)
                try:
                    registry.promote(engine, settings.model_name, trained["version"], force=True,
                                     reason="reliability template: a trained champion", actor="tests")  # fmt: skip
                finally:
                    engine.dispose()
    finally:
        stop_collecting(handler, levels)
        redis_server.close()
    yield Template(name=TEMPLATE, data_dir=folder, logs=handler.text, champion_version=trained["version"])


@dataclass(frozen=True)
class JobDatabase:
    """A private copy of the trained template."""

    name: str
    url: str  # with the session's Postgres password in it

    def engine(self, server: PrivatePostgres, **options):
        return server.engine(self.name, **options)


@pytest.fixture
def job_database(
    private_postgres: PrivatePostgres, trained_template: Template, job_secrets: Secrets, request
) -> Iterator[JobDatabase]:
    """This test's own copy of the trained template."""
    name = f"job_{secrets.token_hex(4)}"
    private_postgres.create_database(name, template=trained_template.name)
    yield JobDatabase(name=name, url=private_postgres.url(name, password=job_secrets.postgres))
    if not private_postgres.is_running():  # a fault test that failed half-way
        private_postgres.start()
    engine = private_postgres.engine(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'drop database if exists "{name}" with (force)')
    engine.dispose()


@pytest.fixture
def publishing(job_database, private_postgres, redis_servers, trained_template, job_secrets, tmp_path, monkeypatch):
    """A job database copy, a private Redis with one live publication, and flows pointed at both.

    Yields (settings, redis server, live version, engine on the job database).
    """
    from flows import inference_flow as inference_module

    server = start_redis(redis_servers, tmp_path, password=job_secrets.redis)
    settings = job_environment(monkeypatch, job_database.url, server.url(), trained_template.data_dir)
    monkeypatch.setenv("RECSYS_PUBLISH_CHUNK", "5")  # many round trips: faults land between them
    shorten_retries(monkeypatch, inference_module, [0.2, 0.2, 0.2])
    first = inference_module.inference_flow(as_of=AS_OF)
    engine = job_database.engine(private_postgres, poolclass=sa.NullPool)
    yield settings, server, first["version"], engine
    engine.dispose()
