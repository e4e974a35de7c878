"""What every flow run does around its body: the project's log lines in the run's logs, and
expected failures (bad input, validation, nothing to serve) as a failed state with one line."""

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler
from prefect.states import Failed

from recsys.errors import ExpectedError

PROJECT_LOGGERS = ("recsys", "features", "ranking", "training", "inference", "flows", "deployments")
log = logging.getLogger(__name__)


class _DropExpectedTracebacks(logging.Filter):
    """Prefect logs a failed task's traceback; for an expected failure its message says all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ExpectedError):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _project_logs_to_run() -> Iterator[None]:
    """The project's INFO lines reach Prefect's run-log (API) handler while the body runs.

    Served flow runs are fresh processes whose root logger is at WARNING, and only loggers
    named in PREFECT_LOGGING_EXTRA_LOGGERS (set by the `recsys` command) get Prefect's API
    handler; other entry points (`python -m deployments.serve`, a worker) do not set it.
    The handler is removed afterwards: outside a run it has no run to send lines to.
    """
    api_handlers = [h for h in logging.getLogger("prefect.extra").handlers if isinstance(h, APILogHandler)]
    added: list[tuple[logging.Logger, logging.Handler]] = []
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        added += [(logger, h) for h in api_handlers if h not in logger.handlers]
    for logger, handler in added:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)


def run_body(body: Callable) -> Callable:
    """Decorate a flow's function (under `@flow`): logs and failures as described above."""

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        tracebacks = logging.getLogger("prefect.task_runs")
        if not any(isinstance(f, _DropExpectedTracebacks) for f in tracebacks.filters):
            tracebacks.addFilter(_DropExpectedTracebacks())
        with _project_logs_to_run():
            try:
                return body(*args, **kwargs)
            except ExpectedError as error:
                message = f"{type(error).__name__}: {' '.join(str(error).split())}"
                log.error(message)
                return Failed(message=message, data=error)

    return wrapper
