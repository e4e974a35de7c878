"""Scoring and holdout evaluation profiled step by step, on a synthetic world held in memory.

    python -m benchmarks.scoring_bench                      # medium: 100k users, 20k items, 10M events
    python -m benchmarks.scoring_bench --profile-users 20000 --world /tmp/bench/world-medium

Builds (or loads from `--world`, where it is kept for the next run) a feature snapshot and
the labels of the week after it, computed as the feature flow computes them, and a ranker
trained on a sample of that week's users as the training flow trains (default parameters).
Then, in this process and without Postgres:

- scoring: `inference.scoring.recommend_users` batch by batch (5,000 users, as a partition
  does) with its steps timed (candidate generation, feature joins, predict, top-N, lists),
  then the lists serialised and written to an embedded Redis with the flow's writer
  (`inference.publish.write_recommendations`). Users/s on one thread, and on 2 threads each
  scoring a hash partition (as the flow's partitions run);
- evaluation: `training.evaluation.evaluate_week` of the same model on the holdout week,
  with its steps timed (ranking frame, model top-k, baselines, metrics).

The reference workload (`benchmarks.reference`) is timed before and after, and the load
average sampled throughout; every number is given in seconds and relative to it.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import polars as pl

from benchmarks import cpu_model, save_result
from benchmarks.reference import LoadSampler, build_reference, combine_references, relative, time_reference
from features import contracts
from features.synthetic import generate_log
from features.transform import build_feature_tables, build_labels, week_start
from flows import configs
from inference import publish, scoring
from ranking.candidates import (
    SnapshotTables,
    build_ranking_frame,
    candidate_rows,
    category_encoding,
    generate_candidates,
)
from ranking.scoring import TIE_BREAK, compile_booster, score, top_n, user_batches
from recsys.settings import Settings
from training import evaluation
from training.frames import labelled_frame, labelled_users
from training.ranker import train_ranker

log = logging.getLogger("benchmarks.scoring_bench")

AS_OF = date(2026, 11, 23)  # the holdout week starts here; the snapshot is the Monday before
SCORING_STEPS = ("compile", "frame", "predict", "top_n", "lists", "publish")
# "fit baselines": EASE's and ALS's lists taken from the snapshot's collaborative_scores (fitted only when the
# table cannot serve them): evaluate_week's time outside its steps.
EVALUATION_STEPS = ("compile", "fit baselines", "frame", "predict", "top_n", "baselines", "recall", "metrics")
PREFIX = "bench-scoring"


# --- the world: a snapshot, its holdout labels, a trained model ---


def build_world(args: argparse.Namespace, settings: Settings) -> dict:
    """Snapshot tables, holdout labels and a model text, as the flows would compute them."""
    snapshot = AS_OF - timedelta(days=7)
    started = time.perf_counter()
    raw = generate_log(
        n_users=args.users, n_items=args.items, n_events=args.events, n_weeks=args.weeks,
        end=week_start(AS_OF + timedelta(days=7)), seed=args.seed,
    )  # fmt: skip
    log.info("generated %d events in %.1fs", raw.events.height, time.perf_counter() - started)
    frames = build_feature_tables(raw.events, raw.items, snapshot, **configs.feature_options(settings))
    training_labels = build_labels(raw.events, snapshot - timedelta(days=7))
    training_frames = build_feature_tables(
        raw.events, raw.items, snapshot - timedelta(days=7), **configs.feature_options(settings)
    )
    holdout = build_labels(raw.events, snapshot)
    del raw
    log.info("snapshots and labels in %.1fs", time.perf_counter() - started)
    tables = SnapshotTables.from_frames(training_frames)
    categories = category_encoding(tables.item_features)
    sampling = configs.sampling_options(settings) | {"max_users": args.train_users}
    frame = labelled_frame(
        tables, training_labels, snapshot - timedelta(days=7), configs.candidate_config(settings), categories,
        **sampling,
    )  # fmt: skip
    is_valid = pl.col("user_id").hash(settings.seed) % 5 == 0
    model = train_ranker(frame.filter(~is_valid), frame.filter(is_valid), configs.ranker_params(settings))
    log.info("trained %d trees in %.1fs", model.best_iteration, time.perf_counter() - started)
    return {
        "frames": frames, "labels": holdout, "model_text": model.model_text, "features": model.feature_names,
        "events": args.events,
    }  # fmt: skip


def save_world(world: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in world["frames"].items():
        frame.write_parquet(folder / f"{name}.parquet")
    world["labels"].write_parquet(folder / "labels.parquet")
    model = {"text": world["model_text"], "features": world["features"], "events": world["events"]}
    (folder / "model.json").write_text(json.dumps(model))


def load_world(folder: Path) -> dict:
    model = json.loads((folder / "model.json").read_text())
    frames = {c.name: pl.read_parquet(folder / f"{c.name}.parquet") for c in contracts.FEATURE_TABLES}
    labels = pl.read_parquet(folder / "labels.parquet")
    return {
        "frames": frames, "labels": labels, "model_text": model["text"], "features": model["features"],
        "events": model.get("events"),
    }  # fmt: skip


# --- the measurements ---


def profile_scoring(
    world: dict, users: list[int], settings: Settings, client, version: str, compiled: bool = True
) -> dict:
    """`recommend_users` batch by batch with its steps timed, then each batch published; seconds per step.
    The model is compiled as `score_partition` compiles it (once per process), unless `compiled` is False."""
    tables = SnapshotTables.from_frames(world["frames"])
    booster = lgb.Booster(model_str=world["model_text"])
    categories = category_encoding(tables.item_features)
    config, n = configs.candidate_config(settings), settings.top_n
    steps = dict.fromkeys(SCORING_STEPS, 0.0)
    if compiled:
        started = time.perf_counter()
        booster = compile_booster(booster, rows=candidate_rows(len(users), config))
        steps["compile"] = time.perf_counter() - started
    candidates_s, lists = 0.0, 0
    for batch in user_batches(users, settings.score_batch_users):
        batch_tables = restrict(tables, batch)
        ids = pl.Series("user_id", batch, pl.Int64)
        recs = scoring.recommend_users(
            booster, world["features"], categories, batch_tables, ids, config, n, steps=steps
        )
        if not lists:  # the first batch: top-N as it was (every row sorted) against today's, same frame
            before_after = compare_top_n(booster, world["features"], categories, batch_tables, ids, config, n)
        started = time.perf_counter()
        lists += publish.write_recommendations(client, PREFIX, version, recs, chunk=settings.publish_chunk)
        steps["publish"] += time.perf_counter() - started
        # Candidate generation alone, once more (outside the total): the frame's split into
        # candidates and feature joins, whatever build_ranking_frame composes.
        started = time.perf_counter()
        generate_candidates(batch_tables, ids, config)
        candidates_s += time.perf_counter() - started
    total = sum(steps.values())
    rate = len(users) / total if total else 0.0
    return {"users": len(users), "lists": lists, "steps": steps, "seconds": total, "users_per_s": rate,
            "candidates_s": candidates_s, "top_n_first_batch": before_after}  # fmt: skip


def compare_top_n(booster, feature_names, categories, tables, ids, config, n) -> dict:
    """Seconds of top-N on one batch's scored frame: every row and column sorted (before issue #16) and
    `ranking.scoring.top_n` (today); and whether both give the same rows."""
    scored = score(booster, build_ranking_frame(tables, ids, config, categories), feature_names)
    tie_breaks = [c for c in (TIE_BREAK, "item_id") if c in scored.columns]
    started = time.perf_counter()
    before = (
        scored.sort(["user_id", "score", *tie_breaks], descending=[False, True, *[False] * len(tie_breaks)])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
        .filter(pl.col("rank") <= n)
        .select("user_id", "item_id", "rank")
    )
    before_s = time.perf_counter() - started
    started = time.perf_counter()
    after = top_n(scored, n)
    after_s = time.perf_counter() - started
    return {"rows": scored.height, "full_sort_s": before_s, "top_n_s": after_s, "same": before.equals(after)}


def restrict(tables: SnapshotTables, users: list[int]) -> SnapshotTables:
    """The user tables of `users` only, as a partition reads them (`store.read_table(user_ids=...)`)."""
    ids = pl.DataFrame({"user_id": users}, schema={"user_id": pl.Int64})
    frames = {
        name: (frame.join(ids, on="user_id", how="semi") if "user_id" in frame.columns else frame)
        for name, frame in vars(tables).items()
    }
    return SnapshotTables(**frames)


def score_in_threads(
    world: dict, users: list[int], settings: Settings, client, version: str, threads: int, compiled: bool = True
) -> dict:
    """Users/s with `threads` hash partitions scored and published at once (the flow's thread pool)."""
    parts = [users[i::threads] for i in range(threads)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(lambda part: profile_scoring(world, part, settings, client, version, compiled), parts))
    seconds = time.perf_counter() - started
    return {"threads": threads, "users": len(users), "seconds": seconds, "users_per_s": len(users) / seconds,
            "steps": {s: sum(d["steps"][s] for d in done) for s in SCORING_STEPS}}  # fmt: skip


def profile_evaluation(world: dict, settings: Settings, max_users: int | None, compiled: bool = True) -> dict:
    """`evaluate_week` of the model on the holdout week, its steps timed; seconds per step."""
    tables = SnapshotTables.from_frames(world["frames"])
    labels = world["labels"]
    if max_users is not None:
        keep = labelled_users(labels, tables).head(max_users)
        labels = labels.join(keep.to_frame(), on="user_id", how="semi")
    steps = dict.fromkeys(EVALUATION_STEPS, 0.0)
    started = time.perf_counter()
    booster = lgb.Booster(model_str=world["model_text"])
    if compiled:  # as `evaluate_model` does
        rows = candidate_rows(labels.get_column("user_id").n_unique(), configs.candidate_config(settings))
        booster = compile_booster(booster, rows=rows)
    steps["compile"] = time.perf_counter() - started
    model = evaluation.ScoringModel(booster, world["features"], category_encoding(tables.item_features))
    started = time.perf_counter()
    result = evaluation.evaluate_week(
        model, tables, labels, configs.candidate_config(settings), 10, batch_users=settings.score_batch_users,
        collaborative=configs.collaborative_config(settings), steps=steps,
    )  # fmt: skip
    steps["fit baselines"] = time.perf_counter() - started - sum(v for k, v in steps.items() if k != "compile")
    users = int(result.metrics["model"]["users"])
    total = sum(steps.values())
    return {"users": users, "steps": steps, "seconds": total, "users_per_s": users / total,
            "ndcg@10": result.metrics["model"]["ndcg@10"]}  # fmt: skip


# --- report ---


def step_table(title: str, steps: dict[str, float], users: int, reference_s: float) -> list[str]:
    total = sum(steps.values())
    lines = [f"| {title} step | s | share | × ref | users/s |", "|---|---|---|---|---|"]
    for step, seconds in steps.items():
        rate = f"{users / seconds:,.0f}" if seconds else "–"
        lines.append(
            f"| {step} | {seconds:.2f} | {seconds / total:.0%} | {relative(seconds, reference_s):.2f} | {rate} |"
        )
    lines.append(f"| **total** | {total:.2f} | 100% | {relative(total, reference_s):.2f} | {users / total:,.0f} |")
    return lines


def render(result: dict) -> str:
    ref = result["reference"]["reference_s"]
    load = result["load"]
    lines = [
        f"Scoring profile: {result['world']}; {result['trees']} trees, {result['predictor']}; "
        f"machine {result['machine']}; "
        f"load average during the run {load['mean']:.1f} ({load['min']:.1f}–{load['max']:.1f}); "
        f"reference {ref:.2f} s (after/before {result['reference']['spread']:.2f}).",
        "",
        *step_table("scoring (1 thread)", result["scoring"]["steps"], result["scoring"]["users"], ref),
        "",
        f"Of the frame: candidate generation {result['scoring']['candidates_s']:.2f} s (timed apart), "
        f"feature joins the rest. Scored and published on 1 thread: {result['scoring']['users_per_s']:,.0f} users/s "
        f"= {result['scoring']['users_per_s'] * ref:,.0f} users per reference-second.",
    ]
    first = result["scoring"]["top_n_first_batch"]
    lines.append(
        f"Top-N of the first batch ({first['rows']:,} candidate rows): every row sorted (before) "
        f"{first['full_sort_s']:.2f} s, `top_n` now {first['top_n_s']:.2f} s; same rows: {first['same']}."
    )
    threads = result.get("threads")
    if threads:
        lines += [
            f"On {threads['threads']} threads (hash partitions, as the flow): {threads['users_per_s']:,.0f} users/s "
            f"= {threads['users_per_s'] * ref:,.0f} users per reference-second ({threads['users']:,} users).",
        ]
    evaluation_result = result.get("evaluation")
    if evaluation_result:
        lines += [
            "",
            *step_table("evaluation", evaluation_result["steps"], evaluation_result["users"], ref),
            "",
            f"Holdout evaluation: {evaluation_result['users_per_s']:,.0f} users/s "
            f"(model NDCG@10 {evaluation_result['ndcg@10']:.4f} on {evaluation_result['users']:,} users).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoring_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--weeks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-users", type=int, default=10_000, help="labelled users the model trains on")
    parser.add_argument("--profile-users", type=int, default=20_000, help="users scored (a hash-spread sample)")
    parser.add_argument("--eval-users", type=int, default=10_000, help="holdout users evaluated (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the partitioned run (0: skip)")
    parser.add_argument("--world", type=Path, help="folder keeping the world between runs")
    parser.add_argument(
        "--lightgbm", action="store_true", help="score with LightGBM itself, not the compiled model (as before)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("inference").setLevel(logging.WARNING)

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="scoring-bench-")))
    world_dir = args.world
    if world_dir and (world_dir / "model.json").exists():
        world = load_world(world_dir)
    else:
        world = build_world(args, settings)
        if world_dir:
            save_world(world, world_dir)
    reference = build_reference()
    from recsys.stores import open_stores

    with open_stores(settings) as stores, LoadSampler() as load:
        timings = [time_reference(reference)]
        all_users = world["frames"][contracts.USER_FEATURES.name]["user_id"]
        sample = scoring.partition_users(all_users, max(1, all_users.len() // args.profile_users))[0]
        version = publish.begin_publication(stores.redis, PREFIX, AS_OF)
        compiled = not args.lightgbm
        result = {"scoring": profile_scoring(world, sample, settings, stores.redis, version, compiled)}
        if args.threads:
            result["threads"] = score_in_threads(world, sample, settings, stores.redis, version, args.threads, compiled)
        if args.eval_users:
            result["evaluation"] = profile_evaluation(world, settings, args.eval_users, compiled)
        timings.append(time_reference(reference))
    booster = lgb.Booster(model_str=world["model_text"])
    result |= {
        "world": f"{all_users.len():,} users, {world['frames'][contracts.ITEM_FEATURES.name].height:,} items, "
        f"{world['events'] or 0:,} events",
        "trees": booster.num_trees(),
        "predictor": "LightGBM" if args.lightgbm else "compiled (lleaves) when it compiles, else LightGBM",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "reference": combine_references(timings),
        "load": load.summary(),
        "measured_at": f"{datetime.now():%Y-%m-%d %H:%M}",
        "command": "python -m benchmarks.scoring_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = render(result)
    print(table)
    print(f"written: {save_result('scoring_bench', result, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
