"""SIGKILL the process running a flow (`recsys train`, `recsys infer`), then look at the stores.

The flows run in real child processes against the session's Prefect API, the test's copy
of the trained template and a private Redis.
"""

import os
import random
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import prefect.settings
import pytest
import sqlalchemy as sa

from flows import inference_flow as inference_module
from flows import training_flow as training_module
from inference import serving
from inference.publish import StalePublication
from ranking import registry
from tests.reliability.conftest import AS_OF, job_environment, shorten_retries, start_redis
from tests.reliability.observe import live_version, new_writing_version, versions, when
from tests.reliability.services import wait_for, waiting_on_lock

pytestmark = pytest.mark.reliability

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "recs"


class HalfRegisteredModel(AssertionError):
    """A model version the gate promoted that never became champion."""


def start_cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`recsys ARGS` in a child process on this test's environment and Prefect API; stderr to a file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    stderr = tmp_path / f"{args[0]}.stderr"
    env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    with stderr.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args],
            stdout=subprocess.DEVNULL, stderr=sink, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
    return process, stderr


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def no_advisory_locks(engine: sa.Engine) -> bool:
    """Postgres has dropped the killed process's session and with it its advisory locks."""
    with engine.connect() as conn:
        return not conn.execute(sa.text("select count(*) from pg_locks where locktype = 'advisory'")).scalar_one()


def read_and_compare(r, expected: dict[int, list[int]], fallback: list[int], live: str, stop, problems, reads) -> None:
    """Look up random users (and one unknown) until stopped; each answer must be the old live set's.

    `reads[0]` counts the lookups done, so the test can wait for one after an event."""
    rng = random.Random(11)
    users = sorted(expected)
    while not stop.wait(0.005) and reads[0] < 100_000:
        batch = rng.sample(users, min(20, len(users))) + [10**9]
        try:
            recs = serving.get_recommendations(r, PREFIX, batch)
        except Exception as error:  # a reader must never fail: record it for the test
            problems.append(f"read {reads[0]} failed: {type(error).__name__}: {error}")
            continue
        got = {rec.user_id: (rec.version, rec.items) for rec in recs}
        want = {u: (live, expected[u]) for u in batch[:-1]} | {10**9: (live, fallback)}
        if got != want:
            problems.append(f"read {reads[0]}: {got} != {want}")
        reads[0] += 1


def test_sigkill_while_publishing_keeps_readers_on_the_complete_old_set_and_the_next_run_succeeds(
    publishing, job_secrets, tmp_path
):
    _, server, live, engine = publishing
    r = server.client()
    users = [int(name.rsplit(":", 1)[1]) for name in r.scan_iter(match=f"{PREFIX}:{live}:u:*", count=1_000)]
    expected = {rec.user_id: rec.items for rec in serving.get_recommendations(r, PREFIX, users)}
    fallback = serving.get_recommendations(r, PREFIX, [10**9])[0].items
    stop, problems, reads = threading.Event(), [], [0]
    reader = threading.Thread(target=read_and_compare, args=(r, expected, fallback, live, stop, problems, reads))
    reader.start()
    try:
        wait_for(lambda: reads[0] or problems, "the reader's first lookup")
        process, stderr = start_cli(tmp_path, "infer", "--as-of", str(AS_OF))
        killer = when(new_writing_version(server.url(), {live}), lambda _: sigkill(process), timeout=240)
        killer.join(timeout=250)
        if process.poll() is None:
            sigkill(process)
        killed_at = reads[0]
        wait_for(lambda: reads[0] > killed_at or problems, "a lookup after the kill")
    finally:
        stop.set()
        reader.join(timeout=30)

    assert "value" in killer.outcome, f"the child never started writing: {stderr.read_text()[-2000:]}"
    assert problems == []
    killed = killer.outcome["value"]
    assert r.hget(serving.KeySpace(PREFIX).meta(killed), "status") == "writing"
    assert live_version(r) == live
    assert job_secrets.found_in(stderr.read_text()) == []
    wait_for(lambda: no_advisory_locks(engine), "Postgres to drop the killed publisher's lock", timeout=30)

    result = inference_module.inference_flow(as_of=AS_OF)

    assert live_version(r) == result["version"]
    assert versions(r) == {live, result["version"]}, "the killed run's partial namespace was left behind"
    recs = serving.get_recommendations(r, PREFIX, users)
    assert all(rec.version == result["version"] and rec.items for rec in recs)


