"""Validate a feature table against its contract: great-expectations suite, profile, drift.

great_expectations is imported inside the functions that need it: the import costs
seconds, and modules that only read reports should not pay it.
"""

import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

import polars as pl

from features.contracts import CONTRACTS, TableContract
from recsys.errors import ExpectedError

if TYPE_CHECKING:
    import great_expectations as gx

log = logging.getLogger(__name__)

PROFILE_STATS = ("mean", "p50", "p90", "min", "max")
DRIFT_STATS = ("mean", "p50", "p90")
_MAX_EXAMPLES = 5
# Keys of an expectation's kwargs that say where it applies rather than what it expects.
_TARGET_KWARGS = ("batch_id", "column", "column_list")


@dataclass
class ValidationReport:
    """Outcome of validating one table of one snapshot."""

    table: str
    as_of: date
    success: bool
    row_count: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # drift that does not block
    profile: dict[str, Any] = field(default_factory=dict)
    row_count_warning: str | None = None  # a row-count drop that does not block

    @property
    def all_warnings(self) -> list[str]:
        return [*self.warnings, *([self.row_count_warning] if self.row_count_warning else [])]

    def summary_line(self) -> str:
        status = "passed" if self.success else f"FAILED {len(self.failures)} expectation(s)"
        return f"{self.table} as_of={self.as_of}: {status}, {self.row_count} rows, {len(self.all_warnings)} warning(s)"

    def to_markdown(self) -> str:
        lines = [f"### {'✅' if self.success else '❌'} {self.summary_line()}"]
        if self.failures:
            lines += ["", "| expectation | columns | expected | observed |", "|---|---|---|---|"]
            lines += [
                f"| {f['expectation']} | {', '.join(f['columns'])} | {_compact(f['expected'])} | {_observed_text(f)} |"
                for f in self.failures
            ]
            lines += ["", *(f"- {f['hint']}" for f in self.failures if f.get("hint"))]
        lines += ["", *(f"- ⚠️ {w}" for w in self.all_warnings)] if self.all_warnings else []
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({**asdict(self), "as_of": self.as_of.isoformat()})

    def describe_failures(self) -> str:
        """One line naming the table and each failed expectation with what was observed."""
        return f"{self.table} as_of={self.as_of}: " + "; ".join(
            f"{f['expectation']}({', '.join(f['columns'])}) expected {_compact(f['expected'])}, "
            f"observed {_observed_text(f)}" + (f" ({f['hint']})" if f.get("hint") else "")
            for f in self.failures
        )


class ValidationFailed(ExpectedError):
    """Raised when at least one table of a snapshot failed validation."""

    def __init__(self, reports: list[ValidationReport]) -> None:
        self.reports = [r for r in reports if not r.success]
        super().__init__("feature validation failed: " + " | ".join(r.describe_failures() for r in self.reports))


def build_expectation_suite(contract: TableContract, *, row_count: bool = True) -> "gx.ExpectationSuite":
    """The table's whole expectation suite, generated from its contract (history is checked apart).

    Without `row_count`, the suite of one user partition's rows: every expectation but the
    table's row count (a partition may hold no users; the merged table's count is checked).
    """
    gx = _import_gx()
    import great_expectations.expectations as gxe

    key = list(contract.key)
    expectations: list[gxe.Expectation] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=contract.column_names, exact_match=True),
        *([gxe.ExpectTableRowCountToBeBetween(min_value=1)] if row_count and not contract.may_be_empty else []),
        gxe.ExpectColumnValuesToBeUnique(column=key[0])
        if len(key) == 1
        else gxe.ExpectCompoundColumnsToBeUnique(column_list=key),
    ]
    for column in contract.columns:
        if not column.nullable or column.name in contract.key:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column.name))
        if column.min is not None or column.max is not None:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(column=column.name, min_value=column.min, max_value=column.max)
            )
    return gx.ExpectationSuite(name=contract.name, expectations=expectations)


