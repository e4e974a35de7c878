"""The inference flow archives what it publishes and measures the week that just closed, on real stores.

One module job: the weekly job for T, then features and inference for T+7 (which measures T).
The degradation test then re-publishes T+7 with lists of items its users did not consume, as a
bad model would, and the inference run for T+14 measures it.
"""

import time
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from features.synthetic import ensure_synthetic_log
from flows import configs
from flows.feature_flow import feature_flow
from flows.inference_flow import inference_flow
from flows.weekly_job import run_weekly_job
from inference import archive, publications, quality, serving
from recsys.settings import Settings
from recsys.stores import Stores, open_stores
from tests.conftest import SMALL_JOB, artifact_text
from tests.helpers import publish_recommendations, read_log

pytestmark = pytest.mark.integration

T = date(2025, 11, 24)  # past Mondays: their publications go live after their weeks ended, as in a replay
T7, T14 = T + timedelta(weeks=1), T + timedelta(weeks=2)


@pytest.fixture(scope="module")
def two_weeks(stores: Stores, prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """Empty stores; the weekly job for T, then features and inference for T+7: (settings, both results)."""
    with stores.engine.begin() as conn:
        conn.exec_driver_sql("drop schema if exists public cascade; create schema public")
    stores.redis.flushdb()
    env = {
        "RECSYS_DATABASE_URL": stores.database_url,
        "RECSYS_REDIS_URL": stores.redis_url,
        "RECSYS_DATA_DIR": str(tmp_path_factory.mktemp("quality-flow")),
        **SMALL_JOB,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = Settings()
        ensure_synthetic_log(configs.synthetic_log_config(settings), T + timedelta(weeks=3))
        _, first = run_weekly_job(settings, T, None)
        feature_flow(as_of=T7)
        yield settings, first, inference_flow(as_of=T7)


def test_the_archive_answers_week_t_and_its_realized_quality_is_measured(two_weeks):
    settings, first, second = two_weeks
    assert first["realized_quality"] is None and first["quality_alerts"] == []  # nothing was served before T
    with open_stores(settings) as stores:
        live = serving.get_recommendations(stores.redis, settings.redis_prefix, [1, 2, 3])
        assert {rec.version for rec in live} == {second["version"]}  # Redis moved on
        with stores.engine.connect() as conn:
            users = conn.exec_driver_sql(
                f'select user_id, items from "published_lists__{first["version"]}" order by user_id limit 1'
            ).all()
        ((user, items),) = users
        served = archive.served_list(stores.engine, user, T, prefix=settings.redis_prefix)
        assert served == (first["version"], items, False)
        direct = quality.measure_week(stores.engine, T, **configs.quality_options(settings))

    row = second["realized_quality"]
    assert row["as_of"] == T and row["version"] == first["version"] and row["users"] > 0
    assert row == direct
    assert "# Realized quality" in artifact_text_of(second, "realized-quality")


def artifact_text_of(result: dict, key: str) -> str:
    """The `key` artifact of the inference run that published `result`."""
    from types import SimpleNamespace

    (run_id,) = [row["flow_run_id"] for row in publication_rows(result)]
    return artifact_text(SimpleNamespace(state_details=SimpleNamespace(flow_run_id=run_id)), key)


def publication_rows(result: dict) -> list[dict]:
    with open_stores(Settings()) as stores:
        rows = publications.list_publications(stores.engine)
    return rows.filter(pl.col("version") == result["version"]).to_dicts()


def test_a_bad_model_live_for_a_week_emits_the_degradation_event(two_weeks):
    settings, _, second = two_weeks
    prefix, n = settings.redis_prefix, settings.top_n
    raw = read_log(settings.data_dir / "synthetic")
    start = datetime.combine(T7, datetime.min.time(), UTC)
    week = raw.events.filter(pl.col("ts").is_between(start, start + timedelta(weeks=1), closed="left"))
    consumed = week.group_by("user_id").agg(pl.col("item_id").unique())
    by_use = raw.items.join(week.group_by("item_id").len(), on="item_id", how="left").fill_null(0)
    catalogue = by_use.sort("len", "item_id")["item_id"].to_list()
    # Every user of the live version gets items they did not consume in T+7: NDCG 0.
    with open_stores(settings) as stores:
        users = archive.read_published_lists(stores.redis, prefix, second["version"])["user_id"]
        taken = {user: set(items) for user, items in consumed.iter_rows()}
        lists = [[i for i in catalogue if i not in taken.get(user, set())][:n] for user in users]
        bad = pl.DataFrame({"user_id": users, "items": lists}, schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)})
        metadata = {"model_version": "bad:0", "generated_at": datetime.now(UTC).isoformat(), "n": n,
                    "fallback_user_count": 0, "feature_as_of": str(T7)}  # fmt: skip
        published = publish_recommendations(stores.redis, prefix, T7, bad, catalogue[:n], metadata)
        publications.record_publication(stores.engine, version=published.version, as_of=T7, status="live")
        publications.record_pointer_move(
            stores.engine, prefix=prefix, action="publish", from_version=second["version"],
            to_version=published.version, reason="a bad model", actor="test",
        )  # fmt: skip
        archive.archive_lists(stores.engine, published.version, bad)
        archive.archive_fallback(stores.engine, published.version, catalogue[:n])
    emitted_after = datetime.now(UTC)

    feature_flow(as_of=T14)
    third = inference_flow(as_of=T14)

    row = third["realized_quality"]
    assert row["as_of"] == T7 and row["version"] == published.version and row["ndcg"] < row["popular_ndcg"]
    (reason,) = third["quality_alerts"]
    assert "below recent popularity" in reason and str(T7) in reason
    assert "Quality degraded" in artifact_text_of(third, "realized-quality")
    (event,) = degradation_events(emitted_after)
    assert event.resource.id == f"recsys.publication.{published.version}"
    assert event.payload["reasons"] == [reason] and event.payload["week"] == str(T7)


def degradation_events(since: datetime, wait_s: float = 30) -> list:
    """The `recsys.quality.degraded` events the Prefect API holds since `since` (events arrive asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=since, until=datetime.now(UTC)),
                    event=EventNameFilter(name=["recsys.quality.degraded"]),
                ),
                limit=50,  # the client's default (100) is above what the server accepts
            )
            if page.events or time.monotonic() > deadline:
                return page.events
            time.sleep(1)
