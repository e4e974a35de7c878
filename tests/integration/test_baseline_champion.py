"""Until a model has won the gate, the best baseline is served as champion: recorded in the
registry, in the publication's lineage and in what clients read; inference never fails for
lack of a trained model, and a fresh deployment's first scheduled runs publish."""

import contextlib
import io
import json
from datetime import date, timedelta

import polars as pl
import pytest

from benchmarks.inference_bench import compute_snapshot, store_snapshot, train_quick_model
from cli import main as cli
from features import collaborative
from features.collaborative import CollaborativeConfig
from features.synthetic import generate_log
from features.transform import week_start
from flows.feature_flow import feature_flow
from flows.inference_flow import inference_flow
from flows.training_flow import training_flow
from inference import publications, scoring, serving
from ranking import registry
from ranking.baselines import fit_collaborative
from ranking.candidates import CandidateConfig, SnapshotTables
from recsys.clock import mondays
from recsys.settings import Settings
from recsys.stores import open_stores
from tests.conftest import SMALL_JOB
from tests.evidence import evidence
from training import store as training_store
from training.gate import PooledEvaluation
from training.plan import WeekPlan

pytestmark = pytest.mark.integration

AS_OF = date(2026, 11, 23)
EARLIER = AS_OF - timedelta(weeks=1)


@pytest.fixture(scope="module")
def snapshots() -> dict[date, dict[str, pl.DataFrame]]:
    raw = generate_log(
        n_users=int(SMALL_JOB["RECSYS_SYNTHETIC_USERS"]),
        n_items=int(SMALL_JOB["RECSYS_SYNTHETIC_ITEMS"]),
        n_events=int(SMALL_JOB["RECSYS_SYNTHETIC_EVENTS"]),
        n_weeks=int(SMALL_JOB["RECSYS_SYNTHETIC_WEEKS"]),
        end=week_start(AS_OF),
        seed=42,
    )
    return {week: compute_snapshot(raw, week, Settings()) for week in (EARLIER, AS_OF)}


@pytest.fixture
def stored(flow_env: Settings, snapshots) -> Settings:
    """Empty stores holding both snapshots, no registry; RECSYS_* env pointing flows at them."""
    with open_stores(flow_env) as stores:
        for week, frames in snapshots.items():
            store_snapshot(stores.engine, week, frames)
    return flow_env


def published(settings: Settings, result: dict, frames: dict[str, pl.DataFrame]) -> tuple[dict, dict]:
    """(every snapshot user's list as clients read it, the publication's metadata hash)."""
    users = frames["user_features"]["user_id"].to_list()
    with open_stores(settings) as stores:
        lists = {rec.user_id: rec for rec in serving.get_recommendations(stores.redis, settings.redis_prefix, users)}
        meta = stores.redis.hgetall(serving.KeySpace(settings.redis_prefix).meta(result["version"]))
    return lists, meta


def expected_lists(baseline: str, frames: dict[str, pl.DataFrame], n: int) -> dict[int, list[int]]:
    users = frames["user_features"]["user_id"]
    tables = SnapshotTables.from_frames(frames)
    fitted = fit_collaborative(tables.user_item_history, CollaborativeConfig())
    recs = scoring.recommend_baseline(baseline, tables, users, CandidateConfig(), n, fitted)
    return dict(zip(recs["user_id"].to_list(), recs["items"].to_list(), strict=True))


def evaluation(model: float) -> PooledEvaluation:
    """Gate evidence where item_knn is the best baseline and the model's NDCG is about `model`."""
    return evidence(500, {"model": model, "recent_popular": 0.08, "all_time_popular": 0.05, "item_knn": 0.10})


def test_inference_without_any_registry_publishes_recent_popularity(stored: Settings, snapshots):
    result = inference_flow(as_of=AS_OF)

    lists, meta = published(stored, result, snapshots[AS_OF])
    personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
    assert personal == expected_lists("recent_popular", snapshots[AS_OF], stored.top_n)
    assert len(lists) == snapshots[AS_OF]["user_features"].height  # every user reads a list
    assert meta["model_version"] == "baseline:recent_popular (no champion yet)"
    with open_stores(stored) as stores:
        (row,) = publications.list_publications(stores.engine).iter_rows(named=True)
        assert registry.get_champion(stores.engine, stored.model_name) is None  # nothing written to the registry
    assert (row["model_name"], row["model_version"], row["model_kind"]) == ("baseline:recent_popular", None, "baseline")


