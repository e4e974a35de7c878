"""The feature flow end to end: backfill, idempotent re-runs, bad raw input, validation failures, drift.

Every run goes through Prefect (test harness), a real Postgres and the real GX suites,
on a tiny synthetic log written as Parquet/CSV files.
"""

import logging
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal

from features import contracts, partitioned, store, transform, validation
from features.raw import RawData, RawDataError
from features.sources import read_source
from features.synthetic import generate_log
from features.validation import ValidationFailed, ValidationReport, profile_table
from flows.configs import backtest_options, feature_options, validation_options
from flows.feature_flow import ARTIFACT_KEY, feature_flow
from recsys import runtime
from recsys.clock import mondays
from recsys.settings import Settings
from tests.conftest import artifact_text
from training import backtest
from training.store import read_tables

pytestmark = pytest.mark.integration

AS_OF = date(2024, 3, 4)
LAST_WEEK = AS_OF - timedelta(weeks=1)
FEATURE_TABLES = [t.name for t in contracts.FEATURE_TABLES]


@pytest.fixture(scope="module")
def log() -> RawData:
    return generate_log(n_users=80, n_items=40, n_events=3_000, n_weeks=6, end=transform.week_start(AS_OF), seed=5)


def write_source(folder: Path, events: pl.DataFrame, items: pl.DataFrame, kind: str = "parquet") -> str:
    """Write events and items files under `folder`; return the source spec naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    events_path, items_path = folder / f"events.{kind}", folder / "items.parquet"
    if kind == "parquet":
        events.write_parquet(events_path)
    else:
        events.write_csv(events_path)
    items.write_parquet(items_path)
    return f"{kind}:{events_path};items={items_path}"


def dump_store(engine) -> dict[str, list[tuple]]:
    """Every row of every feature-store table, bookkeeping included."""
    tables = [*contracts.CONTRACTS, "feature_snapshots", "feature_validation_runs"]
    with engine.connect() as conn:
        return {t: sorted(map(tuple, conn.execute(sa.text(f'select * from "{t}"'))), key=repr) for t in tables}


def feature_rows(dump: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """The feature tables' rows of a `dump_store`, without the bookkeeping."""
    return {t: dump[t] for t in contracts.CONTRACTS}


def validation_runs(engine) -> list[tuple]:
    with engine.connect() as conn:
        query = "select table_name, as_of, passed from feature_validation_runs order by id"
        return [tuple(r) for r in conn.execute(sa.text(query))]


def run_flow(**parameters):
    """Run the flow; return its final state (failed runs do not raise here)."""
    return feature_flow(**parameters, return_state=True)


def seed_snapshot(engine, raw: RawData, week: date) -> None:
    """A passed snapshot written straight through the store, so a test starts from a non-empty store."""
    store.ensure_schema(engine)
    frames = transform.build_feature_tables(raw.events, raw.items, week, recent_items=20, neighbours=50)
    reports = {
        name: ValidationReport(name, week, True, frame.height, profile=profile_table(contracts.CONTRACTS[name], frame))
        for name, frame in frames.items()
    }
    store.write_snapshot(engine, week, frames, reports, flow_run_id="seed")


def test_backfill_writes_each_week_then_skips_and_force_rewrites_identically(flow_env, clean_stores, log, tmp_path):
    engine = clean_stores.engine
    spec = write_source(tmp_path / "src", log.events, log.items)

    written = run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec).result()

    assert sorted(written) == [str(LAST_WEEK), str(AS_OF)]
    for week in (LAST_WEEK, AS_OF):
        assert set(written[str(week)]) == {*FEATURE_TABLES, "labels"}
        assert store.snapshot_passed(engine, week, FEATURE_TABLES)
        summary = {r["table_name"]: r for r in store.snapshot_summary(engine, week).to_dicts()}
        assert {t: summary[t]["digest"] for t in FEATURE_TABLES} == {t: written[str(week)][t] for t in FEATURE_TABLES}
        assert store.read_table(engine, "user_features", week).height == summary["user_features"]["row_count"] > 0
    # Labels of the week before each snapshot, written with it.
    assert store.passed_as_ofs(engine, "labels") == [LAST_WEEK - timedelta(weeks=1), LAST_WEEK]
    assert (
        written[str(AS_OF)]["labels"]
        == store.snapshot_summary(engine, LAST_WEEK).filter(table_name="labels")["digest"].item()
    )

    before = dump_store(engine)
    assert run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec).result() == {}
    assert dump_store(engine) == before  # skipped: not even a validation run recorded

    forced = run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec, force=True).result()

    assert forced == written
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    assert len(validation_runs(engine)) == 2 * len(before["feature_validation_runs"])


