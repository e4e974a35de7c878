"""The weekly-job benchmark's pure parts: per-event cost, interval union, ratio check, tables, chart."""

import json
import struct
import zlib

import pytest

from benchmarks.chart import draw_stage_chart
from benchmarks.weekly_job import (
    check_ratios,
    format_table,
    group_task_runs,
    per_million,
    read_journal,
    split_partitions,
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


def _run(flow: str, name: str, start: float, end: float | None) -> dict:
    return {"flow": flow, "name": name, "start": start, "end": end}


def test_task_runs_group_into_stages_with_the_as_of_week_for_feature_stages():
    runs = [
        _run("features", "plan_weeks-a1b", 0.0, 0.5),  # bookkeeping: no stage
        _run("features", "extract_events-c2d", 0.5, 1.0),
        _run("features", "compute_snapshot-e3f", 1.0, 2.0),
        _run("features", "write_snapshot-g4h", 2.0, 2.5),
        _run("features", "compute_snapshot-i5j", 3.0, 5.0),  # the as_of week: the one kept
        _run("features", "write_snapshot-k6l", 5.0, 6.0),
        _run("training", "build_training_frame-m7n", 7.0, 8.0),
        _run("training", "build_training_frame-o8p", 8.0, 9.5),
        _run("training", "fit_ranker-q9r", 9.5, None),  # still running: left out
        _run("inference", "score_partition-s0t", 10.0, 12.0),
        _run("inference", "score_partition-u1v", 10.5, 12.5),
        _run("inference", "make_live-w2x", 13.0, 13.2),
    ]
    assert group_task_runs(runs) == {
        "extract": [(0.5, 1.0)],
        "features": [(3.0, 5.0)],
        "write": [(5.0, 6.0)],
        "candidate build": [(7.0, 8.0), (8.0, 9.5)],
        "partitions": [(10.0, 12.0), (10.5, 12.5)],
        "publish": [(13.0, 13.2)],
    }


def test_partition_wall_time_is_shared_by_the_steps_the_partitions_report():
    shares = split_partitions({"partitions_s": 10.0, "read_s": 4.0, "score_s": 12.0, "write_s": 4.0})
    assert shares == {"read": pytest.approx(2.0), "score": pytest.approx(6.0), "publish": pytest.approx(2.0)}


def test_a_finished_job_reports_stages_flows_and_overhead_from_its_task_runs():
    raw = {
        "samples": [[1.5, 500 * 2**20], [10.5, 800 * 2**20], [13.1, 700 * 2**20]],
        "walls": {"features": [0.0, 6.5], "inference": [9.8, 14.0]},
        "task_runs": [
            _run("features", "compute_snapshot-e3f", 1.0, 2.0),
            _run("features", "write_snapshot-g4h", 2.0, 2.5),
            _run("inference", "score_partition-s0t", 10.0, 12.0),
            _run("inference", "score_partition-u1v", 10.0, 12.0),
            _run("inference", "make_live-w2x", 13.0, 13.5),
        ],
        "units": {"features": 1_000, "score": 200, "publish": 190},
        "trained": {},
        "published": {"partitions_s": 2.0, "read_s": 1.0, "score_s": 2.0, "write_s": 1.0, "users": 200},
        "job_wall_s": 14.0,
        "job_peak_rss_mb": 800.0,
    }

    job = summarise_job(raw)

    assert job["stages"]["features"] == {
        "seconds": 1.0, "units": 1_000, "unit": "events", "peak_rss_mb": 500.0, "calls": 1,
    }  # fmt: skip
    assert job["stages"]["score"]["seconds"] == pytest.approx(1.0)
    assert job["stages"]["score"]["calls"] == 2 and job["stages"]["score"]["peak_rss_mb"] == 800.0
    assert job["stages"]["publish"]["seconds"] == pytest.approx(0.5 + 0.5)  # its share of the partitions + make_live
    assert job["flows"]["inference"]["overhead_s"] == pytest.approx(4.2 - 2.5)
    assert job["snapshots"] == 1 and job["partial"] is False


def test_a_journal_of_a_stopped_job_summarises_the_stages_it_finished(tmp_path):
    journal = tmp_path / "job-journal.jsonl"
    records = [
        ["samples", [[0.5, 100 * 2**20], [1.5, 900 * 2**20], [3.5, 300 * 2**20]]],
        ["wall", ["features", 0.0, 5.0]],
    ]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = read_journal(journal)
    # What Prefect kept of the killed run: the finished task runs, one still running.
    raw["task_runs"] = [
        _run("features", "compute_snapshot-e3f", 1.0, 3.0),
        _run("features", "write_snapshot-g4h", 3.0, 4.0),
        _run("training", "fit_ranker-q9r", 5.5, None),
    ]
    raw["units"] = {"features": 50, "write": 7}

    job = summarise_job(raw)

    assert job["partial"] is True and job["metrics"] == {}
    assert job["stages"]["features"] == {
        "seconds": 2.0, "units": 50, "unit": "events", "peak_rss_mb": 900.0, "calls": 1,
    }  # fmt: skip
    assert set(job["stages"]) == {"features", "write"}
    assert job["flows"]["features"]["overhead_s"] == pytest.approx(2.0)
    assert job["job_peak_rss_mb"] == pytest.approx(900.0)
