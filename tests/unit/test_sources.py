"""Raw sources: each spec form on tiny files, and every bad input named by its column."""

import math
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from features.contracts import RAW_EVENTS_SCHEMA, RAW_ITEMS_SCHEMA
from features.raw import RawDataError, validate_events
from features.sources import check_source_spec, read_source
from recsys.partitions import Partition, all_partitions, in_partition, partition_of


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def events_csv(tmp_path: Path) -> Path:
    return _write_csv(
        tmp_path / "events.csv",
        "user_id,item_id,ts\n"
        "1,10,2024-01-02T10:00:00Z\n"
        "2,11,2024-01-01 08:30:00+02:00\n"
        "1,11,2024-01-03\n"
        "3,12,2024-01-04T00:00:00.250000\n",
    )


def test_csv_source_parses_mixed_iso_timestamps_and_defaults_weight_to_one(events_csv):
    raw = read_source(f"csv:{events_csv}")

    assert raw.events.schema == RAW_EVENTS_SCHEMA
    assert raw.events.rows() == [
        (2, 11, _utc(2024, 1, 1, 6, 30), 1.0),
        (1, 10, _utc(2024, 1, 2, 10), 1.0),
        (1, 11, _utc(2024, 1, 3), 1.0),
        (3, 12, datetime(2024, 1, 4, 0, 0, 0, 250000, tzinfo=UTC), 1.0),
    ]


def test_source_without_items_derives_unknown_items_from_events(events_csv):
    raw = read_source(f"csv:{events_csv}")

    assert raw.items.schema == RAW_ITEMS_SCHEMA
    assert raw.items["item_id"].to_list() == [10, 11, 12]
    assert set(raw.items["category"]) == {"unknown"}
    assert set(raw.items["creator"]) == {"unknown"}
    assert raw.items["release_ts"].null_count() == 3


def test_csv_source_reads_every_file_matching_the_glob(tmp_path):
    _write_csv(tmp_path / "ev1.csv", "user_id,item_id,ts,weight\n1,10,1704067200,2.5\n")
    _write_csv(tmp_path / "ev2.csv", "user_id,item_id,ts,weight\n2,10,1704153600,1\n")

    raw = read_source(f"csv:{tmp_path}/ev*.csv")

    assert raw.events.rows() == [(1, 10, _utc(2024, 1, 1), 2.5), (2, 10, _utc(2024, 1, 2), 1.0)]


@pytest.mark.parametrize(
    "ts",
    [
        pl.Series([1704067200, 1704153600]),
        pl.Series([1704067200.0, 1704153600.0]),
        pl.Series([datetime(2024, 1, 1), datetime(2024, 1, 2)]),
        pl.Series([_utc(2024, 1, 1), _utc(2024, 1, 2)]).dt.convert_time_zone("Europe/Paris"),
    ],
    ids=["epoch-int", "epoch-float", "naive-datetime-as-utc", "aware-datetime"],
)
def test_parquet_source_accepts_epoch_seconds_and_datetimes(tmp_path, ts):
    path = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "ts": ts}).write_parquet(path)

    raw = read_source(f"parquet:{path}")

    assert raw.events["ts"].to_list() == [_utc(2024, 1, 1), _utc(2024, 1, 2)]


def test_items_file_maps_genre_and_artist_and_parses_release(tmp_path, events_csv):
    items = _write_csv(
        tmp_path / "items.csv",
        "item_id,genre,artist,release_ts\n10,rock,Band A,2023-05-01\n11,jazz,,\n",
    )

    raw = read_source(f"csv:{events_csv};items={items}")

    assert raw.items.rows() == [
        (10, "rock", "Band A", _utc(2023, 5, 1)),
        (11, "jazz", "unknown", None),
        (12, "unknown", "unknown", None),  # in events, absent from the items file
    ]


def test_items_file_keeps_catalogue_items_without_events(tmp_path, events_csv):
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [10, 99], "category": ["rock", "pop"]}).write_parquet(items)

    raw = read_source(f"csv:{events_csv};items={items}")

    assert raw.items["item_id"].to_list() == [10, 11, 12, 99]


