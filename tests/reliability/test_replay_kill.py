"""SIGKILL `recsys replay` in the middle of a week, start it again: it ends where an uninterrupted replay ends."""

import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import polars as pl
import prefect.settings
import pytest
import sqlalchemy as sa

from flows.replay import replay
from inference.archive import read_published_lists
from recsys.settings import Settings
from recsys.stores import Stores
from tests.conftest import SMALL_JOB
from tests.reliability.observe import live_version
from tests.reliability.services import wait_for

pytestmark = pytest.mark.reliability

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST, LAST = date(2025, 3, 3), date(2025, 3, 10)  # two past Mondays
KILL_AFTER = (FIRST, "features")  # then the child is training that week; the second week is still to come


def empty(stores: Stores) -> None:
    with stores.engine.begin() as conn:
        conn.exec_driver_sql("drop schema if exists public cascade; create schema public")
    stores.redis.flushdb()


def live_lists(stores: Stores) -> pl.DataFrame:
    return read_published_lists(stores.redis, "recs", live_version(stores.redis))


def stage_recorded(engine: sa.Engine, week: date, stage: str) -> bool:
    query = sa.text("select count(*) from replay_weeks where as_of = :week and stage = :stage")
    try:
        with engine.connect() as conn:
            return bool(conn.execute(query, {"week": week, "stage": stage}).scalar_one())
    except sa.exc.ProgrammingError:  # the child has not created the table yet
        return False


def start_replay(folder: Path) -> tuple[subprocess.Popen, Path]:
    stderr = folder / f"replay-{len(list(folder.glob('replay-*')))}.stderr"
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    with stderr.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "replay", "--from", str(FIRST), "--to", str(LAST)],
            stdout=subprocess.DEVNULL, stderr=sink, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
    return process, stderr


def test_replay_killed_mid_week_and_started_again_publishes_what_an_uninterrupted_one_does(
    clean_stores: Stores, settings: Settings, prefect_harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    env = {
        "RECSYS_DATABASE_URL": settings.database_url.get_secret_value(),
        "RECSYS_REDIS_URL": settings.redis_url.get_secret_value(),
        "RECSYS_DATA_DIR": str(settings.data_dir),  # both replays read the same synthetic log
        **SMALL_JOB,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    replay(Settings(), FIRST, LAST, "synthetic")
    expected = live_lists(clean_stores)
    empty(clean_stores)

    process, stderr = start_replay(tmp_path)
    try:
        wait_for(
            lambda: process.poll() is not None or stage_recorded(clean_stores.engine, *KILL_AFTER),
            f"the child to record {KILL_AFTER}", timeout=600, every=0.2,
        )  # fmt: skip
        assert process.poll() is None, f"the child ended before the kill: {stderr.read_text()[-2000:]}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert not stage_recorded(clean_stores.engine, LAST, "inference")

    process, stderr = start_replay(tmp_path)
    assert process.wait(timeout=900) == 0, stderr.read_text()[-3000:]

    assert expected.height > 0
    assert live_lists(clean_stores).equals(expected)
