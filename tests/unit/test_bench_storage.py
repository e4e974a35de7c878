"""The storage benchmark's projection: user-keyed tables grow with users, item-keyed ones stay as measured."""

import pytest

from benchmarks.storage import TableStore, project, render


def test_user_keyed_tables_scale_with_users_and_item_keyed_tables_do_not():
    stores = [TableStore("user_item_history", True, 1_000, 120_000), TableStore("item_features", False, 50, 9_000)]
    assert project(stores, measured_users=100, users=10_000) == {
        "user_item_history": 12_000_000,
        "item_features": 9_000,
    }


def test_projection_needs_a_measured_user_count():
    with pytest.raises(ValueError, match="measured_users must be positive"):
        project([TableStore("labels", True, 1, 1)], measured_users=0, users=10)


def test_the_table_shows_rows_per_user_per_snapshot_bytes_per_row_and_each_sizes_total():
    stores = [TableStore("user_item_history", True, 2_000, 240_000), TableStore("item_features", False, 20, 2_000)]
    text = render(stores, measured_users=100, snapshots=2, free_bytes=80 * 10**9)
    history = next(line for line in text.splitlines() if line.startswith("| user_item_history"))
    assert history.split(" | ")[1:3] == ["10.0", "120"]  # 2,000 rows / 2 snapshots / 100 users; bytes / rows
    assert "| 0.02 | 0.24 | 2.40 |" in history  # 240 kB × 10k/100k/1M users ÷ 100
    assert "Free disk where Postgres wrote: 80 GB." in text