def test_release_after_first_event_is_moved_back_to_that_event(tmp_path, events_csv):
    items = _write_csv(tmp_path / "items.csv", "item_id,release_ts\n10,2024-06-01\n12,2020-01-01\n")

    raw = read_source(f"csv:{events_csv};items={items}")

    release = dict(raw.items.select("item_id", "release_ts").rows())
    assert release[10] == _utc(2024, 1, 2, 10)
    assert release[12] == _utc(2020, 1, 1)


def test_before_keeps_only_earlier_events(events_csv):
    raw = read_source(f"csv:{events_csv}", before=_utc(2024, 1, 3))

    assert raw.events["ts"].to_list() == [_utc(2024, 1, 1, 6, 30), _utc(2024, 1, 2, 10)]


def test_before_that_excludes_everything_is_an_empty_source_error(events_csv):
    with pytest.raises(RawDataError, match="no events"):
        read_source(f"csv:{events_csv}", before=_utc(2000, 1, 1))


def test_unknown_spec_lists_the_valid_forms():
    with pytest.raises(RawDataError, match=r"unknown source kind 'kafka'.*movielens:DIR.*sql:TABLE"):
        read_source("kafka:topic")


def test_unknown_option_is_rejected(events_csv):
    with pytest.raises(RawDataError, match=r"unknown options \['genres'\]"):
        read_source(f"csv:{events_csv};genres=x.csv")


def test_synthetic_source_before_generation_says_to_generate(tmp_path):
    with pytest.raises(RawDataError, match="generate it first"):
        read_source("synthetic", synthetic_dir=tmp_path)


def test_file_source_with_no_matching_files_names_the_glob(tmp_path):
    with pytest.raises(RawDataError, match="nothing.*: no parquet files match"):
        read_source(f"parquet:{tmp_path}/nothing*.parquet")


def test_unreadable_file_is_a_raw_data_error_naming_it(tmp_path):
    path = tmp_path / "events.parquet"
    path.write_text("not parquet")

    with pytest.raises(RawDataError, match=f"source {path}: cannot read"):
        read_source(f"parquet:{path}")


def _frame(**overrides) -> pl.DataFrame:
    columns = {
        "user_id": [1, 2],
        "item_id": [10, 11],
        "ts": ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"],
        "weight": [1.0, 2.0],
    }
    columns.update(overrides)
    return pl.DataFrame({k: v for k, v in columns.items() if v is not None}, strict=False)


@pytest.mark.parametrize(
    ("frame", "column", "problem"),
    [
        (_frame(ts=None, timestamp=["2024-01-01", "2024-01-02"]), "ts", "missing columns"),
        (_frame(user_id=None), "user_id", "missing columns"),
        (_frame(ts=["2024-01-01", "yesterday"]), "ts", "unparseable timestamps, e.g. 'yesterday'"),
        (_frame(ts=["2024-01-01", None]), "ts", "1 null timestamps"),
        (_frame(user_id=[1, None]), "user_id", "1 null ids"),
        (_frame(item_id=["10", "x11"]), "item_id", "not integers, e.g. 'x11'"),
        (_frame(item_id=[10.0, 11.5]), "item_id", "not integers, e.g. 11.5"),
        (_frame(weight=[1.0, -0.5]), "weight", "1 negative"),
        (_frame(weight=[1.0, math.nan]), "weight", "1 NaN"),
        (_frame(weight=[math.inf, 1.0]), "weight", "1 infinite"),
        (_frame(weight=[1.0, None]), "weight", "1 null"),
        (_frame(weight=["a", "b"]), "weight", "not numeric"),
        (_frame(ts=[True, False]), "ts", "not a timestamp"),
    ],
    ids=[
        "misnamed-ts",
        "missing-user",
        "bad-ts",
        "null-ts",
        "null-id",
        "text-id",
        "fractional-id",
        "negative-weight",
        "nan-weight",
        "inf-weight",
        "null-weight",
        "text-weight",
        "bool-ts",
    ],
)
def test_bad_events_raise_naming_the_source_and_column(frame, column, problem):
    with pytest.raises(RawDataError) as error:
        validate_events(frame, source="events.csv", now=None)

    message = str(error.value)
    assert message.startswith("source events.csv:")
    assert column in message
    assert problem in message


def test_missing_column_message_lists_the_columns_found():
    frame = _frame(ts=None, timestamp=["2024-01-01", "2024-01-02"])

    with pytest.raises(RawDataError, match=r"missing columns \['ts'\]; found columns .*'timestamp'"):
        validate_events(frame, source="events.csv", now=None)


