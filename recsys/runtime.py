"""Process-wide settings the entry points apply before the numeric libraries load, and giving memory back."""

import ctypes
import gc
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def configure_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (LightGBM and implicit use OpenMP).

    GNU OpenMP's default keeps a waiting thread spinning on its core. On a machine whose cores
    are shared with other work (a scheduled run beside the Prefect server, a CI runner) the
    spinning threads take the cores from the ones doing the work: LightGBM with 2 threads took
    88 ms per boosting round instead of 5 ms at load average 5 on 2 cores (15k rows, 40
    features; passive: 4.6 ms). The runtime reads OMP_WAIT_POLICY once, when it loads, so
    entry points call this before importing lightgbm. A value already set wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Below this many rows a step frees little, and a full collection costs 0.3–2 s in a process holding
# Prefect and great-expectations (hundreds of thousands of objects): the suite's small weeks paid minutes.
RELEASE_MIN_ROWS = 1_000_000


def release_freed_memory(step: str, rows: int | None = None) -> None:
    """After `step` (a feature week) that held `rows` table rows (None: unknown, release):
    collect unreachable cycles, then return the pages glibc's malloc holds free to the system
    (`malloc_trim(0)`, where there is glibc) and those Arrow's pool holds (when pyarrow is loaded);
    log the RSS. Skipped below `RELEASE_MIN_ROWS` rows.

    numpy, pandas, great-expectations, implicit's ALS and psycopg allocate through glibc, which keeps
    what they free in per-thread arenas for reuse and gives back only the top of each heap. Polars'
    conversions to pandas (validation) go through pyarrow's own pool (mimalloc), which kept ≈ 0.1 GB
    after a small feature flow until `release_unused`. (polars allocates through its own jemalloc,
    which returns freed pages within about a second.)
    """
    if rows is not None and rows < RELEASE_MIN_ROWS:
        return
    before = resident_bytes()
    collected = gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
    arrow = sys.modules.get("pyarrow")  # not imported here: a process that never loaded it holds nothing there
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    after = resident_bytes()
    if before is not None and after is not None:
        log.info("%s: memory released (%d objects collected): RSS %.2f -> %.2f GB", step, collected,
                 before / 2**30, after / 2**30)  # fmt: skip


def resident_bytes() -> int | None:
    """This process's resident set size (Linux' /proc), None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl)
        return None
