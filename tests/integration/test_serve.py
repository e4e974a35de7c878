"""`python -m deployments.serve` against real stores: deployments, ad hoc runs, one at a time.

One serve process (with the local Prefect server it starts) is shared by the module;
its flow runs are subprocesses that read RECSYS_* from the environment we give it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import httpx
import pytest
import sqlalchemy as sa

from deployments.serve import free_port, stop_process
from inference import serving
from recsys.settings import Settings
from recsys.stores import Stores
from tests.conftest import SMALL_JOB

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("features/weekly", "training/weekly", "inference/weekly")
REDIS_PREFIX = "servetest"
AS_OF = date(2026, 11, 23)
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Served:
    """A running serve process and a client of the Prefect API it serves to."""

    process: subprocess.Popen
    client: "SyncPrefectClient"
    api_url: str
    log_path: Path


@pytest.fixture(scope="module")
def served(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from prefect.client.orchestration import SyncPrefectClient

    _empty_stores(stores)
    home = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RECSYS_"))},
        **SMALL_JOB,
        "RECSYS_DATABASE_URL": stores.database_url,
        "RECSYS_REDIS_URL": stores.redis_url,
        "RECSYS_REDIS_PREFIX": REDIS_PREFIX,
        "RECSYS_DATA_DIR": str(home / "data"),
        "RECSYS_PREFECT_PORT": str(port),
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
        # Pick up ad hoc runs within a second, and retry a queued run every second.
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    }
    log_path = home / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    client = SyncPrefectClient(api_url)
    try:
        with client:
            served = Served(process, client, api_url, log_path)
            _wait_for_deployments(served)
            yield served
    finally:
        process.send_signal(signal.SIGTERM)
        stop_process(process, timeout_s=60)
    # Everything serve started, the Prefect server among them, stops with it.
    assert process.returncode == 0, _tail(log_path)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the Prefect server outlived serve"


def _empty_stores(stores: Stores) -> None:
    with stores.engine.begin() as conn:
        conn.execute(sa.text("drop schema if exists public cascade"))
        conn.execute(sa.text("create schema public"))
    stores.redis.flushdb()


def _tail(log_path: Path, lines: int = 60) -> str:
    return "serve log tail:\n" + "\n".join(log_path.read_text().splitlines()[-lines:])


def _wait_for_deployments(served: Served) -> None:
    from prefect.exceptions import ObjectNotFound

    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        assert served.process.poll() is None, f"serve exited early\n{_tail(served.log_path)}"
        try:
            for name in DEPLOYMENTS:
                served.client.read_deployment_by_name(name)
            return
        except (ObjectNotFound, httpx.HTTPError):
            time.sleep(1)
    pytest.fail(f"deployments not served after {START_TIMEOUT_S:.0f} s\n{_tail(served.log_path)}")


def trigger(served: Served, deployment: str, **parameters: object) -> UUID:
    """Create an ad hoc run of `deployment`, as `prefect deployment run` does."""
    found = served.client.read_deployment_by_name(deployment)
    run = served.client.create_flow_run_from_deployment(found.id, parameters=parameters)
    return run.id


def wait_for_final_state(served: Served, run_id: UUID) -> "FlowRun":
    """The flow run once it is completed, failed, crashed or cancelled."""
    started = time.monotonic()
    while time.monotonic() - started < RUN_TIMEOUT_S:
        run = served.client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.5)
    pytest.fail(f"run {run_id} not finished after {RUN_TIMEOUT_S:.0f} s\n{_tail(served.log_path)}")


def wait_for_log_line(served: Served, run_id: UUID, text: str, timeout_s: float = 30.0) -> bool:
    """Whether a log line of the run containing `text` reaches the API (runs send their logs in batches)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    run_lines = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
    started, seen = time.monotonic(), 0
    while time.monotonic() - started < timeout_s:
        page = served.client.read_logs(log_filter=run_lines, offset=seen, limit=200)
        if any(text in entry.message for entry in page):
            return True
        seen += len(page)
        if len(page) < 200:
            time.sleep(0.5)
    return False


def running_interval(served: Served, run_id: UUID) -> tuple[float, float]:
    """When the run entered Running and when it left it, from its state history."""
    states = sorted(served.client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
    (start,) = [i for i, state in enumerate(states) if state.is_running()]
    return states[start].timestamp.timestamp(), states[start + 1].timestamp.timestamp()


def test_all_three_deployments_are_served_with_their_utc_cron_schedules(
    served: Served,
) -> None:
    expected = {
        "features/weekly": "0 1 * * 1",
        "training/weekly": "0 3 * * 1",
        "inference/weekly": "0 5 * * 1",
    }
    for name, cron in expected.items():
        deployment = served.client.read_deployment_by_name(name)
        (schedule,) = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (cron, "UTC"), name
        assert schedule.active, f"{name} schedule is paused"
        assert deployment.global_concurrency_limit.limit == 1, name


def test_ad_hoc_runs_in_order_publish_the_weeks_recommendations(served: Served, stores: Stores) -> None:
    # Enough weeks for training: train, validation and holdout snapshots before as_of.
    backfill_from = AS_OF - timedelta(weeks=4)
    for deployment, parameters in [
        ("features/weekly", {"as_of": AS_OF.isoformat(), "backfill_from": backfill_from.isoformat()}),
        ("training/weekly", {"as_of": AS_OF.isoformat()}),
        ("inference/weekly", {"as_of": AS_OF.isoformat()}),
    ]:
        run = wait_for_final_state(served, trigger(served, deployment, **parameters))
        assert run.state.is_completed(), f"{deployment}: {run.state}\n{_tail(served.log_path)}"
        assert {name: run.parameters[name] for name in parameters} == parameters
        if deployment == "features/weekly":  # the source is a deployment parameter, shown in the UI
            assert run.parameters["source"] == "synthetic"
            # The project's own log lines reach the run's logs in the UI, not only Prefect's.
            assert wait_for_log_line(served, run.id, "feature snapshots to compute"), _tail(served.log_path)

    keys = serving.KeySpace(REDIS_PREFIX)
    live = stores.redis.get(keys.live)
    assert live is not None, "inference published nothing"
    assert stores.redis.hget(keys.meta(live), "as_of") == AS_OF.isoformat()
    recs = serving.get_recommendations(stores.redis, REDIS_PREFIX, [1, 2, 3])
    assert all(0 < len(rec.items) <= Settings.model_fields["top_n"].default for rec in recs)
    assert any(not rec.is_fallback for rec in recs)


def test_two_runs_of_one_deployment_never_overlap(served: Served) -> None:
    runs = [trigger(served, "features/weekly", as_of=AS_OF.isoformat()) for _ in range(2)]
    finished = [wait_for_final_state(served, run) for run in runs]

    assert all(run.state.is_completed() for run in finished), [r.state for r in finished]
    (first, _), (second, later) = sorted((running_interval(served, run), run) for run in runs)
    assert second[0] >= first[1], "the second run started before the first one ended"
    # It existed, scheduled, while the first ran: it waited for the slot (the runner or the
    # server's ENQUEUE strategy held it back), rather than running alongside or being lost.
    created = served.client.read_flow_run(later).created.timestamp()
    assert created < first[1], "both runs must exist while the first one runs, or the test proves nothing"
