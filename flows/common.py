"""What the three flows share: the weekly clock from the schedule, run names, task options and retry rules."""

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

import redis
import sqlalchemy as sa
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from recsys.clock import parse_as_of, week_floor
from recsys.settings import Settings

log = logging.getLogger(__name__)

# Tasks pass frames and clients, which cannot be hashed into cache keys; nothing is cached.
PURE = {"cache_policy": NO_CACHE}
# Retries with backoff on I/O only; validation failures and bad input are never retried.
IO = {"cache_policy": NO_CACHE, "retries": 3, "retry_delay_seconds": [1, 10, 60]}

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, sa.exc.OperationalError, ConnectionError, TimeoutError)


def is_transient(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is a lost or timed-out connection worth retrying."""
    while error is not None:
        if isinstance(error, _TRANSIENT) and not isinstance(error, redis.AuthenticationError):
            return True
        error = error.__cause__
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: a tampered model, bad input or a lost compare-and-set fails at once."""
    return is_transient(state.result(raise_on_failure=False))


# Retries (with backoff) only when a connection was lost; every other failure is final.
TRANSIENT_IO = IO | {"retry_condition_fn": retry_if_transient}


def resolve_as_of(as_of: date | str | None) -> date:
    """The run's `as_of`: the parameter, or the Monday of the scheduled start time."""
    if as_of is not None:
        return parse_as_of(as_of)
    scheduled = flow_run.scheduled_start_time
    return week_floor(datetime.fromisoformat(str(scheduled)) if scheduled else datetime.now(UTC))


def run_name(prefix: str) -> Callable[[], str]:
    """A flow_run_name callable: `<prefix>-<as_of>`, e.g. `features-2026-11-23`."""

    def name() -> str:
        try:
            return f"{prefix}-{resolve_as_of(flow_run.parameters.get('as_of'))}"
        except ValueError:
            return f"{prefix}-invalid-as-of"

    return name


def current_run_id() -> str | None:
    """The Prefect flow run id, recorded as lineage in every store write."""
    return str(flow_run.id) if flow_run.id else None


@contextmanager
def partition_runner(settings: Settings) -> Iterator[TaskRunner]:
    """Where the partition tasks (inference scoring, feature partitions) run, chosen when the flow runs
    (so served deployments follow the settings).

    A Dask task runner on `settings.dask_address` if set; else a thread pool running at
    most `settings.partition_workers` partitions at once (default: one per CPU), since
    each running partition holds its share of the data in memory.
    """
    if settings.dask_address:
        from prefect_dask import DaskTaskRunner

        log.info("running partitions on the Dask cluster at %s", settings.dask_address)
        with DaskTaskRunner(address=settings.dask_address) as runner:
            yield runner
        return
    workers = settings.partition_workers or os.cpu_count() or 1
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        yield runner
