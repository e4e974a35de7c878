"""The one marker for failures that are about the data or the request, not the code."""


class ExpectedError(Exception):
    """A failure a user can act on (bad input, failed validation, nothing to serve yet, a stale run).

    The flows end with a failed state carrying its one-line message instead of a traceback,
    and the CLI prints that line. Pipeline errors inherit from it next to their usual base
    (`class RawDataError(ExpectedError, ValueError)`).
    """