def test_a_losing_model_leaves_the_best_baseline_as_champion_until_a_model_wins(stored: Settings, snapshots):
    model, categories = train_quick_model(snapshots[EARLIER], EARLIER, stored, trees=5)
    plan = WeekPlan(as_of=AS_OF, train=[EARLIER], validation=[EARLIER], holdout=EARLIER)
    gate = {"categories": categories, "config": CandidateConfig(), "k": 10, "margin": 0.0, "flow_run_id": None,
            "refit": plan, "recipe": "test recipe"}  # fmt: skip
    with open_stores(stored) as stores:
        registry.ensure_schema(stores.engine)
        version, decision, live = training_store.register_and_gate(
            stores.engine, stored.model_name, model, [plan], evaluation(0.09), **gate
        )
        rejected = registry.get_model(stores.engine, stored.model_name, version)
        changes = registry.history(stores.engine, stored.model_name)

    assert rejected.status == "rejected" and rejected.kind == "ranker"
    assert (live.version, live.kind, live.params["baseline"], live.status) == (
        version + 1,
        "baseline",
        "item_knn",
        "champion",
    )
    assert decision.serve_baseline == "item_knn"
    assert decision.reason.startswith("no model has won the gate yet: serving the best baseline item_knn")
    assert changes["reason"].to_list() == [decision.reason]

    result = inference_flow(as_of=AS_OF)

    lists, meta = published(stored, result, snapshots[AS_OF])
    personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
    assert personal == expected_lists("item_knn", snapshots[AS_OF], stored.top_n)
    assert len(lists) == snapshots[AS_OF]["user_features"].height
    assert meta["model_version"] == f"{stored.model_name}:{live.version} (baseline item_knn)"
    user = next(iter(personal))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["recs", str(user), "--json"]) == 0
    assert json.loads(out.getvalue())["model_version"] == meta["model_version"]
    with open_stores(stored) as stores:
        (row,) = publications.list_publications(stores.engine).iter_rows(named=True)
    assert (row["model_version"], row["model_kind"]) == (live.version, "baseline")

    with open_stores(stored) as stores:
        won, decision, live = training_store.register_and_gate(
            stores.engine, stored.model_name, model, [plan], evaluation(0.2), **gate
        )
        retired = registry.get_model(stores.engine, stored.model_name, version + 1)
    assert decision.promote and (live.version, live.kind) == (won, "ranker") and retired.status == "retired"


def spy(monkeypatch, module, name: str) -> list[str]:
    """Record every call of `module.name` (which still runs); the list of calls."""
    calls, original = [], getattr(module, name)

    def recording(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.mark.parametrize("baseline", ["ease", "als"])
def test_a_collaborative_baseline_champion_is_served_from_the_snapshots_lists_and_fitted_once_when_they_fall_short(
    stored: Settings, snapshots, baseline: str, monkeypatch
):
    with open_stores(stored) as stores:
        registry.ensure_schema(stores.engine)
        registry.register_model(
            stores.engine, name=stored.model_name, kind="baseline", model_text="", feature_names=[], encodings={},
            params={"baseline": baseline}, metrics={}, training_as_ofs=[], as_of=AS_OF, validation_as_of=None,
            holdout_as_of=None, feature_snapshots={}, promote_reason=f"{baseline} won the gate", actor="test",
        )  # fmt: skip
    fits = spy(monkeypatch, collaborative, f"fit_{baseline}")
    partitions = spy(monkeypatch, scoring, "score_partition")
    monkeypatch.setenv("RECSYS_PUBLISH_HOLD_UNCHANGED", "false")
    # collaborative_scores keeps 100 items per user (RECSYS_COLLABORATIVE_ITEMS_PER_USER): it serves 20, unfitted,
    # the same lists as the model fitted on the snapshot's history.
    result = inference_flow(as_of=AS_OF)
    assert (fits, len(partitions)) == ([], stored.partitions) and stored.partitions > 1
    lists, meta = published(stored, result, snapshots[AS_OF])
    personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
    assert personal == expected_lists(baseline, snapshots[AS_OF], stored.top_n)
    assert personal != expected_lists("recent_popular", snapshots[AS_OF], stored.top_n)
    assert meta["model_version"].endswith(f"(baseline {baseline})")

    # 101 items per user: more than the table keeps, so the model is fitted, once for every partition.
    monkeypatch.setenv("RECSYS_TOP_N", "101")
    fits.clear()  # expected_lists fitted it too
    result = inference_flow(as_of=AS_OF)
    assert fits == [f"fit_{baseline}"] and len(partitions) == 2 * stored.partitions
    lists, _ = published(stored, result, snapshots[AS_OF])
    personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
    assert personal == expected_lists(baseline, snapshots[AS_OF], 101)

    if baseline == "ease":  # a catalogue above RECSYS_EASE_MAX_ITEMS: never fitted, popularity serves instead
        monkeypatch.setenv("RECSYS_EASE_MAX_ITEMS", "10")
        fits.clear()
        result = inference_flow(as_of=AS_OF)
        assert fits == []
        lists, _ = published(stored, result, snapshots[AS_OF])
        personal = {user: rec.items for user, rec in lists.items() if not rec.is_fallback}
        assert personal == expected_lists("recent_popular", snapshots[AS_OF], 101)


def test_a_fresh_deployment_publishes_from_its_first_scheduled_runs(flow_env: Settings, monkeypatch):
    # Seven weeks of history wanted (4 training weeks, a validation week, 2 gate weeks), six weeks of log:
    # the oldest wanted weeks see no event and are skipped.
    monkeypatch.setenv("RECSYS_TRAINING_WEEKS", "4")
    monkeypatch.setenv("RECSYS_SYNTHETIC_WEEKS", "6")

    written = feature_flow(as_of=AS_OF, source="synthetic", backfill_history=True)
    trained = training_flow(as_of=AS_OF)
    result = inference_flow(as_of=AS_OF)

    assert sorted(written) == [str(w) for w in mondays(AS_OF - timedelta(weeks=5), AS_OF)]
    assert trained["holdout"] == str(EARLIER)
    with open_stores(flow_env) as stores:
        live = registry.get_champion(stores.engine, flow_env.model_name)
        meta = stores.redis.hgetall(serving.KeySpace(flow_env.redis_prefix).meta(result["version"]))
    assert live is not None and trained["champion"] == live.label == meta["model_version"]
    assert result["personal"] > 0
