"""`make test` runs pytest-xdist workers; on configured servers each takes stores of its own."""

import pytest
import sqlalchemy as sa

from recsys.stores import Stores, sqlalchemy_url
from tests.conftest import worker_settings


def test_a_worker_on_configured_servers_gets_its_own_database_and_redis_number(stores: Stores, tmp_path, monkeypatch):
    database = sa.make_url(sqlalchemy_url(stores.database_url)).database
    monkeypatch.setenv("RECSYS_DATABASE_URL", stores.database_url)
    monkeypatch.setenv("RECSYS_REDIS_URL", "redis://127.0.0.1:6379/2")

    settings = worker_settings(tmp_path, "gw3")

    url = sqlalchemy_url(settings.database_url.get_secret_value())
    assert sa.make_url(url).database == f"{database}_gw3"
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/5"
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:  # created, and reachable
            assert conn.execute(sa.text("select current_database()")).scalar_one() == f"{database}_gw3"
        assert worker_settings(tmp_path, "gw3") == settings  # a second session reuses it
    finally:
        engine.dispose()
        with stores.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{database}_gw3"'))


def test_outside_xdist_the_configured_servers_are_used_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATABASE_URL", "postgresql://u@h/d")
    monkeypatch.setenv("RECSYS_REDIS_URL", "redis://h:6379/0")

    settings = worker_settings(tmp_path, None)

    assert settings.database_url.get_secret_value() == "postgresql://u@h/d"
    assert settings.redis_url.get_secret_value() == "redis://h:6379/0"


def test_a_worker_needs_a_redis_url_with_database_numbers(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_DATABASE_URL", raising=False)
    monkeypatch.setenv("RECSYS_REDIS_URL", "unix:///tmp/redis.sock")

    with pytest.raises(RuntimeError, match=r"pytest -n needs a redis:// URL .* got unix://"):
        worker_settings(tmp_path, "gw1")
