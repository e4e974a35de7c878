"""The benchmark harness's logic: per-event cost, interval union, ratio checks, reference workload ratios,
load sampling, the size plan, tables and the chart file."""

import json
import struct

import pytest

from benchmarks.chart import draw_stage_chart
from benchmarks.reference import (
    LoadSampler,
    ReferenceRun,
    build_reference,
    combine_references,
    describe_load,
    reference_line,
    relative,
    summarise_load,
    time_reference,
)
from benchmarks.weekly_job import (
    LARGE_MEMORY_GIB,
    SIZES,
    check_ratios,
    format_table,
    group_task_runs,
    memory_limit_mb,
    per_million,
    plan_sizes,
    read_journal,
    render_markdown,
    split_partitions,
    stage_rows,
    stage_series,
    summarise_job,
    union_seconds,
    unit_costs,
    write_outputs,
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


def test_stage_rows_give_throughput_and_cost_per_million_events_in_seconds_and_reference_units():
    result = {
        "events": 2_000_000,
        "reference": {"reference_s": 2.0},
        "stages": {
            "publish": {"seconds": 4.0, "units": 10_000, "unit": "keys", "peak_rss_mb": 300.0, "calls": 4},
            "features": {"seconds": 10.0, "units": 2_000_000, "unit": "events", "peak_rss_mb": 900.0, "calls": 2},
        },
    }
    rows = stage_rows("small", result)
    assert [r[1] for r in rows] == ["features", "publish"]  # in pipeline order
    assert rows[0][2:8] == [10.0, 5.0, 200_000.0, "events", 5.0, 2.5]
    assert rows[1][2:8] == [4.0, 2.0, 2_500.0, "keys", 2.0, 1.0]


def test_stage_rows_leave_reference_columns_empty_without_a_reference_timing():
    result = {
        "events": 1_000_000,
        "stages": {"features": {"seconds": 3.0, "units": 1, "unit": "events", "peak_rss_mb": 1.0, "calls": 1}},
    }
    (row,) = stage_rows("small", result)
    assert row[2] == 3.0 and row[3] is None and row[7] is None


def _size(events: int, reference_s: float | None, **stage_seconds: tuple[float, int]) -> dict:
    stages = {
        name.replace("_", " "): {"seconds": s, "units": u, "unit": "x", "peak_rss_mb": 100.0, "calls": 1}
        for name, (s, u) in stage_seconds.items()
    }
    stages["generate"] = {"seconds": 1.0, "units": events, "unit": "events", "peak_rss_mb": 1.0, "calls": 1}
    return {
        "users": events // 100, "items": 10, "events": events, "as_of": "2026-11-23", "stores": "embedded",
        "measured_at": "now", "stages": stages, "flows": {}, "job_wall_s": 60.0, "job_peak_rss_mb": 2_000.0,
        "snapshots": 5, "features_backfill_s": 9.0, "metrics": {}, "published": {"users_per_s": 1_500.0},
        "reference": {"reference_s": reference_s, "spread": 1.1} if reference_s else None,
        "load": summarise_load([(0.0, 1.0), (1.0, 3.0)]),
    }  # fmt: skip


def test_unit_costs_divide_by_the_reference_only_when_asked():
    result = _size(1_000_000, 2.0, features=(4.0, 1_000_000), score=(10.0, 5_000))
    assert unit_costs(result, normalise=False) == {
        "features": pytest.approx(4e-6), "score": pytest.approx(2e-3), "generate": pytest.approx(1e-6),
    }  # fmt: skip
    assert unit_costs(result, normalise=True)["score"] == pytest.approx(1e-3)
    assert unit_costs(_size(1_000_000, None, score=(10.0, 5_000)), normalise=True) == {}


def test_a_slower_day_with_a_slower_reference_passes_the_check_in_reference_units():
    # Medium ran on a day 3× slower (reference 3 s instead of 1 s): 3.6× the seconds per user.
    results = {
        "small": _size(1_000_000, 1.0, score=(5.0, 10_000)),
        "medium": _size(10_000_000, 3.0, score=(180.0, 100_000)),
    }
    names = list(results)
    seconds = check_ratios({n: unit_costs(results[n], normalise=False) for n in names}, ("score",), 1.3)
    normal = check_ratios({n: unit_costs(results[n], normalise=True) for n in names}, ("score",), 1.3)
    assert seconds["score"]["ratio"] == pytest.approx(3.6) and seconds["score"]["holds"] is False
    assert normal["score"]["ratio"] == pytest.approx(1.2) and normal["score"]["holds"] is True


def test_report_states_reference_load_and_memory_goals(tmp_path):
    results = {
        "medium": _size(10_000_000, 3.0, score=(180.0, 100_000)),
        "small": _size(1_000_000, 1.0, score=(5.0, 10_000)),
    }
    machine = {"cpu": "test cpu", "nproc": 2, "memory": "24 GiB", "load": "1.0 1.0 1.0"}
    report = render_markdown(results, machine)
    lines = report.splitlines()
    small_row = next(line for line in lines if line.startswith("| small | 10,000 |"))
    assert "| 2.0 (1.0–3.0) | 1 (1.1) | – |" in small_row  # load mean (range), reference s (spread)
    # Sizes in increasing order whatever the order of the results.
    assert lines.index(small_row) < lines.index(next(x for x in lines if x.startswith("| medium | 100,000 |")))
    assert "| score | user | small | medium | 3.6 | 1.2 | yes |" in lines
    assert "| medium | 2,000 | 3,072 | yes |" in lines
    assert "| small | 1 | 60 | 60 | 1,500 | 1,500 |" in report  # users per ref = 1,500/s × 1 s


def test_checks_compare_with_the_small_size_even_when_a_scaled_size_is_smaller():
    results = {
        "large-x0.01": _size(500_000, 1.0, score=(1.0, 10_000)),
        "small": _size(1_000_000, 1.0, score=(5.0, 10_000)),
        "medium": _size(10_000_000, 1.0, score=(60.0, 100_000)),
    }
    machine = {"cpu": "test cpu", "nproc": 2, "memory": "24 GiB", "load": "1.0 1.0 1.0"}
    assert "| score | user | small | medium | 1.2 | 1.2 | yes |" in render_markdown(results, machine).splitlines()


def test_memory_goals_follow_the_size_also_when_scaled():
    assert memory_limit_mb("medium") == 3072
    assert memory_limit_mb("large") == 6144
    assert memory_limit_mb("large-x0.05") == 6144


def test_default_plan_adds_the_large_size_only_with_the_memory_for_it():
    assert [label for label, _ in plan_sizes(None, large=False, scale=1, available_gib=8.0)] == ["small", "medium"]
    roomy = plan_sizes(None, large=False, scale=1, available_gib=LARGE_MEMORY_GIB)
    assert [label for label, _ in roomy] == ["small", "medium", "large"]
    assert roomy[-1][1] == SIZES["large"]
    forced = plan_sizes("small", large=True, scale=1, available_gib=1.0)
    assert [label for label, _ in forced] == ["small", "large"]
    assert [label for label, _ in plan_sizes("medium", large=False, scale=1, available_gib=64.0)] == ["medium"]


def test_a_scaled_plan_shrinks_every_size_and_labels_it():
    ((label, size),) = plan_sizes("large", large=False, scale=0.05, available_gib=1.0)
    assert label == "large-x0.05"
    assert (size.users, size.items, size.events, size.weeks) == (50_000, 2_500, 2_500_000, 16)
    assert size.feature_partitions == SIZES["large"].feature_partitions == 16


def test_plan_refuses_unknown_sizes_and_bad_scales():
    with pytest.raises(ValueError, match="unknown size"):
        plan_sizes("small,huge", large=False, scale=1, available_gib=1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        plan_sizes("small", large=False, scale=0, available_gib=1.0)


def test_reference_times_are_relative_units():
    assert relative(6.0, 2.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="reference time must be positive"):
        relative(1.0, 0.0)


def test_combined_reference_is_the_mean_with_its_spread():
    before = {"predict_s": 1.0, "groupby_s": 1.0, "reference_s": 2.0}
    after = {"predict_s": 2.0, "groupby_s": 1.0, "reference_s": 3.0}
    combined = combine_references([before, after])
    assert combined["reference_s"] == pytest.approx(2.5) and combined["predict_s"] == pytest.approx(1.5)
    assert combined["spread"] == pytest.approx(1.5) and combined["timings"] == 2
    with pytest.raises(ValueError, match="no reference timing"):
        combine_references([])


@pytest.fixture(scope="module")
def reference():
    return build_reference()


def test_reference_workload_times_both_parts_and_sums_them(reference):
    timing = time_reference(reference, repeats=1)
    assert timing["predict_s"] > 0 and timing["groupby_s"] > 0
    assert timing["reference_s"] == pytest.approx(timing["predict_s"] + timing["groupby_s"])
    assert timing["cpu_s"] > 0


def test_reference_workload_has_its_fixed_size(reference):
    assert reference.booster.num_trees() == 150 and reference.rows.shape == (100_000, 40)
    assert reference.table.height == 1_000_000


def test_a_reference_run_times_the_reference_before_and_after_and_samples_the_load(reference):
    with ReferenceRun(repeats=1, work=reference) as run:
        pass
    result = run.result()
    assert result["reference"]["timings"] == 2 and result["reference"]["spread"] >= 1.0
    assert result["load"]["samples"] >= 2


def test_reference_line_gives_each_stage_in_reference_units():
    run = {"reference": {"reference_s": 2.0, "spread": 1.25}, "load": summarise_load([(0.0, 1.0), (1.0, 2.0)])}
    assert reference_line(run, {"compute": 5.0, "write": 1.0}) == (
        "Reference workload 2.00 s (after / before 1.25); load average during the run 1.5 (1.0–2.0); "
        "in × ref: compute 2.50, write 0.50."
    )


def test_load_sampler_samples_on_entry_exit_and_in_between():
    readings = iter([(0.5, 0, 0), (2.5, 0, 0), (1.0, 0, 0), (4.0, 0, 0), (4.0, 0, 0), (4.0, 0, 0)])
    sampler = LoadSampler(every=0.01, read=lambda: next(readings, (1.5, 0, 0)))
    with sampler:
        while len(sampler.samples) < 3:
            pass
    loads = [load for _, load in sampler.samples]
    assert loads[:3] == [0.5, 2.5, 1.0] and len(loads) >= 4
    summary = sampler.summary()
    assert summary["min"] == 0.5 and summary["max"] == max(loads) and summary["samples"] == len(loads)


def test_load_summary_of_no_samples_is_unknown():
    assert summarise_load([]) == {"min": None, "mean": None, "max": None, "samples": 0}
    assert describe_load(summarise_load([])) == "?"
    assert describe_load(summarise_load([(0.0, 1.0), (5.0, 2.0)])) == "1.5 (1.0–2.0)"


def test_stage_chart_is_a_png_of_both_panels(tmp_path):
    path = draw_stage_chart(
        {"features": [(1e6, 3.0), (1e7, 31.0)], "publish": [(1e6, 0.5)]},
        tmp_path / "chart.png",
        relative={"features": [(1e6, 1.5), (1e7, 10.0)]},
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > height > 0


def test_stage_series_in_reference_units_skip_sizes_without_a_reference():
    results = {
        "small": _size(1_000_000, 2.0, features=(4.0, 1_000_000)),
        "medium": _size(10_000_000, None, features=(40.0, 10_000_000)),
    }
    assert stage_series(results, normalise=False)["features"] == [(1_000_000, 4.0), (10_000_000, 40.0)]
    assert stage_series(results, normalise=True)["features"] == [(1_000_000, 2.0)]


def test_the_harness_writes_report_json_and_chart(tmp_path):
    results = {"small": _size(1_000_000, 2.0, features=(4.0, 1_000_000), score=(5.0, 10_000))}
    machine = {"cpu": "test cpu", "nproc": 2, "memory": "24 GiB", "load": "1.0 1.0 1.0"}
    report = write_outputs(results, machine, tmp_path)
    assert (tmp_path / "weekly_job.md").read_text() == report + "\n"
    assert json.loads((tmp_path / "weekly_job.json").read_text())["sizes"]["small"]["reference"]["reference_s"] == 2.0
    assert (tmp_path / "weekly_job.png").read_bytes()[:4] == b"\x89PNG"


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


def test_partitioned_feature_weeks_count_their_partitions_and_merge_as_the_weeks_feature_stage():
    runs = [
        _run("features", "compute_partition-a1b", 0.0, 1.0),  # an earlier week: replaced
        _run("features", "compute_partition-c2d", 0.0, 1.5),
        _run("features", "merge_partitions-e3f", 1.5, 2.0),
        _run("features", "write_snapshot-g4h", 2.0, 2.5),
        _run("features", "compute_partition-i5j", 3.0, 4.0),  # the as_of week: partitions two at a time
        _run("features", "compute_partition-k6l", 3.0, 4.5),
        _run("features", "compute_partition-m7n", 4.0, 5.0),
        _run("features", "merge_partitions-o8p", 5.0, 6.0),
        _run("features", "write_snapshot-q9r", 6.0, 7.0),
    ]
    assert group_task_runs(runs)["features"] == [(3.0, 4.0), (3.0, 4.5), (4.0, 5.0), (5.0, 6.0)]
    assert union_seconds(group_task_runs(runs)["features"]) == 3.0


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
        ["reference", {"predict_s": 0.5, "groupby_s": 0.5, "reference_s": 1.0}],
        ["load", [2.0, 1.5]],
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
    assert job["reference"]["reference_s"] == pytest.approx(1.0) and job["load"]["mean"] == pytest.approx(1.5)
