"""What a new user meets first: one-line failures, a page that says why a run did nothing,
snapshots that remember their raw source, and progress in the log records.

Flows run under the Prefect test harness on a real Postgres; their logs are read back
from the Prefect API, as the UI shows them.
"""

import logging
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from cli import main as cli
from features import store, transform
from features.raw import RawDataError
from features.synthetic import generate_log
from flows.feature_flow import ARTIFACT_KEY, feature_flow
from tests.conftest import artifact_text
from training.store import snapshot_digests

pytestmark = pytest.mark.integration

AS_OF = date(2024, 3, 4)
LAST_WEEK = AS_OF - timedelta(weeks=1)


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return generate_log(
        n_users=60, n_items=30, n_events=2_000, n_weeks=5, end=transform.week_start(AS_OF), seed=7
    ).events


def write_csv(folder: Path, events: pl.DataFrame) -> str:
    """The events as a CSV file under `folder`; the source spec naming it."""
    folder.mkdir(parents=True, exist_ok=True)
    events.write_csv(folder / "events.csv")
    return f"csv:{folder / 'events.csv'}"


def run_logs(state) -> list[str]:
    """Every log line of the flow run behind `state`, as the Prefect API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    for handler in logging.getLogger("prefect.flow_runs").handlers:
        handler.flush()  # the API handler sends in batches
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=run_filter, offset=len(lines), limit=200):
            lines += [entry.message for entry in page]
    return lines


def snapshot_lineage(engine, week: date) -> set[tuple[str, str | None]]:
    with engine.connect() as conn:
        query = "select source, raw_digest from feature_snapshots where as_of = :week and table_name <> 'labels'"
        return {tuple(r) for r in conn.execute(sa.text(query), {"week": week})}


def dump_snapshots(engine) -> list[tuple]:
    with engine.connect() as conn:
        return sorted(map(tuple, conn.execute(sa.text("select * from feature_snapshots"))), key=repr)


def test_a_bad_source_ends_the_run_failed_with_its_one_line_message_and_no_traceback(
    flow_env, clean_stores, events, tmp_path, caplog
):
    spec = write_csv(tmp_path / "bad", events.rename({"user_id": "userid"}))

    state = feature_flow(as_of=AS_OF, source=spec, return_state=True)

    assert state.is_failed()
    assert state.message.startswith(f"RawDataError: source {tmp_path / 'bad' / 'events.csv'}")
    assert "missing columns ['user_id']" in state.message and "\n" not in state.message
    assert isinstance(state.result(raise_on_failure=False), RawDataError)
    logs = run_logs(state)
    assert state.message in logs
    assert not [line for line in logs if "Traceback" in line]
    assert "Traceback" not in caplog.text


def test_a_direct_call_still_raises_the_original_error(flow_env, clean_stores, events, tmp_path):
    spec = write_csv(tmp_path / "bad", events.drop("ts"))

    with pytest.raises(RawDataError, match=r"missing columns \['ts'\]"):
        feature_flow(as_of=AS_OF, source=spec)


def test_the_cli_prints_one_error_line_for_a_failed_run(flow_env, clean_stores, events, tmp_path, capsys):
    spec = write_csv(tmp_path / "bad", events.rename({"item_id": "itemid"}))

    code = cli.main(["features", "--as-of", str(AS_OF), "--source", spec])

    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: RawDataError: source") and "missing columns ['item_id']" in line
    assert "Traceback" not in err


def test_an_unexpected_error_still_shows_its_traceback(flow_env, clean_stores, events, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(transform, "build_week_tables", broken)

    state = feature_flow(as_of=AS_OF, source=write_csv(tmp_path / "src", events), return_state=True)

    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), ZeroDivisionError)
    assert any("Traceback" in line and "ZeroDivisionError" in line for line in run_logs(state))


def test_a_run_with_nothing_to_do_says_why_in_its_artifact(flow_env, clean_stores, events, tmp_path):
    spec = write_csv(tmp_path / "src", events)
    feature_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec)

    state = feature_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec, return_state=True)

    assert state.result() == {}
    text = artifact_text(state, ARTIFACT_KEY)
    assert f"All 2 week(s) already passed validation: {LAST_WEEK} … {AS_OF}" in text and "`--force`" in text


def test_another_source_for_a_passed_week_is_refused_before_computing_and_force_recomputes_it(
    flow_env, clean_stores, events, tmp_path, caplog
):
    engine = clean_stores.engine
    first = write_csv(tmp_path / "first", events)
    other = write_csv(tmp_path / "other", events.filter(pl.col("user_id") % 2 == 0))
    with caplog.at_level(logging.INFO):
        feature_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=first)
    progress = [r.progress for r in caplog.records if hasattr(r, "progress")]
    assert progress == [("feature weeks", 1, 2), ("feature weeks", 2, 2)]
    ((source, digest),) = snapshot_lineage(engine, AS_OF)
    assert source == first and digest.startswith(f"{events.filter(pl.col('ts') < transform.week_start(AS_OF)).height}:")
    assert snapshot_digests(engine, [LAST_WEEK, AS_OF])[f"source@{AS_OF}"] == first
    before = dump_snapshots(engine)

    state = feature_flow(as_of=AS_OF, source=other, return_state=True)

    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), store.SourceMismatch)
    for part in (str(AS_OF), repr(first), repr(other), "--force"):
        assert part in state.message
    assert not [line for line in run_logs(state) if "feature snapshots to compute" in line]  # refused while planning
    assert dump_snapshots(engine) == before

    feature_flow(as_of=AS_OF, source=other, force=True)

    ((source, forced_digest),) = snapshot_lineage(engine, AS_OF)
    assert source == other and forced_digest != digest
    assert store.snapshot_sources(engine, [LAST_WEEK, AS_OF]) == {LAST_WEEK: first, AS_OF: other}
