"""The weekly-job benchmark's stores: each size's embedded servers are its own and stop with the size."""

import pytest
import sqlalchemy as sa

from benchmarks.weekly_job import bench_stores

pytestmark = pytest.mark.integration


def test_a_sizes_embedded_postgres_serves_its_job_and_stops_when_the_size_ends(server_dir, monkeypatch):
    monkeypatch.delenv("RECSYS_DATABASE_URL", raising=False)
    monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
    data_dir = server_dir("bench-size") / "data"
    with bench_stores(data_dir, "small") as (env, kind):
        assert kind == "embedded"
        with sa.create_engine(env["RECSYS_DATABASE_URL"]).connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
        assert (data_dir / "postgres" / "postmaster.pid").exists()
    # Stopped, not left beside the next size's servers; its data kept.
    assert not (data_dir / "postgres" / "postmaster.pid").exists()
    assert (data_dir / "postgres" / "PG_VERSION").exists()