def profile_table(contract: TableContract, frame: pl.DataFrame) -> dict[str, Any]:
    """Row count and mean/p50/p90/min/max of each numeric non-key contract column."""
    names = [
        c.name
        for c in contract.columns
        if c.dtype.is_numeric() and _frame_dtype(frame, c.name).is_numeric() and c.name not in contract.key
    ]
    exprs = []
    for name in names:
        col = pl.col(name).cast(pl.Float64)
        exprs += [
            col.mean().alias(f"{name}|mean"),
            col.quantile(0.5, interpolation="linear").alias(f"{name}|p50"),
            col.quantile(0.9, interpolation="linear").alias(f"{name}|p90"),
            col.min().alias(f"{name}|min"),
            col.max().alias(f"{name}|max"),
        ]
    stats = frame.select(exprs).row(0, named=True) if exprs else {}
    return {
        "row_count": frame.height,
        "columns": {name: {s: _finite_or_none(stats[f"{name}|{s}"]) for s in PROFILE_STATS} for name in names},
    }


def build_reference_profile(previous: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The median of earlier profiles: row count and each column statistic; None without any.

    A median of a few weeks, not the last week alone, so one unusually busy or quiet week
    neither fails the next normal one nor hides a collapse.
    """
    if not previous:
        return None
    columns = {name for p in previous for name in p.get("columns", {})}
    return {
        "row_count": statistics.median(p["row_count"] for p in previous),
        "snapshots": len(previous),
        "columns": {
            name: {
                stat: _median_or_none(p.get("columns", {}).get(name, {}).get(stat) for p in previous)
                for stat in PROFILE_STATS
            }
            for name in sorted(columns)
        },
    }


def check_row_count(
    contract: TableContract, row_count: int, reference: dict[str, Any] | None, min_rows_ratio: float
) -> tuple[dict[str, Any] | None, str | None]:
    """(failure, warning) for a row count below `min_rows_ratio` x the reference's (median) row count.

    A served table fails; one that is not served (labels) only warns.
    """
    if reference is None or row_count == 0:  # an empty table fails the suite's own row-count expectation
        return None, None
    min_rows = max(1, math.ceil(reference["row_count"] * min_rows_ratio))
    if row_count >= min_rows:
        return None, None
    basis = (
        f"{min_rows_ratio:g} x the median {reference['row_count']:g} rows "
        f"of the last {reference.get('snapshots', 1)} passed snapshot(s)"
    )
    if not contract.served:
        return None, f"{contract.name} row count {row_count} is below {min_rows} ({basis}): not blocking, not served"
    hint = f"{basis}; if the drop is real, set RECSYS_MIN_ROWS_RATIO lower (now {min_rows_ratio:g}) to accept it"
    return _failure("expect_table_row_count_to_be_between", [], {"min_value": min_rows}, row_count, hint=hint), None


def detect_drift(
    contract: TableContract,
    profile: dict[str, Any],
    reference: dict[str, Any] | None,
    threshold: float,
) -> list[str]:
    """Messages for drift columns whose mean/p50/p90 moved more than threshold (relative) from the reference."""
    if reference is None:
        return []
    messages = []
    against = f"the median of the last {reference.get('snapshots', 1)} passed snapshot(s)"
    for name in contract.drift_columns:
        now = profile["columns"].get(name, {})
        before = reference.get("columns", {}).get(name, {})
        for stat in DRIFT_STATS:
            new, old = now.get(stat), before.get(stat)
            if new is None or old is None or new == old:
                continue
            # From zero any move is unbounded: report it rather than divide by zero.
            change = (new - old) / abs(old) if old != 0 else math.copysign(math.inf, new - old)
            if abs(change) > threshold:
                messages.append(
                    f"{contract.name}.{name} {stat} moved {old:.4g} -> {new:.4g} "
                    f"({change:+.0%}) against {against}, beyond the drift threshold {threshold:.0%}"
                )
    return messages


def validate_table(
    contract: TableContract,
    frame: pl.DataFrame,
    *,
    as_of: date,
    previous: Sequence[dict[str, Any]] | None,
    min_rows_ratio: float,
    drift_threshold: float,
    drift_blocks: bool,
    runner: "SuiteRunner | None" = None,
) -> ValidationReport:
    """Validate one table's frame against its contract and its recent passed snapshots.

    `previous` holds the profiles of the last few passed snapshots (their median is the
    reference). A row count below `min_rows_ratio` x the reference, and drift when
    `drift_blocks`, fail a served table and only warn in one that is not (labels).
    `runner` is the GX context to validate in; by default the thread's (`SuiteRunner.of_this_thread`).
    """
    started = time.perf_counter()
    failures = check_rows(contract, frame, as_of=as_of, runner=runner)
    return finish_report(
        contract,
        frame,
        failures,
        as_of=as_of,
        previous=previous,
        min_rows_ratio=min_rows_ratio,
        drift_threshold=drift_threshold,
        drift_blocks=drift_blocks,
        started=started,
    )


def check_rows(
    contract: TableContract,
    frame: pl.DataFrame,
    *,
    as_of: date,
    runner: "SuiteRunner | None" = None,
    row_count: bool = True,
) -> list[dict[str, Any]]:
    """The failures of the checks made row by row: types, finite floats, as_of and the expectation suite.

    With `row_count=False`, on one user partition of a table (see `build_expectation_suite`):
    the failures of the partitions, merged (`merge_failures`), are those of the whole table
    but its row count, since no two partitions share a key (every user-keyed key starts with
    user_id and a user falls in one partition).
    """
    failures = _check_types(contract, frame) + _check_finite(contract, frame) + _check_as_of(frame, as_of)
    failures += _check_distinct(contract, frame)
    suite = build_expectation_suite(contract, row_count=row_count)
    return failures + (runner or SuiteRunner.of_this_thread()).run(suite, frame)


def check_not_empty(contract: TableContract, frame: pl.DataFrame) -> list[dict[str, Any]]:
    """The suite's row-count expectation on a table merged from partitions checked without it (none for a
    contract whose table may be empty, as in `build_expectation_suite`)."""
    if frame.height or contract.may_be_empty:
        return []
    return [_failure("expect_table_row_count_to_be_between", [], {"min_value": 1}, 0)]


def merge_failures(parts: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The failures of a table from those of its partitions: one per expectation (and columns and
    expected values), unexpected counts summed, the first examples kept, in order of first appearance."""
    merged: dict[str, dict[str, Any]] = {}
    for failures in parts:
        for failure in failures:
            key = repr((failure["expectation"], failure["columns"], _json_safe(failure["expected"])))
            seen = merged.get(key)
            if seen is None:
                merged[key] = {**failure, "examples": list(failure["examples"])}
                continue
            if failure["unexpected_count"] is not None:
                seen["unexpected_count"] = (seen["unexpected_count"] or 0) + failure["unexpected_count"]
            if seen["observed"] is None:
                seen["observed"] = failure["observed"]
            room = _MAX_EXAMPLES - len(seen["examples"])
            seen["examples"] += [e for e in failure["examples"] if e not in seen["examples"]][: max(room, 0)]
    return list(merged.values())


