"""The same snapshot gives the same model: a week's ranking frame must be the same bits whatever order its
tables' rows were read in (Postgres promises no order, nor do polars' joins and group-bys)."""

from datetime import date, timedelta

import polars as pl
import pytest

from features.synthetic import generate_log
from features.transform import build_feature_tables, build_labels, week_start
from ranking.candidates import CandidateConfig, SnapshotTables, category_encoding
from training.frames import labelled_frame

AS_OF = date(2025, 3, 3)


@pytest.fixture(scope="module")
def snapshot() -> tuple[dict, pl.DataFrame, date]:
    raw = generate_log(n_users=200, n_items=150, n_events=12_000, n_weeks=6, end=week_start(AS_OF), seed=5)
    week = AS_OF - timedelta(days=7)
    tables = build_feature_tables(raw.events, raw.items, week, recent_items=20, neighbours=20)
    return tables, build_labels(raw.events, week), week


def frame_of(tables: dict, labels: pl.DataFrame, week: date) -> pl.DataFrame:
    snapshot = SnapshotTables.from_frames(tables)
    return labelled_frame(
        snapshot, labels, week, CandidateConfig(), category_encoding(snapshot.item_features),
        negatives_per_user=30, seed=1, max_users=None, batch_users=100,
    ).sort("as_of", "user_id", "item_id")  # fmt: skip


@pytest.mark.parametrize("shuffle_seed", [0, 1, 2])
def test_the_frame_is_the_same_bits_whatever_order_the_tables_were_read_in(snapshot, shuffle_seed):
    tables, labels, week = snapshot
    shuffled = {
        name: table.sample(fraction=1.0, shuffle=True, seed=shuffle_seed) if isinstance(table, pl.DataFrame) else table
        for name, table in tables.items()
    }
    expected = frame_of(tables, labels, week)
    got = frame_of(shuffled, labels.sample(fraction=1.0, shuffle=True, seed=shuffle_seed), week)
    assert got.height == expected.height > 0
    differing = [column for column in expected.columns if not got[column].equals(expected[column])]
    assert not differing, f"columns whose values depend on the input's row order: {differing}"
