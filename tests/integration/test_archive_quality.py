"""The archive of published lists and the realized-quality table, on the session's real Postgres."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa

from features import store
from features.contracts import CONTRACTS
from features.validation import ValidationReport
from inference import archive, publications, quality
from ranking import registry
from ranking.candidates import SOURCES, CandidateConfig, SnapshotTables, source_counts

pytestmark = pytest.mark.integration

W1, W2, W3 = date(2026, 11, 9), date(2026, 11, 16), date(2026, 11, 23)
V1, V2, V3 = "20261109-000001", "20261116-000002", "20261123-000003"
PREFIX = "recs"


def lists(**by_user: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [int(u.removeprefix("u")) for u in by_user], "items": list(by_user.values())},
        schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)},
    )


def go_live(engine, version: str, at: datetime, previous: str | None, action: str = "publish") -> None:
    """A pointer move at a chosen time (record_pointer_move stamps now())."""
    with engine.begin() as conn:
        conn.execute(
            sa.insert(publications.history).values(
                at=at, prefix=PREFIX, action=action, from_version=previous, to_version=version, reason="test", actor="t"
            )
        )


def monday(week: date) -> datetime:
    return datetime(week.year, week.month, week.day, tzinfo=UTC)


@pytest.fixture
def engine(clean_stores):
    for module in (publications, archive, quality):
        module.ensure_schema(clean_stores.engine)
    return clean_stores.engine


@pytest.fixture
def two_weeks(engine):
    """V1 served week W1 and V2 week W2 (each live from Monday 05:00); V3 is live now."""
    archive.archive_lists(engine, V1, lists(u1=[11, 12], u2=[13]))
    archive.archive_fallback(engine, V1, [90, 91])
    archive.archive_lists(engine, V2, lists(u1=[21, 22, 23]))
    archive.archive_fallback(engine, V2, [92])
    archive.archive_lists(engine, V3, lists(u1=[31]))
    archive.archive_fallback(engine, V3, [93])
    previous = None
    for version, week in ((V1, W1), (V2, W2), (V3, W3)):
        go_live(engine, version, monday(week) + timedelta(hours=5), previous)
        previous = version
    return engine


def test_served_list_answers_each_past_week_after_a_later_version_went_live(two_weeks):
    assert archive.served_list(two_weeks, 1, W1, prefix=PREFIX) == ("20261109-000001", [11, 12], False)
    assert archive.served_list(two_weeks, 2, W1, prefix=PREFIX) == (V1, [13], False)
    assert archive.served_list(two_weeks, 1, W2, prefix=PREFIX) == (V2, [21, 22, 23], False)
    # User 2 had no list in V2, user 7 never had one: both saw that week's fallback.
    assert archive.served_list(two_weeks, 2, W2, prefix=PREFIX) == (V2, [92], True)
    assert archive.served_list(two_weeks, 7, W1, prefix=PREFIX) == (V1, [90, 91], True)


def test_served_recommendations_carry_the_publication_lineage(two_weeks):
    publications.record_publication(two_weeks, version=V2, as_of=W2, status="live", model_version=4)

    first, second = archive.served_recommendations(two_weeks, [1, 2], W2, prefix=PREFIX)

    assert (first.items, first.version, first.as_of, first.model_version, first.is_fallback) == (
        [21, 22, 23], V2, W2, "4", False,
    )  # fmt: skip
    assert (second.items, second.is_fallback) == ([92], True)


def test_a_week_never_published_names_the_published_weeks_nearby(two_weeks):
    with pytest.raises(
        archive.ArchiveMissing, match=r"week 2026-12-07 was never published.*'2026-11-16', '2026-11-23'"
    ):
        archive.served_list(two_weeks, 1, date(2026, 12, 7), prefix=PREFIX)
    with pytest.raises(archive.ArchiveMissing, match="never published under prefix 'other'.*none"):
        archive.served_list(two_weeks, 1, W1, prefix="other")


def test_a_version_missing_from_the_archive_names_the_user_and_the_version(engine):
    go_live(engine, V1, monday(W1), None)

    with pytest.raises(archive.ArchiveMissing, match=f"user 5, week {W1}: version {V1} has no archived lists"):
        archive.served_list(engine, 5, W1, prefix=PREFIX)


def test_archiving_a_version_again_replaces_its_lists(two_weeks):
    archive.archive_lists(two_weeks, V2, lists(u2=[40, 41]))

    assert archive.read_lists(two_weeks, V2).to_dicts() == [{"user_id": 2, "items": [40, 41]}]
    assert archive.served_list(two_weeks, 1, W2, prefix=PREFIX) == (V2, [92], True)
    assert archive.read_lists(two_weeks, V1)["user_id"].to_list() == [1, 2]


def test_a_version_with_no_personal_lists_archives_and_reads_empty(engine):
    archive.archive_lists(engine, V1, lists())

    assert archive.read_lists(engine, V1).is_empty()


def test_lists_that_are_not_publishable_are_refused_before_anything_is_written(engine):
    with pytest.raises(ValueError, match="empty item lists"):
        archive.archive_lists(engine, V1, lists(u1=[]))
    with pytest.raises(ValueError, match="not a publication version"):
        archive.archive_lists(engine, "2026'; drop table x; --", lists(u1=[1]))

    assert archive.archived_versions(engine) == []


def test_retention_drops_versions_older_than_the_kept_weeks(two_weeks):
    assert archive.drop_old(two_weeks, keep_weeks=52) == []

    assert archive.drop_old(two_weeks, keep_weeks=1) == [V1, V2]

    assert archive.archived_versions(two_weeks) == [V3]
    with pytest.raises(archive.ArchiveMissing, match="dropped by retention"):
        archive.served_list(two_weeks, 1, W1, prefix=PREFIX)
    assert archive.served_list(two_weeks, 1, W3, prefix=PREFIX) == (V3, [31], False)


def write_week(engine, week: date) -> None:
    """A passed snapshot as_of=week (items 1..6, users 1-3) and its labels."""
    history = {"user_id": [1, 2, 3, 3], "item_id": [1, 2, 1, 2]}
    columns = {
        "user_features": {"user_id": [1, 2, 3]},
        "item_features": {
            "item_id": list(range(1, 7)), "plays_4w": [60, 50, 40, 30, 20, 10],
            "popularity_rank_4w": list(range(1, 7)), "days_since_release": [300.0] * 4 + [10.0, 3.0],
        },
        "item_neighbours": {"item_id": [1], "neighbour_id": [3], "score": [1.0], "rank": [1]},
        "user_category_affinity": {"user_id": [1], "share_12w": [1.0]},
        "user_creator_affinity": {"user_id": [1], "share_12w": [1.0]},
        "user_item_history": history | {"events": [1] * 4},
        "collaborative_scores": {"user_id": [], "item_id": []},  # no cf candidates in this tiny week
        "als_user_factors": {"user_id": []},
        "als_item_factors": {"item_id": []},
        "item_transitions": {"item_id": [], "next_item_id": []},  # no seq candidates either
        "labels": {"user_id": [1, 2, 3, 4], "item_id": [3, 4, 6, 1], "is_new": [True] * 4},
    }  # fmt: skip
    for name, given in columns.items():
        contract = CONTRACTS[name]
        n = len(next(iter(given.values())))
        defaults = {c.name: ["x"] * n if c.dtype == pl.Utf8 else [0] * n for c in contract.columns}
        frame = contract.conform(pl.DataFrame(defaults | {"as_of": [week] * n} | given))
        report = ValidationReport(name, week, True, frame.height)
        store.write_snapshot(engine, week, {name: frame}, {name: report}, flow_run_id=None)


def test_measure_week_stores_one_row_per_week_and_a_recompute_replaces_it(two_weeks):
    store.ensure_schema(two_weeks)
    write_week(two_weeks, W2)
    archive.archive_lists(two_weeks, V2, lists(u1=[3, 5], u2=[5, 4]))

    first = quality.measure_week(two_weeks, W2, prefix=PREFIX, config=CandidateConfig(), k=10)

    tables = SnapshotTables.from_frames({t: store.read_table(two_weeks, t, W2) for t in CONTRACTS if t != "labels"})
    labels = store.read_table(two_weeks, "labels", W2)
    expected = quality.measure_realized_quality(
        lists(u1=[3, 5], u2=[5, 4]), [92], tables, labels, CandidateConfig(), k=10
    )
    assert first == {"as_of": W2, "version": V2, "model_version": None, **expected}

    archive.archive_lists(two_weeks, V2, lists(u1=[3], u2=[4], u3=[6]))
    second = quality.measure_week(two_weeks, W2, prefix=PREFIX, config=CandidateConfig(), k=10)

    stored = quality.quality_series(two_weeks, weeks=10)
    assert stored.height == 1 and stored["ndcg"].to_list() == [second["ndcg"]] == [1.0]
    assert second["ndcg"] > first["ndcg"]


def test_measuring_a_week_without_labels_says_when_they_will_exist(two_weeks):
    store.ensure_schema(two_weeks)

    with pytest.raises(store.SnapshotUnavailable, match="week 2026-11-16 cannot be measured yet.*ran for 2026-11-23"):
        quality.measure_week(two_weeks, W2, prefix=PREFIX, config=CandidateConfig())


def test_quality_series_keeps_the_last_weeks_oldest_first(engine):
    names = [c.name for c in quality.realized_quality.columns if c.name not in ("as_of", "version", "computed_at")]
    row = dict.fromkeys(names, 0)
    with engine.begin() as conn:
        for week in (W1, W2, W3):
            conn.execute(sa.insert(quality.realized_quality).values(row | {"as_of": week, "version": V1}))

    assert quality.quality_series(engine, weeks=2)["as_of"].to_list() == [W2, W3]


def test_cli_shows_the_quality_series_and_what_a_user_was_served_in_a_past_week(two_weeks, settings, capsys):
    import argparse

    from cli import publish as publish_cli
    from cli import quality as quality_cli

    quality_cli.cmd_quality(argparse.Namespace(weeks=4, json=False), settings)
    assert "measured weeks: none" in capsys.readouterr().out

    publish_cli.cmd_recs(argparse.Namespace(user_ids=[1, 2], week=W2, json=True), settings)
    assert capsys.readouterr().out.splitlines() == [
        f'{{"user_id":1,"items":[21,22,23],"model_version":"","as_of":"{W2}","version":"{V2}","fallback":false}}',
        f'{{"user_id":2,"items":[92],"model_version":"","as_of":"{W2}","version":"{V2}","fallback":true}}',
    ]


def test_the_lists_read_back_from_redis_archive_as_published(engine, clean_stores):
    from tests.helpers import publish_recommendations

    published = lists(u1=[5, 4, 3], u12=[7], u3=[1, 2])
    metadata = {"model_version": "1", "generated_at": "2026-11-23T05:00:00+00:00", "n": 3, "fallback_user_count": 0}
    result = publish_recommendations(clean_stores.redis, PREFIX, W3, published, [9], metadata)

    found = archive.read_published_lists(clean_stores.redis, PREFIX, result.version)
    archive.archive_lists(engine, result.version, found)

    assert archive.read_lists(engine, result.version).to_dicts() == published.sort("user_id").to_dicts()


def test_a_week_is_measured_on_the_candidates_of_the_model_that_served_it(two_weeks):
    store.ensure_schema(two_weeks)
    registry.ensure_schema(two_weeks)
    write_week(two_weeks, W2)
    archive.archive_lists(two_weeks, V2, lists(u1=[3, 5], u2=[5, 4]))
    counts = dict.fromkeys(SOURCES, 0) | {"pop": 1}  # one candidate per user: most truth is not a candidate
    version = registry.register_model(
        two_weeks, name="m", kind="baseline", model_text="", feature_names=[], encodings={},
        params={"baseline": "recent_popular", "candidates": counts}, metrics={}, as_of=W1, training_as_ofs=[],
        validation_as_of=None, holdout_as_of=None, feature_snapshots={},
    )  # fmt: skip
    publications.record_publication(two_weeks, version=V2, as_of=W2, model_name="m", model_version=version,
                                    status="live")  # fmt: skip

    served = archive.served_candidates(two_weeks, V2, CandidateConfig())
    measured = quality.measure_week(two_weeks, W2, prefix=PREFIX, config=CandidateConfig(), k=10)

    assert source_counts(served) == counts and served.recent_items == CandidateConfig().recent_items
    tables = SnapshotTables.from_frames({t: store.read_table(two_weeks, t, W2) for t in CONTRACTS if t != "labels"})
    labels = store.read_table(two_weeks, "labels", W2)
    narrow = quality.measure_realized_quality(lists(u1=[3, 5], u2=[5, 4]), [92], tables, labels, served, k=10)
    wide = quality.measure_realized_quality(lists(u1=[3, 5], u2=[5, 4]), [92], tables, labels, CandidateConfig(), k=10)
    assert measured["not_candidate_share"] == narrow["not_candidate_share"] > wide["not_candidate_share"]
    # A publication without lineage (or whose model is gone) is measured on the run's candidates.
    assert archive.served_candidates(two_weeks, V1, CandidateConfig()) == CandidateConfig()