def finish_report(
    contract: TableContract,
    frame: pl.DataFrame,
    failures: list[dict[str, Any]],
    *,
    as_of: date,
    previous: Sequence[dict[str, Any]] | None,
    min_rows_ratio: float,
    drift_threshold: float,
    drift_blocks: bool,
    started: float | None = None,
) -> ValidationReport:
    """The table's report from the failures of its row checks (`check_rows`) and the checks of the
    whole table: its profile, its row count and drift against its recent passed snapshots."""
    started = time.perf_counter() if started is None else started
    failures = list(failures)
    profile = profile_table(contract, frame)
    reference = build_reference_profile(previous)
    collapse, row_count_warning = check_row_count(contract, frame.height, reference, min_rows_ratio)
    drift = detect_drift(contract, profile, reference, drift_threshold)
    drift_fails = drift_blocks and contract.served
    failures += [collapse] if collapse else []
    if drift_fails:
        hint = (
            f"if the change is real, set RECSYS_DRIFT_THRESHOLD higher (now {drift_threshold:g}) "
            "or RECSYS_DRIFT_BLOCKS=false to accept it"
        )
        failures += [_failure("expect_no_drift", [], {"threshold": drift_threshold}, m, hint=hint) for m in drift]
    report = ValidationReport(
        table=contract.name,
        as_of=as_of,
        success=not failures,
        row_count=frame.height,
        failures=failures,
        warnings=[] if drift_fails else drift,
        profile=profile,
        row_count_warning=row_count_warning,
    )
    log.info("validated %s in %.2fs", report.summary_line(), time.perf_counter() - started)
    return report


