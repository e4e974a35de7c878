"""Postgres crashes in the middle of a feature write, a registry write and a publication record.

Each write is held half-way by a table lock taken from another session (its first
statements done, the next one waiting), then the private server is stopped like a crash
(`pg_ctl stop -m immediate`) and started again. Nothing of the write may be visible, the
error must name the lost connection, and the same call must succeed once Postgres is back.
"""

import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pandas as pd
import polars as pl
import pytest
import sqlalchemy as sa

from features import contracts, store, transform
from features.synthetic import generate_log
from features.validation import ValidationReport
from inference import publications
from ranking import registry
from tests.reliability.services import PrivatePostgres, dump_postgres, wait_for, waiting_on_lock

pytestmark = pytest.mark.reliability

WEEK = date(2025, 3, 3)
NAME = "weekly-ranker"
LOST_CONNECTION = ("server closed the connection", "terminating connection", "connection failed")


@pytest.fixture
def engine(private_postgres: PrivatePostgres):
    """An empty database of the private server; the server runs again when the test ends."""
    private_postgres.create_database("faults")
    engine = private_postgres.engine("faults", pool_pre_ping=True)
    yield engine
    engine.dispose()
    if not private_postgres.is_running():
        private_postgres.start()


def crash_while_blocked(server: PrivatePostgres, engine: sa.Engine, table: str, waits_at: str, write: Callable):
    """Run `write` until it waits for `table` at a statement starting with `waits_at`, crash the
    server, start it again; return the exception `write` raised."""
    blocker = engine.connect()
    blocker.execute(sa.text(f'lock table "{table}" in share mode'))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except Exception as error:  # handed to the test
            raised.append(error)

    writer = threading.Thread(target=run)
    writer.start()
    wait_for(lambda: raised or waiting_on_lock(engine, waits_at), f"a write waiting at {waits_at}")
    server.stop("immediate")
    writer.join(timeout=60)
    blocker.invalidate()
    server.start()
    assert not writer.is_alive() and len(raised) == 1, f"the write did not fail: {raised}"
    error = raised[0]
    assert isinstance(error, sa.exc.OperationalError), f"{type(error).__name__}: {error}"
    assert any(words in str(error) for words in LOST_CONNECTION), str(error)
    return error


def snapshot_frames(seed: int) -> dict[str, pl.DataFrame]:
    """User then item features of WEEK from a tiny synthetic log (user_features is written first)."""
    raw = generate_log(n_users=30, n_items=20, n_events=1_500, n_weeks=6, end=transform.week_start(WEEK), seed=seed)
    frames = transform.build_feature_tables(raw.events, raw.items, WEEK, recent_items=5, neighbours=5)
    return {name: frames[name] for name in (contracts.USER_FEATURES.name, contracts.ITEM_FEATURES.name)}


def passed_reports(frames: dict[str, pl.DataFrame]) -> dict[str, ValidationReport]:
    # Validation is not under test here: these reports only let write_snapshot proceed.
    return {name: ValidationReport(name, WEEK, True, frame.height) for name, frame in frames.items()}


def test_crash_mid_feature_write_leaves_the_previous_snapshot_and_the_retry_writes_it(engine, private_postgres):
    store.ensure_schema(engine)
    old, new = snapshot_frames(seed=1), snapshot_frames(seed=2)
    store.write_snapshot(engine, WEEK, old, passed_reports(old), flow_run_id="first")
    before = dump_postgres(engine)

    crash_while_blocked(
        # Both tables are loaded by then, user_features already swapped in: the crash lands mid-swap.
        private_postgres, engine, "item_features", 'drop table if exists "item_features__',
        lambda: store.write_snapshot(engine, WEEK, new, passed_reports(new), flow_run_id="crashed"),
    )  # fmt: skip

    assert dump_postgres(engine) == before, "part of the crashed snapshot is visible"
    digests = store.write_snapshot(engine, WEEK, new, passed_reports(new), flow_run_id="retry")
    assert store.snapshot_summary(engine, WEEK).select("table_name", "digest").rows() == sorted(digests.items())
    users = store.read_table(engine, contracts.USER_FEATURES.name, WEEK)
    assert users.height == new[contracts.USER_FEATURES.name].height


