"""What every flow run does around its body: the project's log lines in the run's logs, and
expected failures (bad input, validation, nothing to serve) as a failed state with one line."""

import functools
import logging
from collections.abc import Callable

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


def run_body(body: Callable) -> Callable:
    """Decorate a flow's function (under `@flow`): logs and failures as described above.

    Served flow runs are fresh processes whose root logger is at WARNING: the project's
    loggers are set to INFO so their lines reach Prefect's handlers (added for the loggers
    named in PREFECT_LOGGING_EXTRA_LOGGERS) and so the UI.
    """

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        for name in PROJECT_LOGGERS:
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.INFO)
        tracebacks = logging.getLogger("prefect.task_runs")
        if not any(isinstance(f, _DropExpectedTracebacks) for f in tracebacks.filters):
            tracebacks.addFilter(_DropExpectedTracebacks())
        try:
            return body(*args, **kwargs)
        except ExpectedError as error:
            message = f"{type(error).__name__}: {' '.join(str(error).split())}"
            log.error(message)
            return Failed(message=message, data=error)

    return wrapper