def validate_tables(
    frames: dict[str, pl.DataFrame],
    *,
    as_ofs: dict[str, date],
    previous: dict[str, Sequence[dict[str, Any]]],
    min_rows_ratio: float,
    drift_threshold: float,
    drift_blocks: bool,
    checked: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, ValidationReport]:
    """Validate each named table against its contract, all through the thread's GX context.

    `as_ofs` and `previous` (profiles of the last few passed snapshots, see `validate_table`) are per table.
    A table in `checked` had its rows checked where it was computed, in user partitions (`check_rows`
    without the row count, failures merged by `merge_failures`): only its row count, profile and
    history are checked here, on the merged table.
    """
    runner = SuiteRunner.of_this_thread()
    checked = checked or {}
    reports = {}
    for name, frame in frames.items():
        options = {"previous": previous.get(name), "min_rows_ratio": min_rows_ratio,
                   "drift_threshold": drift_threshold, "drift_blocks": drift_blocks}  # fmt: skip
        if name in checked:
            failures = check_not_empty(CONTRACTS[name], frame) + checked[name]
            reports[name] = finish_report(CONTRACTS[name], frame, failures, as_of=as_ofs[name], **options)
        else:
            reports[name] = validate_table(CONTRACTS[name], frame, as_of=as_ofs[name], runner=runner, **options)
    return reports


_THREADS = threading.local()  # each thread's SuiteRunner


class SuiteRunner:
    """Runs expectation suites on polars frames through one ephemeral GX context.

    Cheaper than GX's usual path, for the same checks and report:
    - one context, data source and batch definition for every table, not one each;
    - a validator on the batch rather than a validation definition, which would store
      every result, and rather than `Batch.validate`, which loads the batch (and GX
      fingerprints every row of it) a second time;
    - BOOLEAN_ONLY results, which compute only what pass/fail needs; only failed
      expectations are run again with SUMMARY for the observed values and examples;
    - expectations GX is slow at on large frames (key uniqueness: a pandas `duplicated`)
      are evaluated with polars instead, reported under the same expectation name.
    """

    def __init__(self) -> None:
        gx = _import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._batches = (
            context.data_sources.add_pandas("features")
            .add_dataframe_asset("table")
            .add_batch_definition_whole_dataframe("table")
        )

    @classmethod
    def of_this_thread(cls) -> "SuiteRunner":
        """The calling thread's runner, made at its first use and reused by every later validation in that
        thread (weeks, tables, partitions): building a context costs 0.2-0.5 s, which a run of many small
        weeks paid once per week (about 2% of the test suite's CPU, py-spy)."""
        runner = getattr(_THREADS, "runner", None)
        if runner is None:
            runner = _THREADS.runner = cls()
        return runner

    def run(self, suite: "gx.ExpectationSuite", frame: pl.DataFrame) -> list[dict[str, Any]]:
        """The failures of `suite` on `frame`, each with what was observed."""
        gx = _import_gx()
        in_polars = [e for e in suite.expectations if e.expectation_type in _POLARS_CHECKS]
        failures = [f for e in in_polars if (f := _POLARS_CHECKS[e.expectation_type](e, frame)) is not None]
        in_gx = [e for e in suite.expectations if e.expectation_type not in _POLARS_CHECKS]
        if not in_gx:
            return failures
        data = {"dataframe": frame.to_pandas()}
        outcome = self._validator(data, "BOOLEAN_ONLY").validate_expectation_suite(
            gx.ExpectationSuite(name=suite.name, expectations=in_gx)
        )
        if outcome.success:
            return failures
        detail = self._validator(data, "SUMMARY")
        failed = [r.expectation_config.to_domain_obj() for r in outcome.results if not r.success]
        return failures + [_failure_from_result(detail.validate_expectation(e)) for e in failed]

    def _validator(self, batch_parameters: dict[str, Any], result_format: str) -> Any:
        from great_expectations.validator.v1_validator import Validator

        return Validator(batch_definition=self._batches, batch_parameters=batch_parameters, result_format=result_format)