def test_every_store_writing_task_retries_with_backoff():
    from flows import feature_flow, inference_flow, training_flow

    writers = [feature_flow.write_snapshot, training_flow.register_and_gate, inference_flow.record_publication]
    for task in writers:
        assert task.retries >= 2, f"{task.name} is not retried"
        assert min(task.retry_delay_seconds) >= 1, f"{task.name} retries without backoff"


@pytest.fixture(scope="module")
def model_text() -> str:
    rng = np.random.default_rng(7)
    features = pd.DataFrame({"plays_4w": rng.integers(0, 50, 60), "cooc_score": rng.normal(size=60)})
    ranker = lgb.LGBMRanker(n_estimators=3, num_leaves=4, min_child_samples=2, verbose=-1, n_jobs=1)
    ranker.fit(features, rng.integers(0, 3, 60), group=[10] * 6)
    return ranker.booster_.model_to_string()


def register(engine: sa.Engine, text: str) -> int:
    return registry.register_model(
        engine, name=NAME, model_text=text, feature_names=["plays_4w", "cooc_score"], encodings={},
        params={}, metrics={"model": {"ndcg@10": 0.2}}, as_of=WEEK, training_as_ofs=[WEEK - timedelta(14)],
        validation_as_of=WEEK - timedelta(7), holdout_as_of=WEEK, feature_snapshots={},
    )  # fmt: skip


def test_crash_mid_registration_registers_nothing_and_the_retry_gets_version_one(engine, private_postgres, model_text):
    registry.ensure_schema(engine)
    before = dump_postgres(engine)

    crash_while_blocked(
        private_postgres, engine, "model_versions", "insert into model_versions", lambda: register(engine, model_text)
    )

    assert dump_postgres(engine) == before
    assert register(engine, model_text) == 1
    registry.load_model(engine, NAME, 1)


def test_crash_mid_promotion_leaves_the_champion_and_its_history_unchanged(engine, private_postgres, model_text):
    registry.ensure_schema(engine)
    first, second = register(engine, model_text), register(engine, model_text)
    registry.promote(engine, NAME, first, reason="beats baselines", actor="test")
    before = dump_postgres(engine)

    crash_while_blocked(
        private_postgres, engine, "model_alias_history", "insert into model_alias_history",
        lambda: registry.promote(engine, NAME, second, reason="better", actor="test"),
    )  # fmt: skip

    assert dump_postgres(engine) == before
    assert registry.get_champion(engine, NAME).version == first
    registry.promote(engine, NAME, second, reason="better", actor="test")
    assert registry.get_champion(engine, NAME).version == second
    assert registry.history(engine, NAME)["to_version"].to_list() == [first, second]


def test_crash_mid_publication_record_keeps_the_row_as_it_was(engine, private_postgres):
    publications.ensure_schema(engine)
    started = datetime(2025, 3, 3, 5, tzinfo=UTC)
    publications.record_publication(engine, version="20250303-000001", as_of=WEEK, status="writing", started_at=started)
    before = dump_postgres(engine)
    finish = {"version": "20250303-000001", "status": "live", "user_count": 300, "finished_at": started}

    crash_while_blocked(
        private_postgres, engine, "publications", "update publications",
        lambda: publications.record_publication(engine, **finish),
    )  # fmt: skip
    assert dump_postgres(engine) == before

    crash_while_blocked(
        private_postgres, engine, "publications", "insert into publications",
        lambda: publications.record_publication(engine, version="20250303-000002", as_of=WEEK, status="writing"),
    )  # fmt: skip
    assert dump_postgres(engine) == before

    publications.record_publication(engine, **finish)
    (row,) = publications.list_publications(engine).iter_rows(named=True)
    assert (row["status"], row["user_count"]) == ("live", 300)
