"""Benchmarks: measured numbers for the README, run by hand or `make bench`."""

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

from recsys.runtime import configure_openmp

# Every benchmark runs as `python -m benchmarks.<name>`, which imports this package first:
# the wait policy must be set before a benchmark module imports lightgbm.
configure_openmp()

RESULTS_DIR = Path(__file__).with_name("results")


def save_result(name: str, result: dict, table: str) -> Path:
    """Write `result` and its markdown `table` as `results/<name>-<UTC time>.json`; return the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result | {"table": table}, indent=2, default=str))
    return out


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a result."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
