"""Settings, the weekly clock and store URL handling: the entry point's pure parts."""

import os
import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.clock import mondays, parse_as_of, week_floor
from recsys.settings import Settings
from recsys.stores import libpq_url, sqlalchemy_url


@pytest.mark.parametrize(
    ("moment", "monday"),
    [
        (date(2026, 11, 23), date(2026, 11, 23)),
        (date(2026, 11, 29), date(2026, 11, 23)),
        (datetime(2026, 11, 30, 0, 0, tzinfo=UTC), date(2026, 11, 30)),
        (datetime(2026, 11, 29, 23, 59, tzinfo=UTC), date(2026, 11, 23)),
        # Monday 01:00 in UTC+2 is still Sunday in UTC: the clock is UTC.
        (datetime(2026, 11, 30, 1, 0, tzinfo=timezone(timedelta(hours=2))), date(2026, 11, 23)),
    ],
)
def test_week_floor_is_the_monday_on_or_before_in_utc(moment, monday):
    assert week_floor(moment) == monday


def test_parse_as_of_accepts_a_monday_and_names_the_weekday_otherwise():
    assert parse_as_of("1998-03-02") == date(1998, 3, 2)
    with pytest.raises(ValueError, match=r"1998-03-04 is a Wednesday.*1998-03-02"):
        parse_as_of("1998-03-04")
    with pytest.raises(ValueError, match="not an ISO date"):
        parse_as_of("last monday")


def test_mondays_lists_every_week_oldest_first_both_ends_included():
    assert mondays(date(2026, 11, 9), "2026-11-23") == [date(2026, 11, 9), date(2026, 11, 16), date(2026, 11, 23)]
    assert mondays("2026-11-23", "2026-11-23") == [date(2026, 11, 23)]


def test_mondays_refuses_a_reversed_range_and_a_weekday():
    with pytest.raises(ValueError, match="2026-11-23 is after the last week 2026-11-09"):
        mondays("2026-11-23", "2026-11-09")
    with pytest.raises(ValueError, match="Tuesday"):
        mondays("2026-11-10", "2026-11-23")


@pytest.mark.parametrize(
    "url", ["postgresql://u:p@h:5432/d", "postgres://u:p@h:5432/d", "postgresql+psycopg2://u:p@h:5432/d"]
)
def test_postgres_urls_normalise_to_psycopg3(url):
    assert sqlalchemy_url(url) == "postgresql+psycopg://u:p@h:5432/d"
    assert libpq_url(url) == "postgresql://u:p@h:5432/d"


def test_a_non_postgres_url_is_refused_without_echoing_it():
    with pytest.raises(ValueError, match="'mysql'") as raised:
        sqlalchemy_url("mysql://user:secret@h/d")
    assert "secret" not in str(raised.value)


def test_settings_read_the_environment_and_keep_urls_secret(monkeypatch):
    monkeypatch.setenv("RECSYS_DATABASE_URL", "postgresql://u:hunter2@h/d")
    monkeypatch.setenv("RECSYS_TOP_N", "7")
    settings = Settings()
    assert settings.top_n == 7
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


@pytest.mark.parametrize(("name", "value"), [("RECSYS_REDIS_PREFIX", "recs:*"), ("RECSYS_MODEL_NAME", "x'; drop")])
def test_names_used_in_keys_and_sql_are_validated(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("RECSYS_").lower()):
        Settings()


def test_openmp_threads_wait_passively_unless_the_environment_says_otherwise(monkeypatch):
    from recsys.runtime import configure_openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    configure_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize(
    "entry", ["import benchmarks.backtest", "from cli.main import configure_environment as c; c()"]
)
def test_entry_points_set_the_wait_policy(entry):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = f"{entry}; import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert out.stdout.strip() == "PASSIVE"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_returns_what_glibc_holds_free_to_the_system(caplog):
    import ctypes

    import psutil

    from recsys.runtime import release_freed_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, count = 64 * 1024, 4096  # 256 MB in blocks under the mmap threshold: they live in the heap
    blocks = [libc.malloc(chunk) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, chunk)  # resident
    guard = libc.malloc(chunk)  # above them: freeing them leaves free pages that do not shrink the heap's top
    for block in blocks:
        libc.free(block)
    process = psutil.Process()
    before = process.memory_info().rss
    with caplog.at_level("INFO", logger="recsys.runtime"):
        release_freed_memory("the test's blocks")
    after = process.memory_info().rss
    libc.free(guard)
    assert before - after > 128 * 2**20, f"RSS {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB"
    assert re.fullmatch(r"the test's blocks: memory released \(\d+ objects collected\): RSS [\d.]+ -> [\d.]+ GB",
                        caplog.records[-1].getMessage())  # fmt: skip


def test_a_small_step_is_not_released(monkeypatch, caplog):
    """A full collection costs 0.3-2 s in a process holding Prefect and great-expectations: not for small weeks."""
    from recsys import runtime

    collections = []
    monkeypatch.setattr(runtime.gc, "collect", lambda: collections.append(1) or 0)
    with caplog.at_level("INFO", logger="recsys.runtime"):
        runtime.release_freed_memory("a small week", rows=runtime.RELEASE_MIN_ROWS - 1)
        assert collections == [] and "memory released" not in caplog.text
        runtime.release_freed_memory("a large week", rows=runtime.RELEASE_MIN_ROWS)
        runtime.release_freed_memory("a step of unknown size")
    assert collections == [1, 1] and caplog.text.count("memory released") == 2


def test_release_gives_back_what_arrows_pool_holds_when_pyarrow_is_loaded(monkeypatch):
    """Polars' conversions to pandas allocate through pyarrow's pool (mimalloc), which keeps freed pages."""
    import types

    from recsys import runtime

    released = []
    pool = types.SimpleNamespace(release_unused=lambda: released.append(1))
    monkeypatch.setitem(sys.modules, "pyarrow", types.SimpleNamespace(default_memory_pool=lambda: pool))
    runtime.release_freed_memory("a step")
    assert released == [1]
    monkeypatch.delitem(sys.modules, "pyarrow")
    runtime.release_freed_memory("a step without pyarrow")  # nothing to release there, and no import
    assert released == [1] and "pyarrow" not in sys.modules