def test_duplicate_events_are_dropped_counted_and_change_no_digest(flow_env, clean_stores, log, tmp_path):
    clean = write_source(tmp_path / "clean", log.events, log.items)
    repeated = pl.concat([log.events, log.events.head(25)]).sort("user_id")  # repeats apart from their originals
    with_duplicates = write_source(tmp_path / "dupes", repeated, log.items)

    expected = run_flow(as_of=AS_OF, source=clean).result()
    state = run_flow(as_of=AS_OF, source=with_duplicates, force=True)

    assert state.result() == expected
    assert f"Read {log.events.height} events (25 duplicates dropped)" in artifact_text(state, ARTIFACT_KEY)


def with_row(events: pl.DataFrame, **values) -> pl.DataFrame:
    """The events with their first row's columns replaced by `values` (types relaxed as needed)."""
    first = events.head(1).with_columns(**{k: pl.lit(v) for k, v in values.items()})
    return pl.concat([first, events.slice(1)], how="vertical_relaxed")


# Each bad source: how to build it, its file kind, and what the error must say.
BAD_INPUTS = {
    "misnamed column": (lambda e: e.rename({"user_id": "userid"}), "csv", r"missing columns \['user_id'\]"),
    "missing column": (lambda e: e.drop("ts"), "parquet", r"missing columns \['ts'\]"),
    "unparseable timestamp": (
        lambda e: with_row(e.with_columns(pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S")), ts="last tuesday"),
        "csv",
        r"column ts: 1 unparseable timestamps, e.g. 'last tuesday'",
    ),
    "null user id": (lambda e: with_row(e, user_id=None), "parquet", r"column user_id: 1 null ids"),
    "null item id": (lambda e: with_row(e, item_id=None), "csv", r"column item_id: 1 null ids"),
    "negative weight": (lambda e: with_row(e, weight=-1.0), "parquet", r"column weight: 1 negative weights"),
    "NaN weight": (lambda e: with_row(e, weight=float("nan")), "parquet", r"column weight: 1 NaN weights"),
    "event in the future": (
        lambda e: with_row(e, ts=datetime(2099, 1, 1, tzinfo=UTC)),
        "parquet",
        r"column ts: 1 events after the run time",
    ),
    "empty source": (lambda e: e.clear(), "parquet", r"no events"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_raw_input_fails_naming_file_and_column_and_changes_nothing(case, flow_env, clean_stores, log, tmp_path):
    engine = clean_stores.engine
    seed_snapshot(engine, log, LAST_WEEK)
    before = dump_store(engine)
    corrupt, kind, message = BAD_INPUTS[case]
    spec = write_source(tmp_path / "bad", corrupt(log.events), log.items, kind)
    events_file = str(tmp_path / "bad" / f"events.{kind}")

    state = run_flow(as_of=AS_OF, source=spec)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, RawDataError)
    assert events_file in str(error)
    assert re.search(message, str(error)), str(error)
    assert dump_store(engine) == before


@pytest.mark.parametrize("partitions", ["1", "3"])
def test_validation_failure_writes_nothing_records_the_report_and_names_table_and_expectation(
    partitions, flow_env, clean_stores, log, tmp_path, monkeypatch
):
    engine = clean_stores.engine
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", partitions)
    run_flow(as_of=LAST_WEEK, source=write_source(tmp_path / "full", log.events, log.items)).result()
    before = dump_store(engine)
    shrunk = write_source(tmp_path / "shrunk", log.events.filter(pl.col("user_id") <= 10), log.items)
    monkeypatch.setenv("RECSYS_MIN_ROWS_RATIO", "1.0")

    state = run_flow(as_of=AS_OF, source=shrunk)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed)
    previous_users = store.snapshot_summary(engine, LAST_WEEK).filter(table_name="user_features")["row_count"].item()
    assert "user_features as_of=2024-03-04" in str(error)
    assert f"expect_table_row_count_to_be_between() expected min_value={previous_users}" in str(error)
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    failed = {r.table: r.as_of for r in error.reports}
    assert failed["user_features"] == AS_OF
    assert not any((Settings().data_dir / "feature-shares").glob("*"))  # partitions' shares removed on failure
    after = dump_store(engine)
    assert all(row in after["feature_snapshots"] for row in before["feature_snapshots"])
    new_rows = [row for row in after["feature_snapshots"] if row not in before["feature_snapshots"]]
    assert {(table, as_of, passed) for table, as_of, _, passed, *_ in new_rows} == {
        (table, as_of, False) for table, as_of in failed.items()
    }
    new_runs = validation_runs(engine)[len(before["feature_validation_runs"]) :]
    assert sorted(new_runs) == sorted((table, as_of, False) for table, as_of in failed.items())
    report = artifact_text(state, ARTIFACT_KEY)
    assert "Feature validation FAILED" in report
    assert "expect_table_row_count_to_be_between" in report


def test_a_bad_transitions_table_fails_validation_and_writes_nothing(
    flow_env, clean_stores, log, tmp_path, monkeypatch
):
    engine = clean_stores.engine
    source = write_source(tmp_path / "full", log.events, log.items)
    run_flow(as_of=LAST_WEEK, source=source).result()
    before = dump_store(engine)
    build = transform.build_item_transitions

    def with_a_self_transition(counts, as_of, top_k):
        # A defect the contract must catch: an item as its own next item.
        good = build(counts, as_of, top_k)
        return pl.concat([good, good.head(1).with_columns(pl.col("item_id").alias("next_item_id"))])

    monkeypatch.setattr(transform, "build_item_transitions", with_a_self_transition)

    state = run_flow(as_of=AS_OF, source=source)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed)
    assert "item_transitions as_of=2024-03-04" in str(error)
    assert "expect_column_pair_values_to_differ(item_id, next_item_id)" in str(error)
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    assert not store.snapshot_passed(engine, AS_OF, FEATURE_TABLES)


def test_a_partition_whose_rows_fail_their_checks_writes_no_partition_of_its_week(
    flow_env, clean_stores, log, tmp_path, monkeypatch
):
    engine = clean_stores.engine
    run_flow(as_of=LAST_WEEK, source=write_source(tmp_path / "full", log.events, log.items)).result()
    before = dump_store(engine)
    # Two finite weights (the raw checks pass them) whose sum overflows: one user's weight_1w is infinite.
    user = log.events["user_id"][0]
    start = datetime.combine(LAST_WEEK, datetime.min.time(), UTC)
    huge = pl.DataFrame(
        {
            "user_id": [user, user],
            "item_id": log.events["item_id"][:2],
            "weight": [1.5e308, 1.5e308],
            "ts": [start + timedelta(days=1), start + timedelta(days=2)],
        },  # fmt: skip
        schema=log.events.schema,
    )
    spec = write_source(tmp_path / "bad", pl.concat([log.events, huge]), log.items)
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", "3")

    state = run_flow(as_of=AS_OF, source=spec)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed)
    assert "user_features as_of=2024-03-04: expect_column_values_to_be_finite(weight_1w)" in str(error)
    assert "1 unexpected" in str(error)
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    assert not store.snapshot_passed(engine, AS_OF, FEATURE_TABLES[:1])
    assert {t for t, as_of, passed in validation_runs(engine) if as_of == AS_OF and not passed} == {"user_features"}


