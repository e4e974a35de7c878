"""Faults injected into real Redis and Postgres servers while the inference flow publishes.

Each test copies the trained template into its own database and publishes into its own
redis-server (AOF on, so a SIGKILLed server comes back with what it had confirmed).
Task retry delays are shortened (count and conditions unchanged) so a test takes seconds.
"""

import hashlib
import pickle
import re
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from flows import inference_flow as inference_module
from inference import publications, publish, serving
from ranking import registry
from tests.reliability.conftest import AS_OF, shorten_retries
from tests.reliability.observe import (
    live_version,
    namespace_dump,
    new_writing_version,
    task_attempts,
    task_run_counts,
    versions,
    watching_retries,
    when,
)
from tests.reliability.services import dump_redis

pytestmark = pytest.mark.reliability

PREFIX = "recs"
# Retry delays while a server is down: the first retry comes quickly, the last leaves a crashed
# Postgres time for its recovery on a loaded machine (a task gets 3 retries, as in production).
OUTAGE_RETRY_DELAYS = [1.0, 5.0, 30.0]


def run_failing(as_of=AS_OF) -> tuple[BaseException, object]:
    """Run the inference flow expecting failure; return its exception and flow run id."""
    state = inference_module.inference_flow(as_of=as_of, return_state=True)
    assert state.is_failed(), f"the flow should have failed, it is {state.type}"
    return state.result(raise_on_failure=False), state.state_details.flow_run_id


def publication_rows(engine: sa.Engine) -> dict[str, dict]:
    return {row["version"]: row for row in publications.list_publications(engine).iter_rows(named=True)}


def test_redis_out_of_memory_mid_publish_fails_the_flow_and_keeps_the_live_set(publishing):
    _, server, live, engine = publishing
    r = server.client()
    before = namespace_dump(server.url(), live)
    # Once the new version has user keys, Redis is full: every later write is refused (noeviction).
    filler = when(new_writing_version(server.url(), {live}), lambda _: r.config_set("maxmemory", 1), timeout=120)

    error, _ = run_failing()

    filler.join(timeout=10)
    assert isinstance(error, publish.PublishError)
    assert "used memory > 'maxmemory'" in str(error)
    assert live_version(r) == live
    assert namespace_dump(server.url(), live) == before
    (rec,) = serving.get_recommendations(r, PREFIX, [1])
    assert rec.version == live
    (failed,) = [row for row in publication_rows(engine).values() if row["version"] != live]
    assert failed["status"] == "failed" and "maxmemory" in failed["error"]
    assert failed["version"] in versions(r), "a full Redis cannot even be cleaned: the next run must do it"

    r.config_set("maxmemory", 0)
    retried = inference_module.inference_flow(as_of=AS_OF)

    assert live_version(r) == retried["version"]
    assert versions(r) == {live, retried["version"]}, "the failed run's partial namespace was left behind"


def test_redis_killed_mid_publish_fails_naming_the_connection_and_the_next_run_cleans_up(publishing):
    _, server, live, _ = publishing
    before = namespace_dump(server.url(), live)
    killer = when(new_writing_version(server.url(), {live}), lambda _: server.kill(), timeout=120)

    error, _ = run_failing()

    killer.join(timeout=10)
    assert "value" in killer.outcome, "the publication never started writing"
    assert f"127.0.0.1:{server.port}" in str(error) and "onnect" in str(error)
    server.start()  # same port and AOF: what Redis confirmed before the kill is back
    r = server.client()
    assert live_version(r) == live
    assert namespace_dump(server.url(), live) == before
    partial = killer.outcome["value"]
    assert r.hget(serving.KeySpace(PREFIX).meta(partial), "status") == "writing"

    retried = inference_module.inference_flow(as_of=AS_OF)

    assert versions(r) == {live, retried["version"]}
    assert live_version(r) == retried["version"]


def run_through_an_outage(stop, start, known: set[str], url: str) -> tuple[object, list[str]]:
    """Run the inference flow; once its new version is being written, `stop` a server and `start` it
    again only after a task failed on it and Prefect scheduled its retry. The flow's final state
    and the task runs that were retried."""
    with watching_retries() as retries:

        def outage(_) -> None:
            stop()
            retries.scheduled.wait(timeout=120)  # down until a task has failed on it
            start()

        bouncer = when(new_writing_version(url, known, min_written=0), outage, timeout=120)
        try:
            state = inference_module.inference_flow(as_of=AS_OF, return_state=True)
        finally:
            retries.scheduled.set()  # a flow that failed without retrying: bring the server back anyway
            bouncer.join(timeout=60)
    assert "value" in bouncer.outcome, "the server was never stopped mid-publication"
    return state, retries.task_runs


