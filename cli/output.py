"""How the CLI shows things to people: aligned tables, JSON lines for scripts, progress bars."""

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any


def to_json(value: Any) -> str:
    """One compact JSON document; dates and datetimes as ISO strings."""
    return json.dumps(value, default=_jsonable, separators=(",", ":"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_rows(rows: Sequence[dict], columns: Sequence[tuple[str, str]], *, as_json: bool, title: str = "") -> None:
    """Rows as an aligned table (`columns`: key, header), or one JSON object per line."""
    if as_json:
        for row in rows:
            print(to_json(row))
        return
    if not rows:
        print(f"{title + ': ' if title else ''}none")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for key, header in columns:
        numeric = all(isinstance(row.get(key), int | float) or row.get(key) is None for row in rows)
        table.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    # A pipe or a file gets whole lines, not the 80 columns rich assumes without a terminal.
    Console(soft_wrap=False, width=None if sys.stdout.isatty() else 240).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


class ProgressHandler(logging.Handler):
    """Draws a progress bar for log records that carry `extra={"progress": (task, done, total)}`.

    Pipeline code reports progress in its ordinary log lines; only the CLI, on a terminal,
    turns them into bars, so library code never depends on a UI.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self._progress = None
        self._tasks: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        progress = getattr(record, "progress", None)
        if progress is None:
            return
        task, done, total = progress
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                transient=False,
            )  # fmt: skip
            self._progress.start()
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        super().close()


def attach_progress_bars(loggers: Iterable[str]) -> ProgressHandler | None:
    """Progress bars on stderr for the project's loggers, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    handler = ProgressHandler()
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    return handler