def test_drift_warns_in_the_artifact_and_blocks_when_configured(flow_env, clean_stores, log, tmp_path, monkeypatch):
    engine = clean_stores.engine
    spec = write_source(tmp_path / "src", log.events, log.items)
    monkeypatch.setenv("RECSYS_DRIFT_THRESHOLD", "0")  # any move of a drift column is drift

    warned = run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec)

    assert warned.is_completed()
    report = artifact_text(warned, ARTIFACT_KEY)
    assert "Drift (warnings, not blocking)" in report
    assert "user_features.events_4w mean moved" in report
    before = dump_store(engine)

    monkeypatch.setenv("RECSYS_DRIFT_BLOCKS", "true")
    blocked = run_flow(as_of=AS_OF, source=spec, force=True)

    assert blocked.is_failed()
    error = blocked.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed)
    assert "user_features as_of=2024-03-04: expect_no_drift" in str(error)
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    assert store.snapshot_passed(engine, AS_OF, FEATURE_TABLES)  # the earlier passed snapshot stays readable


def test_every_movielens_week_passes_in_order_on_an_empty_store_and_a_real_collapse_still_fails(
    clean_stores, movielens_dir
):
    """Weekly label counts vary 2x on real data; a quiet week must pass, a collapsed feature table must not.

    The flow's own pipeline calls, without Prefect (it adds nothing to what is checked here).
    """
    engine = clean_stores.engine
    settings = Settings()
    weeks = mondays("1997-10-06", "1998-04-20")
    raw = read_source(f"movielens:{movielens_dir}")
    store.ensure_schema(engine)

    def validate(frames: dict[str, pl.DataFrame], week: date) -> dict[str, ValidationReport]:
        as_ofs = {name: transform.assign_as_of(name, week) for name in frames}
        previous = store.read_recent_profiles(engine, as_ofs, settings.min_rows_weeks)
        return validation.validate_tables(frames, as_ofs=as_ofs, previous=previous, **validation_options(settings))

    warned = []
    for week in weeks:
        frames = transform.build_week_tables(raw.events, raw.items, week, **feature_options(settings))
        reports = validate(frames, week)
        assert all(r.success for r in reports.values()), ValidationFailed(list(reports.values()))
        store.write_week(engine, frames, reports, flow_run_id="movielens")
        warned += [r.row_count_warning for r in reports.values() if r.row_count_warning]

    assert store.find_incomplete_weeks(engine, weeks) == []
    # The week that failed before: 800 labels against 1724 the week before (862 required).
    assert any(w.startswith("labels row count 800 is below") for w in warned), warned
    next_week = weeks[-1] + timedelta(weeks=1)
    frames = transform.build_week_tables(raw.events, raw.items, next_week, **feature_options(settings))
    users = frames["user_features"]
    frames["user_features"] = users.filter(pl.col("user_id") % 10 == 0)  # 10% of its usual rows
    reports = validate(frames, next_week)
    assert not reports["user_features"].success
    with pytest.raises(ValidationFailed, match=r"set RECSYS_MIN_ROWS_RATIO lower \(now 0\.5\) to accept it") as error:
        store.write_week(engine, frames, reports, flow_run_id="collapse")
    assert "user_features as_of=1998-04-27: expect_table_row_count_to_be_between()" in str(error.value)
    assert not store.snapshot_passed(engine, next_week, ["user_features"])