def test_sigkill_during_registration_leaves_no_half_registered_model_and_the_next_run_succeeds(
    job_database, private_postgres, redis_servers, trained_template, job_secrets, tmp_path, monkeypatch
):
    server = start_redis(redis_servers, tmp_path, password=job_secrets.redis)
    settings = job_environment(monkeypatch, job_database.url, server.url(), trained_template.data_dir)
    shorten_retries(monkeypatch, training_module, [0.2, 0.2, 0.2])
    engine = job_database.engine(private_postgres, poolclass=sa.NullPool)
    with engine.begin() as conn:  # a registry without models: the next one must become champion
        conn.execute(sa.text("truncate model_versions, model_aliases, model_alias_history"))
    blocker = engine.connect()
    blocker.begin()
    # Alias changes wait behind this lock, so the kill lands inside the registration step.
    blocker.execute(sa.text("lock table model_aliases in share mode"))
    try:
        process, stderr = start_cli(tmp_path, "train", "--as-of", str(AS_OF))
        try:
            wait_for(
                lambda: process.poll() is not None or waiting_on_lock(engine, "insert into model_aliases"),
                "the training child to reach the champion alias", timeout=300, every=0.2,
            )  # fmt: skip
        except TimeoutError:
            pytest.fail(f"the child never reached the alias change: {stderr.read_text()[-3000:]}")
        assert process.poll() is None, f"the child ended early: {stderr.read_text()[-2000:]}"
        sigkill(process)
    finally:
        blocker.rollback()
        blocker.close()
    assert job_secrets.found_in(stderr.read_text()) == []
    wait_for(lambda: no_advisory_locks(engine), "Postgres to end the killed trainer's session", timeout=30)
    left = registry.list_models(engine, settings.model_name)
    for version in left["version"]:
        registry.load_model(engine, settings.model_name, version)  # complete: hash and shape check
    assert registry.get_champion(engine, settings.model_name) is None

    trained = training_module.training_flow(as_of=AS_OF)

    champion = registry.get_champion(engine, settings.model_name)
    # The gate may leave the best baseline serving on a log this small: either way a complete champion.
    assert champion is not None and champion.label == trained["champion"], (trained["reason"], champion)
    assert champion.version == trained["version"] if trained["promote"] else champion.kind == "baseline"
    held = set(registry.history(engine, settings.model_name)["to_version"])
    orphans = [
        record.version
        for record in (registry.get_model(engine, settings.model_name, v) for v in left["version"])
        if record.decision and record.decision["promote"] and record.version not in held
    ]
    engine.dispose()
    if orphans:
        raise HalfRegisteredModel(f"versions {orphans} passed the gate but never became champion")


def test_older_week_racing_a_newer_one_waits_its_turn_and_never_replaces_it(
    job_database, private_postgres, redis_servers, trained_template, job_secrets, tmp_path, monkeypatch
):
    """Two publishing flows at once (threads, each with its own connections): the newer holds the lock."""
    server = start_redis(redis_servers, tmp_path, password=job_secrets.redis)
    job_environment(monkeypatch, job_database.url, server.url(), trained_template.data_dir)
    engine = job_database.engine(private_postgres, poolclass=sa.NullPool)
    runs: dict[str, object] = {}

    def publish(name: str, as_of) -> None:
        runs[name] = inference_module.inference_flow(as_of=as_of, return_state=True)

    holder = engine.connect()
    # The newer run stops inside its publication (scoring reads this table) until released.
    holder.execute(sa.text("lock table item_neighbours in access exclusive mode"))
    threads = [threading.Thread(target=publish, args=("newer", AS_OF))]
    try:
        threads[0].start()
        wait_for(new_writing_version(server.url(), set(), min_written=0), "the newer run to begin", timeout=120)
        threads.append(threading.Thread(target=publish, args=("older", AS_OF - timedelta(weeks=1))))
        threads[1].start()
        wait_for(lambda: waiting_on_lock(engine, "pg_advisory_lock"), "the older run to queue", timeout=120)
    finally:
        holder.rollback()
        holder.close()
        for thread in threads:
            thread.join(timeout=240)

    assert runs["newer"].is_completed(), runs["newer"]
    error = runs["older"].result(raise_on_failure=False)
    assert isinstance(error, StalePublication) and "older than the live version" in str(error)
    r = server.client()
    (rec,) = serving.get_recommendations(r, PREFIX, [10**9])
    assert rec.as_of == AS_OF and versions(r) == {rec.version}
    engine.dispose()
