"""The Postgres feature store: atomic snapshot writes, failure bookkeeping, typed reads."""

from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal

from features import store
from features.contracts import CONTRACTS, LABELS, USER_CATEGORY_AFFINITY, TableContract
from features.validation import ValidationFailed, ValidationReport, profile_table

pytestmark = pytest.mark.integration

AS_OF = date(2024, 3, 4)


def build_affinity(as_of: date, users: list[int], share: float = 0.5) -> pl.DataFrame:
    """Two categories per user, one of them the empty string (must survive the round trip)."""
    return pl.DataFrame(
        {
            "as_of": [as_of] * (2 * len(users)),
            "user_id": [u for u in users for _ in range(2)],
            "category": ["", 'rock, "indie"'] * len(users),
            "events_12w": [3, 1_000_000_000_000] * len(users),
            "share_12w": [share, 1 / 3] * len(users),
        },
        schema=USER_CATEGORY_AFFINITY.schema,
    )


def build_labels(as_of: date, users: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "as_of": [as_of] * len(users),
            "user_id": users,
            "item_id": [10 * u for u in users],
            "events": [1] * len(users),
            "weight": [1e-300, *[0.1 + 0.2] * (len(users) - 1)],
            "is_new": [u % 2 == 0 for u in users],
        },
        schema=LABELS.schema,
    )


def passed_report(contract: TableContract, frame: pl.DataFrame, as_of: date) -> ValidationReport:
    return ValidationReport(
        table=contract.name,
        as_of=as_of,
        success=True,
        row_count=frame.height,
        profile=profile_table(contract, frame),
    )


def failed_report(contract: TableContract, as_of: date) -> ValidationReport:
    failure = {
        "expectation": "expect_column_values_to_be_between",
        "columns": ["share_12w"],
        "expected": {"min_value": 0, "max_value": 1},
        "observed": None,
        "unexpected_count": 1,
        "examples": [1.5],
    }
    return ValidationReport(contract.name, as_of, False, 4, failures=[failure])


def write(engine, as_of: date, frames: dict[str, pl.DataFrame], flow_run_id="run-1"):
    reports = {t: passed_report(CONTRACTS[t], f, as_of) for t, f in frames.items()}
    return store.write_snapshot(engine, as_of, frames, reports, flow_run_id=flow_run_id)


def dump_store(engine) -> dict[str, list[tuple]]:
    """Every row of every feature-store table, for before/after comparisons."""
    tables = [*CONTRACTS, "feature_snapshots", "feature_validation_runs"]
    with engine.connect() as conn:
        return {t: sorted(map(tuple, conn.execute(sa.text(f'select * from "{t}"'))), key=repr) for t in tables}


@pytest.fixture
def engine(clean_stores):
    store.ensure_schema(clean_stores.engine)
    return clean_stores.engine


def test_write_then_read_round_trips_rows_and_types(engine):
    affinity, labels = build_affinity(AS_OF, [3, 1, 2]), build_labels(AS_OF, [1, 2, 3])

    digests = write(engine, AS_OF, {"user_category_affinity": affinity, "labels": labels})

    read_affinity = store.read_table(engine, "user_category_affinity", AS_OF)
    assert_frame_equal(read_affinity, affinity.sort("user_id", "category"))
    assert_frame_equal(store.read_table(engine, "labels", AS_OF), labels)
    assert set(digests) == {"user_category_affinity", "labels"}
    summary = store.snapshot_summary(engine, AS_OF)
    assert summary.to_dicts() == [
        {"table_name": "labels", "row_count": 3, "passed": True, "digest": digests["labels"]},
        {
            "table_name": "user_category_affinity",
            "row_count": 6,
            "passed": True,
            "digest": digests["user_category_affinity"],
        },
    ]


def test_read_filters_users_and_selects_columns_in_requested_order(engine):
    write(engine, AS_OF, {"labels": build_labels(AS_OF, [1, 2, 3, 4])})

    frame = store.read_table(engine, "labels", AS_OF, user_ids=[4, 2, 99], columns=["is_new", "user_id"])

    assert frame.schema == pl.Schema({"is_new": pl.Boolean, "user_id": pl.Int64})
    assert frame.to_dicts() == [{"is_new": True, "user_id": 2}, {"is_new": True, "user_id": 4}]
    assert store.read_table(engine, "labels", AS_OF, user_ids=[]).height == 0