def raw_digests(engine) -> list[tuple]:
    with engine.connect() as conn:
        query = "select table_name, as_of, digest, raw_digest from feature_snapshots order by table_name, as_of"
        return [tuple(r) for r in conn.execute(sa.text(query))]


def test_snapshots_computed_in_partitions_equal_the_whole_log_snapshots(
    flow_env, clean_stores, log, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="recsys.runtime")
    monkeypatch.setattr(runtime, "RELEASE_MIN_ROWS", 0)  # this log's weeks are small: release them anyway
    released = re.compile(r"feature week (\S+): memory released")
    spec = write_source(tmp_path / "src", log.events, log.items)
    whole = run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec).result()
    lineage = raw_digests(clean_stores.engine)
    # Once each week is written, before the next is computed (what the process freed goes back to the system).
    assert released.findall(caplog.text) == [str(LAST_WEEK), str(AS_OF)]
    caplog.clear()
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", "3")
    spilled, spill = [], partitioned.spill_partition_tables

    def recorded(part, folder):
        spilled.append(folder)
        return spill(part, folder)

    monkeypatch.setattr(partitioned, "spill_partition_tables", recorded)

    state = run_flow(as_of=AS_OF, backfill_from=LAST_WEEK, source=spec, force=True)

    assert state.result() == whole
    # On threads every partition's shares waited on disk for the merge, and are gone once merged.
    assert len(spilled) == 2 * 3 and {folder.parent.name for folder in spilled} == {str(LAST_WEEK), str(AS_OF)}
    assert not any(folder.exists() for folder in spilled)
    assert not any((Settings().data_dir / "feature-shares").glob("*"))
    assert raw_digests(clean_stores.engine) == lineage
    assert f"Read {log.events.height} events (0 duplicates dropped)" in artifact_text(state, ARTIFACT_KEY)
    assert released.findall(caplog.text) == [str(LAST_WEEK), str(AS_OF)]


