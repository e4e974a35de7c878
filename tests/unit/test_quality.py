"""Realized quality on tiny hand-made weeks: the served lists' metrics, exposure, the degradation rule."""

import math
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from features import contracts
from inference import archive, charts, quality
from ranking.candidates import CandidateConfig, SnapshotTables

WEEK = date(2026, 11, 23)


def gain(position: int) -> float:
    return 1 / math.log2(position + 1)


def table(contract: contracts.TableContract, **columns: list) -> pl.DataFrame:
    """A frame of `contract` with the given columns; every other column zero (or 'x' for text)."""
    n = len(next(iter(columns.values())))
    defaults = {c.name: ["x"] * n if c.dtype == pl.Utf8 else [0] * n for c in contract.columns}
    return contract.conform(pl.DataFrame(defaults | {"as_of": [WEEK] * n} | columns))


def tiny_week() -> tuple[SnapshotTables, pl.DataFrame]:
    """Items 1..6, most played first (item 5 and 6 new); users 1-3 with history, user 4 new.

    Labels: user 1 discovers 3 (and replays 1), user 2 discovers 4, user 3 discovers 6, new user 4 plays 1.
    """
    items = table(
        contracts.ITEM_FEATURES,
        item_id=[1, 2, 3, 4, 5, 6],
        plays_4w=[60, 50, 40, 30, 20, 10],
        popularity_rank_4w=[1, 2, 3, 4, 5, 6],
        days_since_release=[300.0, 300.0, 300.0, 300.0, 10.0, 3.0],
    )
    history = table(contracts.USER_ITEM_HISTORY, user_id=[1, 2, 3, 3], item_id=[1, 2, 1, 2], events=[1, 1, 1, 1])
    tables = SnapshotTables(
        user_features=table(contracts.USER_FEATURES, user_id=[1, 2, 3]),
        item_features=items,
        item_neighbours=table(contracts.ITEM_NEIGHBOURS, item_id=[1], neighbour_id=[3], score=[1.0], rank=[1]),
        user_category_affinity=table(contracts.USER_CATEGORY_AFFINITY, user_id=[1], share_12w=[1.0]),
        user_creator_affinity=table(contracts.USER_CREATOR_AFFINITY, user_id=[1], share_12w=[1.0]),
        user_item_history=history,
        collaborative_scores=pl.DataFrame(schema=contracts.COLLABORATIVE_SCORES.schema),  # no cf candidates here
    )
    labels = table(
        contracts.LABELS, user_id=[1, 1, 2, 3, 4], item_id=[3, 1, 4, 6, 1], is_new=[True, False, True, True, True]
    )
    return tables, labels


LISTS = pl.DataFrame(
    {"user_id": [1, 2], "items": [[3, 5, 2], [5, 4]]}, schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)}
)
FALLBACK = [1, 2, 3]


