"""inference.checks: a new publication's numbers against the live one and the bounds, on tiny frames."""

import polars as pl
import pytest

from inference.checks import CheckBounds, check_publication, compare_lists

CATALOGUE = pl.Series("item_id", [1, 2, 3, 4, 5, 6], pl.Int64)


def lists(rows: dict[int, list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": list(rows), "items": list(rows.values())},
        schema={"user_id": pl.Int64, "items": pl.List(pl.Int64)},
    )


def check(new, live=None, *, fallback_users=0, snapshot_changed=True, **bounds):
    return check_publication(
        new, live, CATALOGUE, fallback_users=fallback_users, snapshot_changed=snapshot_changed,
        bounds=CheckBounds(**bounds),
    )  # fmt: skip


NEW = lists({1: [1, 2, 3], 2: [2, 1, 4], 3: [3, 5, 6], 4: [4, 1, 2]})


def test_a_varied_publication_is_within_the_default_bounds_with_its_numbers():
    report = check(NEW, lists({1: [1, 2, 3], 2: [1, 2, 5], 5: [6]}), fallback_users=1)

    assert report.reasons == ()
    assert (report.users, report.fallback_users, report.fallback_share) == (4, 1, 0.2)
    assert report.changed_share == 4 / 5  # users 2, 3, 4 and 5 (only live) changed; user 1 did not
    assert report.median_overlap == pytest.approx((1 + 2 / 3) / 2)
    assert report.coverage == 1.0 and report.unknown_items == 0
    assert (report.min_length, report.median_length) == (3, 3.0)
    assert report.top_item_share == 0.25


def test_without_a_live_version_nothing_is_compared():
    report = check(NEW)

    assert (report.changed_share, report.median_overlap, report.reasons) == (None, None, ())


def test_everyone_getting_the_same_list_is_held_for_concentration():
    same = lists({user: [1, 2, 3] for user in range(1, 11)})

    (reason,) = check(same).reasons

    assert "100.0% of lists start with the same item" in reason and "max_top_item_share 0.98" in reason
    assert check(same, max_top_item_share=1.0).reasons == ()


def test_items_missing_from_the_item_table_are_held():
    (reason,) = check(lists({1: [1, 99], 2: [2, 98]})).reasons

    assert reason.startswith("2 recommended items are not in the snapshot's item table")
    assert check(lists({1: [1, 99], 2: [2, 98]}), max_unknown_items=2).reasons == ()


def test_lists_shorter_than_the_minimum_are_held():
    report = check(lists({1: [1], 2: [2, 3]}), min_list_length=2)

    assert report.reasons == ("the shortest list has 1 items (below min_list_length 2)",)


def test_too_many_users_on_the_fallback_is_held_and_the_bound_itself_passes():
    (reason,) = check(NEW.head(1), fallback_users=10, max_top_item_share=1).reasons
    assert reason == "90.9% of users get the fallback (above max_fallback_share 0.9)"
    assert check(NEW.head(1), fallback_users=9, max_top_item_share=1).reasons == ()  # 90% is the bound


def test_unchanged_lists_are_held_only_when_the_snapshot_changed():
    (reason,) = check(NEW, NEW).reasons
    assert "no user's list changed although the feature snapshot did" in reason

    assert check(NEW, NEW, snapshot_changed=False).reasons == ()
    assert check(NEW, NEW, hold_unchanged=False).reasons == ()
    assert check(NEW, lists({**dict(NEW.rows()), 4: [4, 2, 1]})).reasons == ()  # one order changed


def test_no_personal_list_at_all_is_held_for_the_fallback_share_only():
    empty = NEW.clear()

    report = check(empty, NEW, fallback_users=4, snapshot_changed=False)

    assert (report.users, report.min_length, report.median_length, report.top_item_share) == (0, 0, 0.0, 0.0)
    assert report.coverage == 0.0 and report.changed_share == 1.0 and report.median_overlap is None
    assert report.reasons == ("100.0% of users get the fallback (above max_fallback_share 0.9)",)


def test_an_empty_publication_without_users_passes():
    assert check(NEW.clear()).reasons == ()


def test_compare_lists_counts_order_changes_and_users_on_one_side():
    changed, overlap = compare_lists(lists({1: [1, 2], 2: [3, 4]}), lists({1: [2, 1], 3: [5]}))

    assert changed == 1.0 and overlap == 1.0


def test_the_report_is_plain_json_values():
    report = check(lists({1: [1, 99], 2: [2]})).as_dict()

    assert report["reasons"] == ["1 recommended items are not in the snapshot's item table (above max_unknown_items 0)"]
    assert report["users"] == 2 and report["coverage"] == 2 / 6