def test_partitions_on_a_dask_cluster_give_the_same_snapshot_as_threads(
    flow_env, clean_stores, log, tmp_path, monkeypatch, caplog
):
    from distributed import LocalCluster

    spec = write_source(tmp_path / "src", log.events, log.items)
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", "2")
    threads = run_flow(as_of=AS_OF, source=spec).result()

    caplog.set_level(logging.INFO, logger="flows.common")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("RECSYS_DASK_ADDRESS", cluster.scheduler_address)
        on_dask = run_flow(as_of=AS_OF, source=spec, force=True).result()

    assert f"running partitions on the Dask cluster at {cluster.scheduler_address}" in caplog.text
    assert on_dask == threads
    assert set(on_dask[str(AS_OF)]) == {*FEATURE_TABLES, "labels"}


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_a_week_before_every_event_is_named_whole_or_in_partitions(
    partitions, flow_env, clean_stores, log, tmp_path, monkeypatch
):
    spec = write_source(tmp_path / "src", log.events, log.items)
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", partitions)

    state = run_flow(as_of=AS_OF - timedelta(weeks=52), source=spec)

    assert state.is_failed()
    assert "no events" in str(state.message) and "events.parquet" in str(state.message)
    assert dump_store(clean_stores.engine)["feature_snapshots"] == []


def test_the_backtest_builds_the_collaborative_scores_the_flow_stores(flow_env, clean_stores, log, tmp_path):
    spec = write_source(tmp_path / "src", log.events, log.items)
    run_flow(as_of=AS_OF, source=spec).result()
    # EASE's lists as stored, ALS's computed from the stored factors for every user (as readers do).
    stored = read_tables(clean_stores.engine, AS_OF).collaborative_scores
    settings = Settings()
    options = {k: v for k, v in backtest_options(settings).items() if k in ("recent_items", "neighbours",
               "collaborative", "collaborative_items")}  # fmt: skip

    # The backtest's in-memory snapshot, from the raw log as the training flow's backtest reads it.
    built = backtest._Snapshots(read_source(spec), options).tables(AS_OF).collaborative_scores

    assert stored.height > 0 and stored["ease_score"].null_count() < stored.height > stored["als_score"].null_count()
    assert_frame_equal(built, stored, check_exact=True)


@pytest.mark.parametrize("partitions", ["1", "3"])  # 3: its rows are checked one user partition at a time
def test_a_bad_collaborative_scores_table_fails_validation_and_nothing_is_written(
    partitions, flow_env, clean_stores, log, tmp_path, monkeypatch
):
    engine = clean_stores.engine
    monkeypatch.setenv("RECSYS_FEATURE_PARTITIONS", partitions)
    seed_snapshot(engine, log, LAST_WEEK)
    before = dump_store(engine)
    build = transform.build_collaborative_tables

    def with_a_duplicate_and_a_nan(*args, **kwargs):
        tables = build(*args, **kwargs)
        scores = tables[contracts.COLLABORATIVE_SCORES.name]
        bad = pl.concat([scores, scores.head(1).with_columns(ease_score=float("nan"))])
        return tables | {contracts.COLLABORATIVE_SCORES.name: bad}

    monkeypatch.setattr(transform, "build_collaborative_tables", with_a_duplicate_and_a_nan)

    state = run_flow(as_of=AS_OF, source=write_source(tmp_path / "src", log.events, log.items))

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ValidationFailed)
    assert [r.table for r in error.reports] == ["collaborative_scores"]
    assert "expect_compound_columns_to_be_unique(as_of, user_id, item_id)" in str(error)
    assert "expect_column_values_to_be_finite(ease_score)" in str(error)
    assert feature_rows(dump_store(engine)) == feature_rows(before)
    assert not store.snapshot_passed(engine, AS_OF, FEATURE_TABLES)
