"""`explain` and `recsys explain` on real Postgres and Redis.

The stores get two feature snapshots (EARLIER, AS_OF, each with the labels of its week) and,
where a test needs one, a champion trained on EARLIER, written directly (no flow runs).
"""

import json
from dataclasses import dataclass
from datetime import date, timedelta

import lightgbm as lgb
import polars as pl
import pytest

from benchmarks.inference_bench import compute_snapshot, register_champion, store_snapshot, train_quick_model
from cli import main as cli
from features import store
from features.synthetic import generate_log
from features.transform import week_start
from inference import explain
from ranking import registry
from ranking.candidates import CandidateConfig, SnapshotTables
from ranking.scoring import ScoringModel
from recsys.settings import Settings
from recsys.stores import Stores
from tests.conftest import SMALL_JOB
from tests.helpers import publish_recommendations
from training.ranker import TrainedRanker

pytestmark = pytest.mark.integration

AS_OF = date(2026, 11, 23)
EARLIER = AS_OF - timedelta(weeks=1)
N = 10


@dataclass(frozen=True)
class Seed:
    snapshots: dict[date, dict[str, pl.DataFrame]]
    model: TrainedRanker
    categories: list[str]

    def user(self) -> int:
        """A user of the AS_OF snapshot who consumed something new in the week of AS_OF."""
        labels = self.snapshots[AS_OF]["labels"].filter(pl.col("is_new"))
        return int(labels["user_id"].sort()[0])


@pytest.fixture(scope="module")
def seed() -> Seed:
    raw = generate_log(
        n_users=int(SMALL_JOB["RECSYS_SYNTHETIC_USERS"]),
        n_items=int(SMALL_JOB["RECSYS_SYNTHETIC_ITEMS"]),
        n_events=int(SMALL_JOB["RECSYS_SYNTHETIC_EVENTS"]),
        n_weeks=int(SMALL_JOB["RECSYS_SYNTHETIC_WEEKS"]),
        end=week_start(AS_OF + timedelta(weeks=1)),  # the week of AS_OF is over: it has labels
        seed=42,
    )
    settings = Settings()
    snapshots = {week: compute_snapshot(raw, week, settings) for week in (EARLIER, AS_OF)}
    model, categories = train_quick_model(snapshots[EARLIER], EARLIER, settings, trees=15)
    return Seed(snapshots, model, categories)


@pytest.fixture
def seeded(clean_stores: Stores, seed: Seed) -> Stores:
    """Empty stores with both snapshots and their labels, no model."""
    for week, frames in seed.snapshots.items():
        store_snapshot(clean_stores.engine, week, frames)
    return clean_stores


@pytest.fixture
def with_champion(seeded: Stores, settings: Settings, seed: Seed) -> Stores:
    register_champion(seeded.engine, settings.model_name, seed.model, seed.categories, EARLIER)
    return seeded


def run_explain(stores: Stores, settings: Settings, user_id: int, as_of: date = AS_OF, **kwargs) -> dict:
    return explain.explain(
        stores.engine, stores.redis, settings.redis_prefix, user_id, as_of, CandidateConfig(), N,
        model_name=settings.model_name, **kwargs,
    )  # fmt: skip


def publish_list(stores: Stores, settings: Settings, as_of: date, user_id: int, items: list[int]) -> None:
    recs = pl.DataFrame({"user_id": [user_id], "items": [items]})
    metadata = {"model_version": "m:1", "generated_at": "2026-11-23T05:00:00+00:00", "n": N, "fallback_user_count": 0}
    publish_recommendations(stores.redis, settings.redis_prefix, as_of, recs, [1, 2, 3], metadata)


def test_explains_the_champions_ranking_with_the_weeks_new_items_and_the_live_list(
    with_champion: Stores, settings: Settings, seed: Seed
):
    user = seed.user()
    model = ScoringModel(lgb.Booster(model_str=seed.model.model_text), seed.model.feature_names, seed.categories)
    frames = seed.snapshots[AS_OF]
    expected = explain.explain_user(
        SnapshotTables.from_frames(frames), user, model, CandidateConfig(), N, frames["labels"]
    )
    publish_list(with_champion, settings, AS_OF, user, [r["item_id"] for r in expected["recommended"]])

    explained = run_explain(with_champion, settings, user)

    assert (explained["as_of"], explained["feature_as_of"]) == (AS_OF, AS_OF)
    assert explained["model"]["version"] == 1 and explained["model"]["status"] == "champion"
    assert [(c["item_id"], c["sources"]) for c in explained["candidates"]] == [
        (c["item_id"], c["sources"]) for c in expected["candidates"]
    ]
    assert [c["score"] for c in explained["candidates"]] == pytest.approx([c["score"] for c in expected["candidates"]])
    assert explained["recommended"] == expected["recommended"] and len(explained["recommended"]) == N
    new_items = frames["labels"].filter(pl.col("user_id") == user, pl.col("is_new"))["item_id"].to_list()
    assert sorted(c["item_id"] for c in explained["consumed"]) == sorted(new_items) and new_items
    assert explained["history_items"] == frames["user_item_history"].filter(pl.col("user_id") == user).height
    published = explained["published"]
    assert published["source"] == "live" and published["same_as_explained"] and not published["fallback"]
    assert not explained["notes"]
    json.loads(json.dumps(explained, default=str))  # JSON-ready