def _import_gx() -> Any:
    # GX reads this when a context starts; analytics would otherwise try the network.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _failure_from_result(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = config.kwargs
    columns = kwargs.get("column_list") or ([kwargs["column"]] if "column" in kwargs else [])
    expected = {k: v for k, v in kwargs.items() if k not in _TARGET_KWARGS}
    details = result.result or {}
    observed = details.get("details", {}).get("mismatched") or details.get("observed_value")
    error = _exception_message(result.exception_info)
    if error is not None:
        observed = f"error: {error}"
    return _failure(
        config.type,
        columns,
        expected,
        observed,
        unexpected_count=details.get("unexpected_count"),
        examples=details.get("partial_unexpected_list", [])[:_MAX_EXAMPLES],
    )


def _exception_message(info: dict[str, Any] | None) -> str | None:
    # GX gives either one exception dict or one per failed metric.
    entries = [info] if info and "raised_exception" in info else list((info or {}).values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return (entry.get("exception_message") or "unknown error").splitlines()[0]
    return None


def _check_unique(expectation: Any, frame: pl.DataFrame) -> dict[str, Any] | None:
    """GX's key-uniqueness expectation, in polars: GX's pandas `duplicated` costs seconds per million rows."""
    columns = list(expectation.column_list) if hasattr(expectation, "column_list") else [expectation.column]
    if any(c not in frame.columns for c in columns):
        return None  # reported by the column-set expectation
    keys = frame.select(columns)
    if is_sorted_by(keys, columns, strict=True):
        return None  # strictly increasing keys are unique: one cheap pass over frames written in key order
    repeated = keys.filter(keys.is_duplicated())
    if repeated.is_empty():
        return None
    return _failure(
        expectation.expectation_type,
        columns,
        {},
        None,
        unexpected_count=repeated.height,
        examples=repeated.unique(maintain_order=True).head(_MAX_EXAMPLES).rows(),
    )


def is_sorted_by(frame: pl.DataFrame, columns: list[str], *, strict: bool = False) -> bool:
    """Whether rows are in ascending (strictly: and never repeated) lexicographic order of `columns`."""
    in_order, ties = pl.lit(True), pl.lit(True)
    for name in columns:
        now, before = pl.col(name), pl.col(name).shift(1)
        in_order = in_order & (ties.not_() | (now >= before))
        ties = ties & (now == before)
    if strict:
        in_order = in_order & ties.not_()
    # The first row has nothing before it; nulls never count as in order.
    first = pl.int_range(pl.len()) == 0
    return bool(frame.select((first | in_order.fill_null(False)).all()).item())


_POLARS_CHECKS = {
    "expect_compound_columns_to_be_unique": _check_unique,
    "expect_column_values_to_be_unique": _check_unique,
}


def _check_types(contract: TableContract, frame: pl.DataFrame) -> list[dict[str, Any]]:
    # Columns the frame lacks are reported by the column-set expectation.
    return [
        _failure(
            "expect_column_values_to_be_of_type",
            [column.name],
            {"type_": str(column.dtype)},
            str(frame.schema[column.name]),
        )
        for column in contract.columns
        if column.name in frame.schema and frame.schema[column.name] != column.dtype
    ]


def _check_finite(contract: TableContract, frame: pl.DataFrame) -> list[dict[str, Any]]:
    # GX treats NaN as missing (a nullable column lets it through) and a one-sided
    # range lets +inf through, so float columns get their own check.
    names = [c.name for c in contract.columns if _frame_dtype(frame, c.name).is_float()]
    failures = []
    for name in names:
        values = frame.get_column(name)
        bad = values.filter(~values.is_finite())  # nulls drop out: not-null checks them
        if not bad.is_empty():
            failures.append(
                _failure(
                    "expect_column_values_to_be_finite",
                    [name],
                    {},
                    None,
                    unexpected_count=bad.len(),
                    examples=bad.head(_MAX_EXAMPLES).to_list(),
                )
            )
    return failures


def _check_distinct(contract: TableContract, frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows whose two `contract.distinct_columns` are equal (e.g. an item as its own next item)."""
    if contract.distinct_columns is None or any(c not in frame.columns for c in contract.distinct_columns):
        return []  # missing columns are reported by the column-set expectation
    first, second = contract.distinct_columns
    same = frame.filter(pl.col(first) == pl.col(second)).select(first, second)
    if same.is_empty():
        return []
    return [
        _failure(
            "expect_column_pair_values_to_differ",
            [first, second],
            {},
            None,
            unexpected_count=same.height,
            examples=same.head(_MAX_EXAMPLES).rows(),
            hint=f"{contract.name}: {first} and {second} must differ in every row",
        )
    ]


def _check_as_of(frame: pl.DataFrame, as_of: date) -> list[dict[str, Any]]:
    if "as_of" not in frame.columns:
        return []  # reported by the column-set expectation
    others = frame.get_column("as_of").filter(frame.get_column("as_of") != as_of)
    if others.is_empty():
        return []
    return [
        _failure(
            "expect_column_values_to_equal_snapshot_as_of",
            ["as_of"],
            {"value": as_of},
            None,
            unexpected_count=others.len(),
            examples=others.unique().sort().head(_MAX_EXAMPLES).to_list(),
        )
    ]


def _failure(
    expectation: str,
    columns: list[str],
    expected: dict[str, Any],
    observed: Any,
    *,
    unexpected_count: int | None = None,
    examples: list[Any] | None = None,
    hint: str | None = None,
) -> dict[str, Any]:
    return {
        "expectation": expectation,
        "columns": list(columns),
        "expected": expected,
        "observed": observed,
        "unexpected_count": unexpected_count,
        "examples": examples or [],
        **({"hint": hint} if hint else {}),
    }


def _median_or_none(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _observed_text(failure: dict[str, Any]) -> str:
    parts = []
    if failure["observed"] is not None:
        parts.append(_compact(failure["observed"]))
    if failure["unexpected_count"] is not None:
        parts.append(f"{failure['unexpected_count']} unexpected")
    if failure["examples"]:
        parts.append(f"e.g. {_compact(failure['examples'])}")
    return ", ".join(parts) or "-"


def _compact(value: Any) -> str:
    value = _json_safe(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _frame_dtype(frame: pl.DataFrame, name: str) -> pl.DataType:
    return frame.schema.get(name, pl.Null())


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """Plain JSON types; non-finite floats as strings (jsonb has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy and pandas scalars
        return _json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return value
    return str(value)