def test_realized_metrics_equal_a_hand_computation_and_score_fallback_users_on_the_fallback():
    tables, labels = tiny_week()

    result = quality.measure_realized_quality(LISTS, FALLBACK, tables, labels, CandidateConfig(), k=10)

    # Evaluated: users 1-3 (user 4 has no earlier event). User 3 has no list: the fallback [1,2,3] misses 6.
    assert (result["users"], result["truth_items"]) == (3, 3)
    assert result["ndcg"] == pytest.approx((gain(1) + gain(2) + 0) / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["hitrate"] == pytest.approx(2 / 3)
    # Recent popularity without consumed items: u1 [2,3,..] hit at 2, u2 [1,3,4,..] at 3, u3 [3,4,5,6] at 4.
    assert result["popular_ndcg"] == pytest.approx((gain(2) + gain(3) + gain(4)) / 3)
    assert result["popular_hitrate"] == 1.0
    # Item-kNN: 3 neighbours item 1 (users 1 and 3), then popularity fills.
    assert result["knn_ndcg"] == pytest.approx((gain(1) + gain(3) + gain(4)) / 3)


def test_a_perfect_served_list_scores_one():
    tables, labels = tiny_week()
    perfect = pl.DataFrame({"user_id": [1, 2, 3], "items": [[3], [4], [6]]})

    result = quality.measure_realized_quality(perfect, FALLBACK, tables, labels, CandidateConfig(), k=10)

    assert (result["ndcg"], result["recall"], result["hitrate"]) == (1.0, 1.0, 1.0)


def test_served_lists_give_fallback_users_the_fallback_in_order():
    served = quality.expand_served_lists(LISTS, [7, 8], pl.Series([2, 9]))

    assert served.to_dicts() == [
        {"user_id": 2, "item_id": 5, "rank": 1},
        {"user_id": 2, "item_id": 4, "rank": 2},
        {"user_id": 9, "item_id": 7, "rank": 1},
        {"user_id": 9, "item_id": 8, "rank": 2},
    ]


def test_exposure_counts_coverage_new_items_and_the_head_over_every_list_and_the_fallback():
    tables, _ = tiny_week()

    exposure = quality.measure_exposure(LISTS, FALLBACK, tables.item_features, new_release_days=28)

    # Lists [3,5,2], [5,4], fallback [1,2,3]: items 1-5 of 6; new item 5 in two lists of three;
    # the head is the top 10% (ceil(0.6) = 1 item: item 1), in 1 of 8 slots.
    assert exposure == pytest.approx(
        {"catalogue_coverage": 5 / 6, "new_items": 1, "new_item_list_share": 2 / 3, "head_share": 1 / 8}
    )


def test_fallback_share_counts_active_users_without_a_personal_list():
    _, labels = tiny_week()

    assert quality.measure_fallback_share(LISTS, labels) == {"active_users": 4, "fallback_share": 0.5}
    assert quality.measure_fallback_share(LISTS, labels.clear()) == {"active_users": 0, "fallback_share": 0.0}


def test_not_candidate_share_is_the_truth_the_candidates_miss():
    truth = pl.DataFrame({"user_id": [1, 2, 3], "item_id": [3, 4, 6]})
    candidates = pl.DataFrame({"user_id": [1, 2, 2], "item_id": [3, 5, 4]})

    assert quality.measure_not_candidate_share(candidates, truth) == pytest.approx(1 / 3)
    assert quality.measure_not_candidate_share(candidates, truth.clear()) == 0.0


def test_realized_quality_of_a_week_without_evaluated_users_is_zero():
    tables, labels = tiny_week()

    result = quality.measure_realized_quality(LISTS, FALLBACK, tables, labels.filter(pl.col("user_id") == 4),
                                              CandidateConfig(), k=10)  # fmt: skip

    assert (result["users"], result["ndcg"], result["not_candidate_share"]) == (0, 0.0, 0.0)
    assert result["fallback_share"] == 1.0


def series(*ndcgs: float, popular: float = 0.01) -> pl.DataFrame:
    weeks = [WEEK - timedelta(weeks=len(ndcgs) - 1 - i) for i in range(len(ndcgs))]
    return pl.DataFrame(
        {
            "as_of": weeks,
            "k": 10,
            "users": 100,
            "ndcg": list(ndcgs),
            "popular_ndcg": popular,
            "knn_ndcg": popular,
            "version": [f"{w:%Y%m%d}-000001" for w in weeks],
        }  # fmt: skip
    )


def test_degradation_below_recent_popularity_names_both_numbers():
    reasons = quality.degradation_reasons(series(0.10, 0.05, popular=0.06), WEEK, share=0.8, trailing_weeks=4)

    assert len(reasons) == 1 and "0.0500" in reasons[0] and "recent popularity's 0.0600" in reasons[0]


def test_degradation_below_share_of_the_trailing_median():
    reasons = quality.degradation_reasons(series(0.10, 0.12, 0.08, 0.11, 0.07), WEEK, share=0.8, trailing_weeks=4)

    # median(0.10, 0.12, 0.08, 0.11) = 0.105; 0.8 x 0.105 = 0.084 > 0.07
    assert len(reasons) == 1 and "median of the 4 weeks before" in reasons[0] and "0.1050" in reasons[0]


def test_no_trailing_alert_with_fewer_weeks_than_the_window():
    assert quality.degradation_reasons(series(0.10, 0.12, 0.02), WEEK, share=0.8, trailing_weeks=4) == []


def test_no_alert_when_quality_holds():
    steady = series(0.10, 0.12, 0.08, 0.11, 0.09)

    assert quality.degradation_reasons(steady, WEEK, share=0.8, trailing_weeks=4) == []
    assert quality.degradation_reasons(steady, WEEK - timedelta(weeks=1), share=0.8, trailing_weeks=4) == []


def test_degradation_of_an_unmeasured_week_is_an_error():
    with pytest.raises(ValueError, match="week 2026-11-30 is not in the quality series"):
        quality.degradation_reasons(series(0.1), WEEK + timedelta(weeks=1), share=0.8, trailing_weeks=4)


def full_series(*ndcgs: float) -> pl.DataFrame:
    frame = series(*ndcgs)
    defaults = {name: pl.lit(0.5) if dtype == pl.Float64 else pl.lit(3) for name, dtype in quality._SCHEMA.items()
                if name not in frame.columns and name != "computed_at"}  # fmt: skip
    return frame.with_columns(**defaults)


def test_markdown_has_the_warning_the_chart_and_one_row_per_week():
    text = quality.quality_markdown(full_series(0.1, 0.05), ["week 2026-11-23: served NDCG@10 dropped"], b"PNG")

    assert "> ⚠️ **Quality degraded**" in text and "> - week 2026-11-23: served NDCG@10 dropped" in text
    assert "(data:image/png;base64,UE5H)" in text
    assert "| 2026-11-23 | 20261123-000001 |" in text and "| 2026-11-16 |" in text
    assert "degraded" not in quality.quality_markdown(full_series(0.1), [])


def test_trend_chart_is_a_png():
    png = charts.draw_quality_trend(full_series(0.1, 0.12, 0.09))

    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1_000


def moves(*pairs: tuple[datetime, str]) -> pl.DataFrame:
    return pl.DataFrame({"at": [at for at, _ in pairs], "to_version": [v for _, v in pairs]},
                        schema={"at": pl.Datetime("us", "UTC"), "to_version": pl.String})  # fmt: skip


MONDAY = datetime(2026, 11, 23, tzinfo=UTC)


def test_the_served_version_is_the_one_live_longest_in_the_week():
    history = moves(
        (MONDAY - timedelta(days=7, hours=-5), "20261116-000001"),
        (MONDAY + timedelta(hours=5), "20261123-000002"),
        (MONDAY + timedelta(days=7, hours=5), "20261130-000003"),
    )

    assert archive.select_served_version(history, WEEK) == "20261123-000002"
    assert archive.select_served_version(history, WEEK - timedelta(weeks=1)) == "20261116-000001"


def test_a_rollback_early_in_the_week_makes_the_older_version_the_served_one():
    history = moves(
        (MONDAY - timedelta(days=7), "20261116-000001"),
        (MONDAY + timedelta(hours=5), "20261123-000002"),
        (MONDAY + timedelta(days=1), "20261116-000001"),
    )

    assert archive.select_served_version(history, WEEK) == "20261116-000001"


def test_a_week_whose_own_publication_never_went_live_was_never_published():
    history = moves((MONDAY - timedelta(days=7), "20261116-000001"))

    assert archive.select_served_version(history, WEEK) is None
    assert archive.select_served_version(history, WEEK + timedelta(weeks=5)) is None
    assert archive.select_served_version(moves(), WEEK) is None
