"""Read-only views of what readers and operators see: Redis versions, flow task attempts."""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from inference.serving import KeySpace


def versions(r: redis.Redis, prefix: str = "recs") -> set[str]:
    """The version segment of every per-version key (user lists, fallback) under the prefix."""
    return {
        name.split(":")[1]
        for name in r.scan_iter(match=f"{prefix}:*", count=1_000)
        if not name.startswith(f"{prefix}:{{")
    }


def live_version(r: redis.Redis, prefix: str = "recs") -> str | None:
    return r.get(KeySpace(prefix).live)


def namespace_dump(url: str, version: str, prefix: str = "recs") -> dict[str, bytes]:
    """DUMP of every key of one version and of its metadata hash: equal dumps, unchanged data."""
    raw = redis.Redis.from_url(url)
    try:
        names = sorted(raw.scan_iter(match=f"{prefix}:{version}:*", count=1_000))
        names.append(KeySpace(prefix).meta(version).encode())
        return {name: raw.dump(name) for name in names}
    finally:
        raw.close()


def new_writing_version(url: str, known: set[str], min_written: int = 1, prefix: str = "recs") -> Callable[[], str]:
    """A condition: the id of a version not in `known` that is `writing` with >= min_written user keys."""
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2)
    keys = KeySpace(prefix)

    def check() -> str | None:
        for version in client.smembers(keys.versions) - known:
            meta = client.hgetall(keys.meta(version))
            if meta.get("status") == "writing" and int(meta.get("written_users", 0)) >= min_written:
                return version
        return None

    return check


def when(condition: Callable[[], object], action: Callable[[object], None], timeout: float) -> threading.Thread:
    """Start a thread that runs `action(value)` as soon as `condition()` returns a value (polling, bounded)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = condition()
            except redis.RedisError:
                value = None
            if value:
                outcome["value"] = value
                action(value)
                return
            time.sleep(0.005)
        outcome["timeout"] = True

    thread = threading.Thread(target=run, daemon=True)
    thread.outcome = outcome  # read by the test after join()
    thread.start()
    return thread


def task_run_counts(flow_run_id) -> dict[str, int]:
    """How many times each task run of the flow run was attempted, by task run name (Prefect's API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.run_count for run in runs}


def task_attempts(flow_run_id, task_name: str) -> list[int]:
    """How many times each run of task `task_name` in the flow run was attempted."""
    return [count for name, count in task_run_counts(flow_run_id).items() if name.startswith(f"{task_name}-")]


class RetryScheduled(logging.Handler):
    """Prefect's "Retry n/m will start" log line, as an event: `scheduled` is set at the first one,
    `task_runs` names every task run that logged one."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.scheduled = threading.Event()
        self.task_runs: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if " - Retry " in record.getMessage():
            self.task_runs.append(getattr(record, "task_run_name", "?"))
            self.scheduled.set()


@contextmanager
def watching_retries() -> Iterator[RetryScheduled]:
    """Collect the task retries Prefect schedules in this process while the block runs."""
    handler, logger = RetryScheduled(), logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