def test_events_after_now_are_rejected():
    with pytest.raises(RawDataError, match="column ts: 1 events after the run time"):
        validate_events(_frame(), source="events.csv", now=_utc(2024, 1, 1, 12))


def test_events_up_to_now_are_accepted():
    events, _ = validate_events(_frame(), source="events.csv", now=_utc(2024, 1, 2))

    assert events.height == 2


def test_empty_source_is_rejected():
    with pytest.raises(RawDataError, match="source events.csv: no events"):
        validate_events(_frame().clear(), source="events.csv", now=None)


def test_duplicate_events_are_dropped_and_counted():
    frame = _frame(
        user_id=[1, 1, 1, 2],
        item_id=[10, 10, 10, 10],
        ts=["2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-01"],
        weight=[3.0, 1.0, 2.0, 1.0],
    )

    events, duplicates = validate_events(frame, source="events.csv", now=None)

    assert duplicates == 2
    assert events.rows() == [(1, 10, _utc(2024, 1, 1), 1.0), (2, 10, _utc(2024, 1, 1), 1.0)]


def test_validated_events_are_sorted_by_time_then_user_then_item():
    frame = _frame(
        user_id=[2, 1, 1, 1],
        item_id=[5, 7, 6, 9],
        ts=["2024-01-02", "2024-01-02", "2024-01-02", "2024-01-01"],
        weight=[1.0, 1.0, 1.0, 1.0],
    )

    events, _ = validate_events(frame, source="events.csv", now=None)

    assert events.select("user_id", "item_id").rows() == [(1, 9), (1, 6), (1, 7), (2, 5)]


def test_validate_events_does_not_mutate_its_input():
    frame = _frame()
    copy = frame.clone()

    validate_events(frame, source="events.csv", now=None)

    assert frame.equals(copy)


def test_duplicate_item_ids_in_items_file_are_rejected(tmp_path, events_csv):
    items = _write_csv(tmp_path / "items.csv", "item_id,category\n10,rock\n10,pop\n")

    with pytest.raises(RawDataError, match=r"items.csv: column item_id: 1 item ids appear more"):
        read_source(f"csv:{events_csv};items={items}")


def test_items_file_with_null_item_id_is_rejected(tmp_path, events_csv):
    items = _write_csv(tmp_path / "items.csv", "item_id,category\n10,rock\n,pop\n")

    with pytest.raises(RawDataError, match="column item_id: 1 null ids"):
        read_source(f"csv:{events_csv};items={items}")


def test_sql_source_without_engine_is_rejected():
    with pytest.raises(RawDataError, match="sql:events: no database engine"):
        read_source("sql:events")


@pytest.mark.movielens
def test_movielens_reader_reads_all_ratings_users_and_items(movielens_dir):
    raw = read_source(f"movielens:{movielens_dir}")

    assert raw.events.height == 100_000
    assert raw.events["user_id"].n_unique() == 943
    assert raw.items.height == 1682
    assert raw.events.schema == RAW_EVENTS_SCHEMA
    assert raw.items.schema == RAW_ITEMS_SCHEMA
    assert set(raw.events["weight"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    toy_story = raw.items.row(by_predicate=pl.col("item_id") == 1, named=True)
    assert toy_story["category"] == "Animation"  # first genre flag set in u.genre order
    assert toy_story["release_ts"] == _utc(1995, 1, 1)
    assert set(raw.items["creator"]) == {"unknown"}
    released_late = raw.events.join(raw.items, on="item_id").filter(pl.col("ts") < pl.col("release_ts"))
    assert released_late.height == 0


@pytest.mark.movielens
def test_movielens_reader_applies_before(movielens_dir):
    before = _utc(1998, 1, 1)

    raw = read_source(f"movielens:{movielens_dir}", before=before)

    assert 0 < raw.events.height < 100_000
    assert raw.events["ts"].max() < before


def test_check_source_spec_accepts_what_it_can_check_without_reading(tmp_path, events_csv):
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t2\t3\t881250949\n")

    ml = tmp_path / "ml"
    for spec in ("synthetic", f"csv:{events_csv}", f"csv:{events_csv};items={events_csv}", f"movielens:{ml}",
                 "sql:events", "sql:public.events;items=items"):  # fmt: skip
        check_source_spec(spec)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("kafka:topic", "unknown source kind 'kafka'"),
        ("csv:{tmp}/none*.csv", "no csv files match"),
        ("csv:{tmp}/events.csv;items={tmp}/missing.csv", "items file .*missing.csv not found"),
        ("csv:{tmp}/events.csv;genres=x", "unknown options"),
        ("movielens:{tmp}", "u.data not found"),
        ("sql:events--", "not an identifier"),
        ("sql:events;items=a.b.c", "not an identifier"),
        ("synthetic:x", "unknown synthetic kind 'x'; allowed kinds: demo, sequential"),
    ],
)
def test_check_source_spec_names_the_spec_and_the_problem(tmp_path, events_csv, spec, problem):
    spec = spec.format(tmp=tmp_path)

    with pytest.raises(RawDataError, match=problem) as error:
        check_source_spec(spec)

    assert spec in str(error.value)