def test_read_rejects_unknown_tables_columns_and_user_filter_without_user_id(engine):
    with pytest.raises(ValueError, match="unknown feature table 'users; drop'"):
        store.read_table(engine, "users; drop", AS_OF)
    with pytest.raises(ValueError, match="labels has no columns \\['nope'\\]"):
        store.read_table(engine, "labels", AS_OF, columns=["nope"])
    with pytest.raises(ValueError, match="item_features has no user_id"):
        store.read_table(engine, "item_features", AS_OF, user_ids=[1])


def test_rewrite_of_same_as_of_replaces_rows_and_keeps_digest_for_same_data(engine):
    other_week = AS_OF - timedelta(days=7)
    write(engine, other_week, {"labels": build_labels(other_week, [1, 2])})
    first = write(engine, AS_OF, {"labels": build_labels(AS_OF, [1, 2, 3])})

    again = write(engine, AS_OF, {"labels": build_labels(AS_OF, [1, 2, 3]).reverse()})
    assert again == first
    assert store.read_table(engine, "labels", AS_OF).height == 3

    changed = write(engine, AS_OF, {"labels": build_labels(AS_OF, [5])})
    assert changed != first
    assert store.read_table(engine, "labels", AS_OF)["user_id"].to_list() == [5]
    assert store.read_table(engine, "labels", other_week).height == 2
    assert store.snapshot_summary(engine, AS_OF)["row_count"].to_list() == [1]


def test_failing_report_writes_nothing_at_all(engine):
    write(engine, AS_OF, {"labels": build_labels(AS_OF, [1, 2])})
    before = dump_store(engine)
    affinity = build_affinity(AS_OF, [1, 2])
    labels = build_labels(AS_OF, [7, 8, 9])

    with pytest.raises(ValidationFailed, match="user_category_affinity.*share_12w"):
        store.write_snapshot(
            engine,
            AS_OF,
            {"user_category_affinity": affinity, "labels": labels},
            {
                "user_category_affinity": failed_report(USER_CATEGORY_AFFINITY, AS_OF),
                "labels": passed_report(LABELS, labels, AS_OF),
            },
            flow_run_id="run-2",
        )

    assert dump_store(engine) == before


def test_failed_rerun_keeps_the_previous_passed_snapshot_readable(engine):
    affinity = build_affinity(AS_OF, [1, 2])
    digest = write(engine, AS_OF, {"user_category_affinity": affinity})["user_category_affinity"]

    store.record_failed_validation(
        engine,
        AS_OF,
        {"user_category_affinity": failed_report(USER_CATEGORY_AFFINITY, AS_OF)},
        flow_run_id="run-2",
    )

    assert store.read_table(engine, "user_category_affinity", AS_OF).height == 4
    assert store.snapshot_summary(engine, AS_OF).to_dicts() == [
        {"table_name": "user_category_affinity", "row_count": 4, "passed": True, "digest": digest}
    ]
    with engine.connect() as conn:
        runs = conn.execute(sa.text("select passed, flow_run_id from feature_validation_runs order by id")).all()
    assert [tuple(r) for r in runs] == [(True, "run-1"), (False, "run-2")]


def test_failed_validation_of_a_new_as_of_is_recorded_and_unreadable(engine):
    report = failed_report(USER_CATEGORY_AFFINITY, AS_OF)

    store.record_failed_validation(engine, AS_OF, {"user_category_affinity": report}, flow_run_id="run-1")

    summary = store.snapshot_summary(engine, AS_OF).to_dicts()
    assert summary == [{"table_name": "user_category_affinity", "row_count": 4, "passed": False, "digest": None}]
    with pytest.raises(store.SnapshotUnavailable, match="affinity.*2024-03-04.*failed"):
        store.read_table(engine, "user_category_affinity", AS_OF)
    with pytest.raises(store.SnapshotUnavailable, match="labels.*never written"):
        store.read_table(engine, "labels", AS_OF)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("select report from feature_snapshots")).scalar_one()
    assert stored["failures"][0]["columns"] == ["share_12w"]


