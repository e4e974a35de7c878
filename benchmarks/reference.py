"""A fixed reference workload and the load average, so benchmark numbers compare across days and machines.

The same code ran 2.5–3.5× slower on a busy day than on a quiet one. Every benchmark run
therefore also times, in its own process, a workload that never changes: LightGBM
prediction with a fixed synthetic model on fixed data (one thread, as each scoring
partition predicts) and a fixed polars group-by and join (polars' own thread pool, as the
feature flow runs). A stage's seconds divided by the reference's seconds ("× ref") is
what the machine's speed and load at that moment do not change much; the load average
sampled during the run says how busy the machine was.
"""

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the harness's pure parts load without them
    import lightgbm as lgb
    import numpy as np
    import polars as pl

SEED = 20261127
FEATURES = 40
PREDICT_ROWS = 100_000
TREES = 150
LEAVES = 7
GROUPBY_ROWS = 1_000_000
REPEATS = 3


@dataclass(frozen=True)
class ReferenceWorkload:
    """The fixed inputs: a model and its rows, and a table to group. Built once per process (not timed)."""

    booster: "lgb.Booster"
    rows: "np.ndarray"
    table: "pl.DataFrame"


def build_reference() -> ReferenceWorkload:
    """The same model, rows and table on every run: fixed seed, one thread, deterministic LightGBM."""
    import lightgbm as lgb
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(20_000, FEATURES))
    y = x[:, :5] @ np.arange(1, 6) + rng.normal(size=20_000)
    params = {
        "objective": "regression", "num_leaves": LEAVES, "learning_rate": 0.05, "num_threads": 1,
        "deterministic": True, "force_row_wise": True, "seed": SEED, "verbose": -1,
    }  # fmt: skip
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=TREES)
    table = pl.DataFrame(
        {
            "user_id": rng.integers(0, 100_000, GROUPBY_ROWS),
            "item_id": rng.integers(0, 20_000, GROUPBY_ROWS),
            "weight": rng.random(GROUPBY_ROWS),
        }
    )
    return ReferenceWorkload(booster, rng.normal(size=(PREDICT_ROWS, FEATURES)), table)


def predict_once(work: ReferenceWorkload) -> float:
    """Seconds of one LightGBM prediction of the fixed rows (one thread)."""
    started = time.perf_counter()
    work.booster.predict(work.rows, num_threads=1)
    return time.perf_counter() - started


def group_once(work: ReferenceWorkload) -> float:
    """Seconds of one polars group-by per (user, item) and per user, joined back (polars' thread pool)."""
    import polars as pl

    started = time.perf_counter()
    pairs = work.table.group_by("user_id", "item_id").agg(pl.col("weight").sum(), pl.len().alias("events"))
    users = pairs.group_by("user_id").agg(pl.col("events").sum().alias("user_events"), pl.len().alias("items"))
    pairs.join(users, on="user_id").sort("user_id", "item_id")
    return time.perf_counter() - started


def time_reference(work: ReferenceWorkload | None = None, repeats: int = REPEATS) -> dict[str, float]:
    """The median of `repeats` timings of each part, and their sum `reference_s` (the unit of "× ref");
    `cpu_s`, the process's CPU seconds per repeat, hardly moves with the load: `reference_s` / `cpu_s`
    grows as other work takes the cores."""
    work = work or build_reference()
    cpu = time.process_time()
    predict = statistics.median(predict_once(work) for _ in range(repeats))
    group = statistics.median(group_once(work) for _ in range(repeats))
    cpu_s = (time.process_time() - cpu) / repeats
    return {"predict_s": predict, "groupby_s": group, "reference_s": predict + group, "cpu_s": cpu_s}


def combine_references(timings: list[dict[str, float]]) -> dict[str, float]:
    """Several timings of the reference in one run (e.g. before and after the job): their mean,
    with the spread of `reference_s` (max / min) to show how much the load moved during the run."""
    if not timings:
        raise ValueError("combine_references: no reference timing to combine")
    keys = [k for k in ("predict_s", "groupby_s", "reference_s", "cpu_s") if all(k in t for t in timings)]
    combined = {key: statistics.fmean(t[key] for t in timings) for key in keys}
    totals = [t["reference_s"] for t in timings]
    return combined | {"spread": max(totals) / min(totals), "timings": len(timings)}


def relative(seconds: float, reference_s: float) -> float:
    """`seconds` in units of the reference workload's time ("× ref")."""
    if reference_s <= 0:
        raise ValueError(f"relative: the reference time must be positive, got {reference_s}")
    return seconds / reference_s


class LoadSampler:
    """Samples the 1-minute load average in the background while a run goes on.

    `read` returns the load averages (os.getloadavg by default); the first sample is taken
    on entry and the last on exit, so even a short run has two.
    """

    def __init__(self, every: float = 5.0, read: Callable[[], tuple[float, float, float]] = os.getloadavg) -> None:
        self.samples: list[tuple[float, float]] = []
        self._every, self._read = every, read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.samples.append((time.time(), self._read()[0]))

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> "LoadSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, float]:
        return summarise_load(self.samples)


def summarise_load(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Min, mean and max of the 1-minute load average over (time, load) samples."""
    if not samples:
        return {"min": None, "mean": None, "max": None, "samples": 0}
    loads = [load for _, load in samples]
    return {"min": min(loads), "mean": statistics.fmean(loads), "max": max(loads), "samples": len(loads)}


def describe_load(load: dict) -> str:
    """`1.2 (0.8–1.9)`: mean and range of the load average during a run."""
    if not load or load.get("mean") is None:
        return "?"
    return f"{load['mean']:.1f} ({load['min']:.1f}–{load['max']:.1f})"


class ReferenceRun:
    """Times the reference workload on entry and on exit and samples the load average in between:
    wrap a benchmark's measurements in it, then read `result()` (reference and load) after the block."""

    def __init__(self, repeats: int = REPEATS, work: ReferenceWorkload | None = None) -> None:
        self._repeats = repeats
        self._work = work
        self._timings: list[dict[str, float]] = []
        self._load = LoadSampler()

    def __enter__(self) -> "ReferenceRun":
        self._work = self._work or build_reference()
        self._timings.append(time_reference(self._work, self._repeats))
        self._load.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._load.__exit__(*exc)
        self._timings.append(time_reference(self._work, self._repeats))

    def result(self) -> dict:
        return {"reference": combine_references(self._timings), "load": self._load.summary()}


def reference_line(run: dict, stages: dict[str, float]) -> str:
    """One line for a benchmark's table: the reference, the load, and each named stage in × ref."""
    ref = run["reference"]["reference_s"]
    parts = ", ".join(f"{name} {relative(seconds, ref):.2f}" for name, seconds in stages.items())
    return (
        f"Reference workload {ref:.2f} s (after / before {run['reference']['spread']:.2f}); load average "
        f"during the run {describe_load(run['load'])}; in × ref: {parts}."
    )
