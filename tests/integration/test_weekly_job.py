"""The whole weekly job on real Postgres, Redis and Prefect: features → training → inference."""

import json
from datetime import date, timedelta

import polars as pl
import pytest

from features import store
from features.synthetic import read_log
from flows.feature_flow import ensure_synthetic_log
from inference import publications, serving
from recsys import cli
from recsys.settings import Settings
from recsys.stores import open_stores
from training import registry

pytestmark = pytest.mark.integration

AS_OF = date(2026, 11, 23)


def live_recommendations(settings: Settings) -> dict[int, list[int]]:
    with open_stores(settings) as stores:
        users = store.read_table(stores.engine, "user_features", AS_OF, columns=["user_id"])["user_id"].to_list()
        return {r.user_id: r.items for r in serving.get_recommendations(stores.redis, settings.redis_prefix, users)}


def test_weekly_job_publishes_a_list_for_every_known_user_and_records_lineage(flow_env: Settings, capsys):
    assert cli.main(["run", "--as-of", str(AS_OF)]) == 0
    out = capsys.readouterr().out
    assert "published version" in out and "recsys recs" in out

    recs = live_recommendations(flow_env)
    assert recs and all(0 < len(items) <= flow_env.top_n for items in recs.values())
    with open_stores(flow_env) as stores:
        champion = registry.get_champion(stores.engine, flow_env.model_name)
        assert champion is not None and champion.holdout_as_of == AS_OF - timedelta(weeks=1)
        assert set(champion.metrics) >= {"model", "recent_popular", "all_time_popular", "item_knn"}
        published = publications.list_publications(stores.engine)
        assert published.height == 1 and published["model_version"][0] == champion.version
        history = store.read_table(stores.engine, "user_item_history", AS_OF)
    consumed = set(zip(history["user_id"], history["item_id"], strict=True))
    assert not any((user, item) in consumed for user, items in recs.items() for item in items)


def test_unknown_user_gets_the_fallback_list_from_the_cli(flow_env: Settings, capsys):
    assert cli.main(["run", "--as-of", str(AS_OF)]) == 0
    capsys.readouterr()
    assert cli.main(["recs", "987654321", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["user_id"] == 987654321 and line["fallback"] is True
    assert len(line["items"]) == flow_env.top_n and line["as_of"] == str(AS_OF)


def test_same_seed_gives_identical_recommendations_and_future_events_change_nothing(flow_env: Settings, tmp_path):
    """Run 1 reads the synthetic log; run 2 reads a copy without any event at or after as_of."""
    ensure_synthetic_log(flow_env, AS_OF + timedelta(weeks=2))
    assert cli.main(["run", "--as-of", str(AS_OF)]) == 0
    first = live_recommendations(flow_env)

    raw = read_log(flow_env.data_dir / "synthetic")
    cut = tmp_path / "cut"
    cut.mkdir()
    raw.events.filter(pl.col("ts") < pl.lit(AS_OF).cast(pl.Datetime("us", "UTC"))).write_parquet(cut / "events.parquet")
    raw.items.write_parquet(cut / "items.parquet")
    assert raw.events.filter(pl.col("ts") >= pl.lit(AS_OF).cast(pl.Datetime("us", "UTC"))).height > 0

    with open_stores(flow_env) as stores:  # start again from empty stores
        with stores.engine.begin() as conn:
            conn.exec_driver_sql("drop schema public cascade; create schema public")
        stores.redis.flushdb()
    source = f"parquet:{cut / 'events.parquet'};items={cut / 'items.parquet'}"
    assert cli.main(["run", "--as-of", str(AS_OF), "--source", source]) == 0
    assert live_recommendations(flow_env) == first