def _partition_log(tmp_path: Path, *, bad_user: int | None = None) -> Path:
    """Events of users 1..40 as Parquet; `bad_user`'s one event has a negative weight."""
    users = list(range(1, 41))
    frame = pl.DataFrame(
        {
            "user_id": users,
            "item_id": [u % 5 for u in users],
            "ts": [_utc(2024, 1, 1 + u % 20) for u in users],
            "weight": [-1.0 if u == bad_user else 1.0 for u in users],
        }
    )
    frame.write_parquet(tmp_path / "events.parquet")
    return tmp_path / "events.parquet"


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_partition_reads_hold_each_user_once_and_together_the_whole_source(tmp_path, kind):
    path = _partition_log(tmp_path)
    if kind == "csv":
        pl.read_parquet(path).write_csv(tmp_path / "events.csv")
        path = tmp_path / "events.csv"
    whole = read_source(f"{kind}:{path}").events
    parts = [read_source(f"{kind}:{path}", partition=p).events for p in all_partitions(3)]

    for partition, events in zip(all_partitions(3), parts, strict=True):
        assert events.select(in_partition("user_id", partition).all()).item()
    assert pl.concat(parts).sort(list(whole.columns)).equals(whole.sort(list(whole.columns)))


def test_parquet_partition_read_filters_in_the_scan_so_other_users_rows_are_never_validated(tmp_path):
    path = _partition_log(tmp_path, bad_user=7)
    with pytest.raises(RawDataError, match="1 negative"):
        read_source(f"parquet:{path}")
    with pytest.raises(RawDataError, match="1 negative"):
        read_source(f"parquet:{path}", partition=partition_holding(7, 4))
    others = [p for p in all_partitions(4) if p != partition_holding(7, 4)]

    read = [read_source(f"parquet:{path}", partition=p) for p in others]

    assert sum(r.events.height for r in read) == sum(partition_holding(u, 4) in others for u in range(1, 41))


def test_partition_with_no_users_reads_as_empty_not_as_an_error(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("user_id,item_id,ts\n5,1,2024-01-01\n")
    empty = next(p for p in all_partitions(4) if p != partition_holding(5, 4))

    raw = read_source(f"csv:{path}", partition=empty)

    assert raw.events.height == 0
    assert raw.events.schema == RAW_EVENTS_SCHEMA


def test_text_user_ids_are_partitioned_after_validation(tmp_path):
    path = _write_csv(tmp_path / "text.csv", 'user_id,item_id,ts\n"0012",1,2024-01-01\n"7",2,2024-01-02\n')
    parts = [read_source(f"csv:{path}", partition=p).events for p in all_partitions(2)]

    assert sorted(pl.concat(parts)["user_id"].to_list()) == [7, 12]
    for partition, events in zip(all_partitions(2), parts, strict=True):
        assert events.select(in_partition("user_id", partition).all()).item()


@pytest.mark.movielens
def test_movielens_partitions_split_the_users(movielens_dir):
    parts = [read_source(f"movielens:{movielens_dir}", partition=p).events for p in all_partitions(3)]

    assert [events.height for events in parts] != [0, 0, 0]
    assert sum(events.height for events in parts) == 100_000
    assert sum(events["user_id"].n_unique() for events in parts) == 943


def partition_holding(user_id: int, count: int) -> Partition:
    return Partition(pl.DataFrame({"user_id": [user_id]}).select(partition_of("user_id", count)).item(), count)
