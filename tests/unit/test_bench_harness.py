"""The weekly-job benchmark's pure parts: per-event cost, interval union, ratio check, tables, chart."""

import json
import struct
import zlib

import pytest

from benchmarks.chart import draw_stage_chart
from benchmarks.weekly_job import (
    check_ratios,
    format_table,
    per_million,
    read_journal,
    stage_rows,
    summarise_job,
    union_seconds,
)


def test_per_million_is_seconds_per_million_events():
    assert per_million(3.0, 1_000_000) == pytest.approx(3.0)
    assert per_million(30.0, 10_000_000) == pytest.approx(3.0)


def test_per_million_refuses_no_events():
    with pytest.raises(ValueError, match="events must be positive"):
        per_million(1.0, 0)


def test_union_seconds_counts_overlapping_calls_once():
    # Two threads scoring at once for 1..3 and 2..4, then a call inside another.
    assert union_seconds([(2.0, 4.0), (1.0, 3.0), (10.0, 12.0), (10.5, 11.0)]) == pytest.approx(5.0)
    assert union_seconds([]) == 0.0


def test_check_ratios_compares_largest_with_smallest_size():
    costs = {"small": {"features": 2.0, "publish": 1.0}, "medium": {"features": 2.5, "publish": 1.4}}
    checks = check_ratios(costs, ("features", "publish"), 1.3)
    assert checks["features"]["ratio"] == pytest.approx(1.25)
    assert checks["features"]["holds"] is True
    assert checks["publish"]["holds"] is False
    assert (checks["publish"]["smallest"], checks["publish"]["largest"]) == ("small", "medium")


def test_check_ratios_undecided_with_one_size():
    checks = check_ratios({"small": {"features": 2.0}}, ("features",), 1.3)
    assert checks["features"]["ratio"] is None and checks["features"]["holds"] is None
    assert (checks["features"]["smallest"], checks["features"]["largest"]) == ("small", None)


def test_format_table_renders_markdown_with_readable_numbers():
    table = format_table(
        ["size", "s", "rate", "ok"], [["small", 0.01234, 1_234_567.8, True], ["medium", 12.345, 7, None]]
    )
    assert table.splitlines() == [
        "| size | s | rate | ok |",
        "|---|---|---|---|",
        "| small | 0.012 | 1,234,568 | yes |",
        "| medium | 12.3 | 7 | – |",
    ]


def test_stage_rows_give_throughput_and_cost_per_million_events():
    result = {
        "events": 2_000_000,
        "stages": {
            "publish": {"seconds": 4.0, "units": 10_000, "unit": "keys", "peak_rss_mb": 300.0, "calls": 4},
            "features": {"seconds": 10.0, "units": 2_000_000, "unit": "events", "peak_rss_mb": 900.0, "calls": 2},
        },
    }
    rows = stage_rows("small", result)
    assert [r[1] for r in rows] == ["features", "publish"]  # in pipeline order
    assert rows[0][3] == pytest.approx(200_000.0) and rows[0][5] == pytest.approx(5.0)
    assert rows[1][3:6] == [pytest.approx(2_500.0), "keys", pytest.approx(2.0)]


def test_stage_chart_is_a_valid_png(tmp_path):
    path = tmp_path / "chart.png"
    draw_stage_chart({"features": [(1e6, 3.0), (1e7, 31.0)], "publish": [(1e6, 0.5)]}, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert (kind, width, height) == (b"IHDR", 960, 560)
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]


def test_a_journal_of_a_stopped_job_summarises_the_stages_it_finished(tmp_path):
    journal = tmp_path / "job-journal.jsonl"
    records = [
        ["samples", [[0.5, 100 * 2**20], [1.5, 900 * 2**20], [3.5, 300 * 2**20]]],
        ["call", {"stage": "features", "fn": "build_feature_tables", "start": 1.0, "end": 3.0, "rss": 0, "units": 50}],
        ["call", {"stage": "write", "fn": "write_snapshots", "start": 3.0, "end": 4.0, "rss": 0, "units": 7}],
        ["wall", ["features", 0.0, 5.0]],
    ]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))

    job = summarise_job(read_journal(journal))

    assert job["partial"] is True and job["metrics"] == {}
    assert job["stages"]["features"] == {
        "seconds": 2.0, "units": 50, "unit": "events", "peak_rss_mb": 900.0, "calls": 1,
    }  # fmt: skip
    assert job["flows"]["features"]["overhead_s"] == pytest.approx(2.0)
    assert job["job_peak_rss_mb"] == pytest.approx(900.0)
