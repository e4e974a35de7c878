"""The whole weekly job on real Postgres, Redis and Prefect: features → training → inference.

One job run is shared by the module (it costs about a minute); the determinism test, last,
runs the job a second time from empty stores.
"""

import contextlib
import io
import json
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from cli import main as cli
from features import store
from inference import publications, serving
from ranking import registry
from recsys.settings import Settings
from recsys.stores import Stores, open_stores
from tests.conftest import SMALL_JOB
from tests.helpers import read_log

pytestmark = pytest.mark.integration

AS_OF = date(2025, 11, 24)  # a past Monday: the log runs two weeks beyond it, still before any run time


def empty(stores: Stores) -> None:
    with stores.engine.begin() as conn:
        conn.exec_driver_sql("drop schema if exists public cascade; create schema public")
    stores.redis.flushdb()


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(args)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def weekly_job(
    stores: Stores, prefect_harness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, str]]:
    """Empty stores, then `recsys run` for AS_OF on a small synthetic log that extends past it."""
    empty(stores)
    env = {
        "RECSYS_DATABASE_URL": stores.database_url,
        "RECSYS_REDIS_URL": stores.redis_url,
        "RECSYS_DATA_DIR": str(tmp_path_factory.mktemp("weekly-job")),
        **SMALL_JOB,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = Settings()
        from features.synthetic import ensure_synthetic_log
        from flows.configs import synthetic_log_config

        ensure_synthetic_log(synthetic_log_config(settings), AS_OF + timedelta(weeks=2))  # events after as_of exist
        yield settings, run_cli("run", "--as-of", str(AS_OF))


def live_recommendations(settings: Settings) -> dict[int, list[int]]:
    with open_stores(settings) as stores:
        users = store.read_table(stores.engine, "user_features", AS_OF, columns=["user_id"])["user_id"].to_list()
        return {r.user_id: r.items for r in serving.get_recommendations(stores.redis, settings.redis_prefix, users)}


def test_run_prints_the_summary_and_the_lookup_command(weekly_job):
    _, out = weekly_job
    assert "feature snapshot rows" in out and "published version" in out and "recsys recs" in out


def test_every_known_user_gets_a_personal_list_without_consumed_items(weekly_job):
    settings, _ = weekly_job
    recs = live_recommendations(settings)
    assert recs and all(0 < len(items) <= settings.top_n for items in recs.values())
    with open_stores(settings) as stores:
        history = store.read_table(stores.engine, "user_item_history", AS_OF)
    consumed = set(zip(history["user_id"], history["item_id"], strict=True))
    assert not any((user, item) in consumed for user, items in recs.items() for item in items)


def test_champion_and_publication_carry_lineage(weekly_job):
    settings, _ = weekly_job
    with open_stores(settings) as stores:
        champion = registry.get_champion(stores.engine, settings.model_name)
        published = publications.list_publications(stores.engine)
    # The served model is refitted through the newest labelled week (the gate's newest holdout).
    assert champion is not None and champion.validation_as_of == AS_OF - timedelta(weeks=1)
    assert champion.holdout_as_of is None
    assert {"model", "recent_popular", "all_time_popular", "item_knn"} <= set(champion.metrics)
    assert any(key.startswith("labels@") for key in champion.feature_snapshots)
    assert published.height == 1 and published["model_version"][0] == champion.version
    assert published["feature_as_of"][0] == AS_OF
    # The raw source shows in both: the default synthetic log.
    assert champion.feature_snapshots[f"source@{champion.validation_as_of}"] == "synthetic"
    assert published["feature_source"][0] == "synthetic"


def test_unknown_user_gets_the_fallback_list_from_the_cli(weekly_job):
    settings, _ = weekly_job
    line = json.loads(run_cli("recs", "987654321", "--json").strip())
    assert line["user_id"] == 987654321 and line["fallback"] is True
    assert len(line["items"]) == settings.top_n and line["as_of"] == str(AS_OF)


def test_same_seed_gives_identical_recommendations_and_future_events_change_nothing(weekly_job, tmp_path: Path):
    """A second run, from empty stores, reads a copy of the log without any event at or after as_of."""
    settings, _ = weekly_job
    first = live_recommendations(settings)
    raw = read_log(settings.data_dir / "synthetic")
    boundary = pl.lit(AS_OF).cast(pl.Datetime("us", "UTC"))
    assert raw.events.filter(pl.col("ts") >= boundary).height > 0
    raw.events.filter(pl.col("ts") < boundary).write_parquet(tmp_path / "events.parquet")
    raw.items.write_parquet(tmp_path / "items.parquet")
    with open_stores(settings) as stores:
        empty(stores)

    run_cli(
        "run",
        "--as-of",
        str(AS_OF),
        "--source",
        f"parquet:{tmp_path / 'events.parquet'};items={tmp_path / 'items.parquet'}",
    )
    assert live_recommendations(settings) == first