def test_write_that_fails_midway_rolls_back_every_table(engine):
    write(engine, AS_OF, {"labels": build_labels(AS_OF, [1, 2])})
    before = dump_store(engine)
    duplicated = pl.concat([build_affinity(AS_OF, [1]), build_affinity(AS_OF, [1])])

    # The duplicate key slipped past validation: the primary key stops it inside the write.
    with pytest.raises(sa.exc.IntegrityError, match=r"(?s)user_category_affinity.*is duplicated"):
        write(
            engine,
            AS_OF,
            {"labels": build_labels(AS_OF, [5, 6, 7]), "user_category_affinity": duplicated},
        )

    assert dump_store(engine) == before


def test_write_rejects_rows_of_another_as_of_and_mismatched_reports(engine):
    labels = build_labels(AS_OF, [1])
    with pytest.raises(ValueError, match="labels: 1 rows have an as_of other than 2024-03-11"):
        write(engine, AS_OF + timedelta(days=7), {"labels": labels})
    with pytest.raises(ValueError, match="must name the same tables"):
        store.write_snapshot(engine, AS_OF, {"labels": labels}, {}, flow_run_id=None)
    other_frame = {"labels": passed_report(LABELS, build_labels(AS_OF, [1, 2]), AS_OF)}
    with pytest.raises(ValueError, match="with 2 rows, the frame has 1"):
        store.write_snapshot(engine, AS_OF, {"labels": labels}, other_frame, flow_run_id=None)
    assert store.passed_as_ofs(engine, "labels") == []


def test_concurrent_writes_of_one_as_of_leave_exactly_one_copy(engine):
    labels = build_labels(AS_OF, list(range(1, 20_001)))

    with ThreadPoolExecutor(max_workers=3) as pool:
        digests = list(pool.map(lambda _: write(engine, AS_OF, {"labels": labels}), range(3)))

    assert digests[0] == digests[1] == digests[2]
    assert_frame_equal(store.read_table(engine, "labels", AS_OF), labels)


def test_snapshot_queries_see_only_passed_snapshots(engine):
    weeks = [AS_OF - timedelta(days=14), AS_OF - timedelta(days=7), AS_OF]
    for week in weeks[:2]:
        write(engine, week, {"labels": build_labels(week, [1, 2, 3])})
    store.record_failed_validation(engine, AS_OF, {"labels": failed_report(LABELS, AS_OF)}, flow_run_id=None)

    assert store.passed_as_ofs(engine, "labels") == weeks[:2]
    assert store.passed_as_ofs(engine, "user_features") == []
    recent = store.read_recent_profiles(engine, {"labels": AS_OF}, 1)["labels"]
    assert [p["row_count"] for p in recent] == [3]
    assert len(store.read_recent_profiles(engine, {"labels": AS_OF}, 4)["labels"]) == 2  # the failed one is left out
    assert store.read_recent_profiles(engine, {"labels": weeks[0]}, 4) == {"labels": []}
    assert store.snapshot_passed(engine, weeks[1], ["labels"])
    assert not store.snapshot_passed(engine, weeks[1], ["labels", "user_features"])
    assert not store.snapshot_passed(engine, AS_OF, ["labels"])


def test_snapshot_queries_answer_empty_before_schema_exists(clean_stores):
    engine = clean_stores.engine

    assert store.passed_as_ofs(engine, "user_features") == []
    assert store.passed_as_ofs(engine, "labels") == []
    assert store.snapshot_summary(engine, AS_OF).is_empty()
    with pytest.raises(store.SnapshotUnavailable, match="never written"):
        store.read_table(engine, "user_features", AS_OF)


def test_concurrent_ensure_schema_calls_all_succeed(clean_stores):
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: store.ensure_schema(clean_stores.engine), range(4)))

    with clean_stores.engine.connect() as conn:
        tables = set(conn.execute(sa.text("select tablename from pg_tables where schemaname = 'public'")).scalars())
    assert tables == {*CONTRACTS, "feature_snapshots", "feature_validation_runs"}


def test_ensure_schema_names_a_table_whose_columns_differ_from_its_contract(clean_stores):
    with clean_stores.engine.begin() as conn:
        conn.execute(sa.text("create table user_features (as_of date, user_id bigint)"))

    with pytest.raises(RuntimeError, match="user_features .* migrate or drop"):
        store.ensure_schema(clean_stores.engine)