def test_unknown_user_is_one_error_naming_the_user_and_the_snapshot_week(with_champion: Stores, settings: Settings):
    with pytest.raises(explain.UnknownUserError, match=f"user 987654321 is not in the feature snapshot as_of {AS_OF}"):
        run_explain(with_champion, settings, 987_654_321)


def test_week_before_any_snapshot_is_refused(with_champion: Stores, settings: Settings, seed: Seed):
    with pytest.raises(
        store.SnapshotUnavailable, match=f"no feature snapshot at or before {EARLIER - timedelta(weeks=1)}"
    ):
        run_explain(with_champion, settings, seed.user(), EARLIER - timedelta(weeks=1))


def test_without_a_champion_the_candidates_are_still_explained(seeded: Stores, settings: Settings, seed: Seed):
    explained = run_explain(seeded, settings, seed.user())

    assert explained["model"] is None and explained["candidates"]
    assert all(c["score"] is None for c in explained["candidates"])
    assert any("no model has been trained" in note for note in explained["notes"])


def test_a_champion_that_is_not_lightgbm_is_shown_without_scores(seeded: Stores, settings: Settings, seed: Seed):
    registry.ensure_schema(seeded.engine)
    registry.register_model(
        seeded.engine, name=settings.model_name, model_text="", feature_names=[], encodings={},
        params={"baseline": "recent_popular"}, metrics={}, as_of=EARLIER, training_as_ofs=[],
        validation_as_of=None, holdout_as_of=None, feature_snapshots={}, kind="baseline",
        promote_reason="a baseline champion, as before any model has won the gate", actor="test",
    )  # fmt: skip

    explained = run_explain(seeded, settings, seed.user())

    assert explained["model"]["version"] == 1 and all(c["score"] is None for c in explained["candidates"])
    assert any("not a LightGBM model" in note for note in explained["notes"])


def test_a_week_other_than_the_live_one_says_so_and_asks_the_archive(
    with_champion: Stores, settings: Settings, seed: Seed
):
    user = seed.user()
    publish_list(with_champion, settings, AS_OF, user, [7, 8])
    asked = []

    without_archive = run_explain(with_champion, settings, user, EARLIER)
    with_archive = run_explain(
        with_champion, settings, user, EARLIER, archived_list=lambda u, week: asked.append((u, week)) or [4, 5]
    )

    assert without_archive["published"] is None and without_archive["feature_as_of"] == EARLIER
    assert any(f"the live publication is for the week of {AS_OF}" in n for n in without_archive["notes"])
    assert with_archive["published"]["source"] == "archive" and with_archive["published"]["items"] == [4, 5]
    assert asked == [(user, EARLIER)]


def test_week_newer_than_the_snapshot_uses_the_newest_snapshot_and_says_so(
    with_champion: Stores, settings: Settings, seed: Seed
):
    later = AS_OF + timedelta(weeks=1)

    explained = run_explain(with_champion, settings, seed.user(), later)

    assert explained["feature_as_of"] == AS_OF and explained["consumed"] is None
    assert any(f"newest passed feature snapshot is {AS_OF}" in n for n in explained["notes"])
    assert any(f"no labels for the week of {later}" in n for n in explained["notes"])


def test_cli_explains_the_live_week_by_default_as_text_and_json(
    with_champion: Stores, settings: Settings, seed: Seed, monkeypatch, capsys
):
    for key, value in {
        "RECSYS_DATABASE_URL": settings.database_url.get_secret_value(),
        "RECSYS_REDIS_URL": settings.redis_url.get_secret_value(),
        "RECSYS_DATA_DIR": str(settings.data_dir),
        "RECSYS_TOP_N": str(N),
    }.items():
        monkeypatch.setenv(key, value)
    user = seed.user()
    publish_list(with_champion, settings, AS_OF, user, [7, 8])

    assert cli.main(["explain", str(user), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["as_of"] == str(AS_OF) and document["published"]["items"] == [7, 8]
    assert len(document["recommended"]) == N

    assert cli.main(["explain", str(user), "--as-of", str(AS_OF)]) == 0
    text = capsys.readouterr().out
    assert f"user {user}, week of {AS_OF}" in text and "recommended" in text and "consumed for the first time" in text

    assert cli.main(["explain", "987654321"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: UnknownUserError: user 987654321 is not in the feature snapshot")