def assert_retried_and_completed(state, retried: list[str]) -> None:
    """The flow completed, and every task run that failed on the outage ran again (Prefect's run counts)."""
    assert state.is_completed(), f"the flow did not survive the outage: {state.result(raise_on_failure=False)!r}"
    assert retried, "no task failed on the outage: nothing shows the retries worked"
    counts = task_run_counts(state.state_details.flow_run_id)
    assert all(counts[name] >= 2 for name in retried), {name: counts[name] for name in retried}


def test_redis_back_within_the_task_retries_lets_the_publication_complete(publishing, monkeypatch):
    _, server, live, _ = publishing
    shorten_retries(monkeypatch, inference_module, OUTAGE_RETRY_DELAYS)

    state, retried = run_through_an_outage(server.kill, server.start, {live}, server.url())

    assert_retried_and_completed(state, retried)
    result = state.result()
    r = server.client()
    assert live_version(r) == result["version"]
    meta = r.hgetall(serving.KeySpace(PREFIX).meta(result["version"]))
    assert meta["status"] == "live" and int(meta["written_users"]) == result["personal"]


def test_postgres_restart_mid_publish_is_retried_and_the_flow_completes(publishing, private_postgres, monkeypatch):
    _, server, live, engine = publishing
    shorten_retries(monkeypatch, inference_module, OUTAGE_RETRY_DELAYS)

    state, retried = run_through_an_outage(
        lambda: private_postgres.stop("immediate"), private_postgres.start, {live}, server.url()
    )

    assert_retried_and_completed(state, retried)
    result = state.result()
    assert live_version(server.client()) == result["version"]
    assert publication_rows(engine)[result["version"]]["status"] == "live"


class _Planted:
    """Unpickling this creates a file: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("tampering", ["changed-text", "pickle-payload"])
def test_tampered_champion_is_refused_before_anything_is_published(publishing, tampering, tmp_path):
    settings, server, live, engine = publishing
    champion = registry.get_champion(engine, settings.model_name)
    with engine.connect() as conn:
        text = conn.execute(
            sa.text("select model_text from model_versions where name = :n and version = :v"),
            {"n": champion.name, "v": champion.version},
        ).scalar_one()
    marker = tmp_path / "unpickled"
    if tampering == "changed-text":
        # Same sha256 on record, one digit of a leaf's score changed (same length, so LightGBM
        # would load it happily): a silent edit of the model.
        digit = re.search(r"leaf_value=-?\d", text).end() - 1
        forged, sha = text[:digit] + ("2" if text[digit] == "1" else "1") + text[digit + 1 :], None
    else:
        forged = pickle.dumps(_Planted(marker), protocol=0).decode("ascii")
        sha = hashlib.sha256(forged.encode()).hexdigest()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "update model_versions set model_text = :t, model_sha256 = coalesce(:s, model_sha256)"
                " where name = :n and version = :v"
            ),
            {"t": forged, "s": sha, "n": champion.name, "v": champion.version},
        )
    redis_before = dump_redis(server.url())
    rows_before = publication_rows(engine)

    error, flow_run_id = run_failing()

    assert isinstance(error, registry.ModelIntegrityError)
    assert f"model {champion.name} v{champion.version}" in str(error) and "refusing to load" in str(error)
    assert dump_redis(server.url()) == redis_before, "something was written to Redis"
    assert publication_rows(engine) == rows_before
    assert not marker.exists()
    assert task_attempts(flow_run_id, "find_champion") == [1], "a tampered model is not a transient fault"


def test_older_week_published_after_a_newer_one_is_refused_and_the_newer_stays_live(publishing):
    _, server, live, engine = publishing
    redis_before = dump_redis(server.url())

    error, _ = run_failing(as_of=AS_OF - timedelta(weeks=1))

    assert isinstance(error, publish.StalePublication)
    assert f"older than the live version {live}" in str(error)
    assert dump_redis(server.url()) == redis_before
    assert set(publication_rows(engine)) == {live}
