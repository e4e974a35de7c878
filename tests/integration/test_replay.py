"""`recsys replay` on real Postgres, Redis and Prefect: three weeks of the small synthetic log, week by week."""

import contextlib
import io
import re
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from cli import main as cli
from flows.replay import replay_weeks
from inference import publications
from ranking import registry
from recsys.settings import Settings
from recsys.stores import Stores, open_stores

pytestmark = pytest.mark.integration

FIRST, LAST = date(2025, 11, 10), date(2025, 11, 24)  # past Mondays
WEEKS = [FIRST + timedelta(weeks=k) for k in range(3)]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def replay_state(settings: Settings) -> dict[tuple[date, str], tuple[str, object]]:
    with open_stores(settings) as stores, stores.engine.connect() as conn:
        rows = conn.execute(sa.select(replay_weeks)).all()
    return {(row.as_of, row.stage): (row.status, row.finished_at) for row in rows}


def job_counts(settings: Settings) -> tuple[int, int]:
    """Model versions registered and publications recorded."""
    with open_stores(settings) as stores:
        models = registry.list_models(stores.engine, settings.model_name).height
        return models, publications.list_publications(stores.engine).height


def test_replay_publishes_every_week_records_its_state_and_resumes_without_redoing_anything(flow_env):
    settings = flow_env
    code, out, err = run_cli("replay", "--from", str(FIRST), "--to", str(LAST))
    assert code == 0, err[-3000:]
    progress = [line for line in out.splitlines() if re.match(r"week \d{4}-\d\d-\d\d \(", line)]
    assert [line.split()[1] for line in progress] == [str(w) for w in WEEKS]
    assert all("features" in line and "published" in line for line in progress)
    assert "realized ndcg@10 of 2025-11-10" in progress[1], progress[1]
    state = replay_state(settings)
    assert {key: status for key, (status, _) in state.items()} == {
        (week, stage): "done" for week in WEEKS for stage in ("features", "training", "inference")
    }
    with open_stores(settings) as stores:
        live = publications.list_publications(stores.engine).filter(status="live")
    assert live["as_of"].to_list() == WEEKS
    for week, version in zip(WEEKS, live["version"], strict=True):
        assert version in out and version.startswith(f"{week:%Y%m%d}")
    counts = job_counts(settings)
    with open_stores(settings) as stores, stores.engine.connect() as conn:
        kept = conn.execute(sa.text("select holdout_as_of from gate_models")).scalars().all()
    # Each week's training reuses the models the week before trained for the gate weeks both pool, its newest
    # gate week's being the week before's served refit, so every model was trained once: the first week's gate
    # weeks, then one refit per replayed week (kept for the gate week after it).
    assert len(kept) == len(set(kept)) == settings.gate_weeks + len(WEEKS), sorted(kept)

    code, again, err = run_cli("replay", "--from", str(FIRST), "--to", str(LAST))

    assert code == 0, err[-3000:]
    assert job_counts(settings) == counts, "a finished replay ran a flow again"
    assert replay_state(settings) == state
    assert again.count("already replayed") == 3


def test_force_redoes_the_weeks_of_its_span(flow_env):
    settings = flow_env
    assert run_cli("replay", "--from", str(LAST), "--to", str(LAST))[0] == 0
    (models, published), before = job_counts(settings), replay_state(settings)

    code, out, err = run_cli("replay", "--from", str(LAST), "--to", str(LAST), "--force")

    assert code == 0, err[-3000:]
    assert job_counts(settings) == (models + 1, published + 1)
    after = replay_state(settings)
    assert after.keys() == before.keys() and all(after[key][1] > before[key][1] for key in before)
    assert "(earlier run)" not in out


@pytest.fixture
def cli_env(clean_stores: Stores, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Stores:
    """The CLI pointed at the emptied session stores."""
    monkeypatch.setenv("RECSYS_DATABASE_URL", settings.database_url.get_secret_value())
    monkeypatch.setenv("RECSYS_REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("RECSYS_DATA_DIR", str(settings.data_dir))
    return clean_stores


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", str(FIRST), "--to", str(LAST), "--source", "nosuch:thing"], "unknown source kind 'nosuch'"),
        (["--from", str(LAST), "--to", str(FIRST)], f"--from {LAST} is after --to {FIRST}"),
        (["--from", str(FIRST), "--to", "2999-01-07"], "--to 2999-01-07 is in the future"),
    ],
    ids=["unknown-source", "reversed-range", "future-week"],
)
def test_bad_input_is_one_line_and_writes_nothing(cli_env: Stores, args: list[str], message: str):
    code, out, err = run_cli("replay", *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    with cli_env.engine.connect() as conn:
        tables = conn.execute(sa.text("select count(*) from pg_tables where schemaname = 'public'")).scalar_one()
    assert tables == 0 and cli_env.redis.dbsize() == 0
