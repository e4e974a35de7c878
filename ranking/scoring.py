"""Scoring with a trained ranker: the feature matrix, scores, top-N, and the model check inference needs."""

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

from ranking.candidates import FEATURE_NAMES, PRIOR_FEATURE, CandidateConfig, SnapshotTables, build_ranking_frame
from recsys.errors import ExpectedError

log = logging.getLogger(__name__)

TIE_BREAK = "item_popularity_rank_4w"
# Rows of every batch a compiled forest also scores with LightGBM: a compiled forest that ever disagrees is
# dropped for LightGBM (`CompiledForest.predict`). Their cost is ~1% of a 5,000-user batch.
CHECKED_ROWS = 256
CHECK_RELATIVE = 1e-9
# Compiling costs about as much CPU as LightGBM scoring ~1M candidate rows (~35 ms per tree against ~30 ns
# per tree and row saved): below that many rows to score, LightGBM scores them.
COMPILE_MIN_ROWS = 1_000_000


@dataclass(frozen=True)
class ScoringModel:
    """A booster with the feature names and category encoding it was trained with, and the candidate
    counts it was trained on (None: whatever the caller's config gives)."""

    booster: "lgb.Booster | CompiledForest"  # compiled for speed by evaluation; explanations need a Booster
    feature_names: list[str]
    categories: list[str]
    config: CandidateConfig | None = None


class IncompatibleModelError(ExpectedError, ValueError):
    """The champion needs features or encodings that this code and snapshot cannot provide."""


def user_batches(users: pl.Series | list[int], size: int) -> list:
    """`users` (a Series or a list) in consecutive batches of at most `size`, in order; none if empty."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [users[start : start + size] for start in range(0, len(users), size)]


@contextmanager
def timed(steps: dict[str, float] | None, step: str) -> Iterator[None]:
    """Add the seconds the block takes to `steps[step]`; nothing when `steps` is None (a profile is optional)."""
    if steps is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        steps[step] = steps.get(step, 0.0) + time.perf_counter() - started


def feature_matrix(frame: pl.DataFrame, feature_names: list[str], *, rows_contiguous: bool = False) -> np.ndarray:
    """The features as float64, one column each; `rows_contiguous` lays each row out contiguously (C order),
    which tree evaluation reads row by row (LightGBM ~20% faster; lleaves needs it).

    Column-major, it is filled one column at a time: a float64 copy of the whole frame beside the
    matrix would double the memory it takes (the same values either way)."""
    if rows_contiguous:
        return frame.select(pl.col(feature_names).cast(pl.Float64)).to_numpy(order="c")
    matrix = np.empty((frame.height, len(feature_names)), dtype=np.float64, order="F")
    for j, name in enumerate(feature_names):
        matrix[:, j] = frame.get_column(name).cast(pl.Float64).to_numpy()
    return matrix


class CompiledForest:
    """A LightGBM model compiled to native code by `lleaves`: LightGBM's scores, bit for bit, ~6× faster.

    Compiled with one block of trees so each row sums its trees in LightGBM's order (lleaves' default
    blocks of 34 trees add the blocks' partial sums: scores differ in the last bits and near-ties can
    swap). Every `predict` also scores `CHECKED_ROWS` rows with LightGBM; on any difference above
    `CHECK_RELATIVE` the forest logs it and serves LightGBM's scores from then on.
    """

    def __init__(self, compiled, booster: lgb.Booster, sha256: str):
        self.compiled, self.booster, self.sha256 = compiled, booster, sha256
        self.failed: str | None = None

    def predict(self, matrix: np.ndarray, num_threads: int = 1) -> np.ndarray:
        if self.failed:
            return self.booster.predict(matrix, num_threads=num_threads)
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        scores = self.compiled.predict(matrix, n_jobs=1)
        sample = np.linspace(0, len(matrix) - 1, min(len(matrix), CHECKED_ROWS)).astype(np.int64)
        expected = self.booster.predict(matrix[sample], num_threads=1)
        worst = _relative_difference(scores[sample], expected)
        if worst > CHECK_RELATIVE:
            self.failed = f"its scores differ from LightGBM's by up to {worst:.3g} (relative)"
            log.error("compiled model %s dropped for LightGBM: %s", self.sha256[:12], self.failed)
            return self.booster.predict(matrix, num_threads=num_threads)
        return scores


def _relative_difference(scores: np.ndarray, expected: np.ndarray) -> float:
    if not len(scores):
        return 0.0
    same = (scores == expected) | (np.isnan(scores) & np.isnan(expected))
    gap = np.abs(scores - expected) / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)
    return float(np.where(same, 0.0, np.nan_to_num(gap, nan=np.inf)).max())


# The compiled models of this process, most recently used last: a long-lived process (`recsys serve`)
# meets a new champion every week, so only the last few are kept.
COMPILED_KEPT = 4
_compiled: "OrderedDict[tuple[str, str], CompiledForest | None]" = OrderedDict()
_compiling = threading.Lock()


def compile_booster(
    booster: lgb.Booster, *, rows: int | None = None, cache_dir: Path | None = None
) -> "CompiledForest | lgb.Booster":
    """`booster` compiled to native code (`CompiledForest`), or `booster` itself: when fewer than
    `COMPILE_MIN_ROWS` candidate `rows` are to be scored (None: compile whatever the rows), or, with the
    reason logged, when it cannot be compiled (lleaves missing, a model it does not support).

    Compiled once per model and process (~10 s CPU for 200 trees); with `cache_dir` the object code is
    kept there, named by the model text's sha256 and the CPU it targets, and loaded by later runs.
    """
    if rows is not None and rows < COMPILE_MIN_ROWS:
        return booster
    text = booster.model_to_string()
    sha = hashlib.sha256(text.encode()).hexdigest()
    key = (sha, str(cache_dir))
    with _compiling:  # partitions on threads share one compilation
        if key not in _compiled:
            _compiled[key] = _compile(text, booster, sha, cache_dir)
            while len(_compiled) > COMPILED_KEPT:
                _compiled.popitem(last=False)
        _compiled.move_to_end(key)
        compiled = _compiled[key]
    return compiled or booster


def _compile(text: str, booster: lgb.Booster, sha: str, cache_dir: Path | None) -> CompiledForest | None:
    started = time.perf_counter()
    try:
        import lleaves
        import llvmlite.binding as llvm
    except ImportError as error:
        log.warning("model %s scored by LightGBM: lleaves cannot be imported (%s)", sha[:12], error)
        return None
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as folder:
        model_file = Path(folder) / "model.txt"
        model_file.write_text(text)
        try:
            compiled = lleaves.Model(model_file=str(model_file))
            cache = None
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                llvm.initialize_native_target()
                versions = f"lleaves {metadata.version('lleaves')} llvmlite {metadata.version('llvmlite')}"
                target = f"{llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()} {versions}"
                cache = cache_dir / f"{sha}-{hashlib.sha256(target.encode()).hexdigest()[:16]}.o"
            if cache is not None and cache.exists():
                compiled.compile(cache=str(cache), raw_score=True, fblocksize=compiled.num_trees())
                how = f"loaded from {cache}"
            else:
                # lleaves writes its cache file as it compiles: a temporary name, renamed when complete, so a
                # concurrent run never loads half a file.
                partial = None if cache is None else cache.with_suffix(f".{os.getpid()}.partial")
                compiled.compile(cache=partial and str(partial), raw_score=True, fblocksize=compiled.num_trees())
                if partial is not None:
                    partial.replace(cache)
                how = "compiled" + ("" if cache is None else f", kept in {cache}")
        except Exception as error:  # noqa: BLE001 - any compiler failure means LightGBM scores, as before
            log.warning("model %s scored by LightGBM: lleaves could not compile it (%s: %s)",
                        sha[:12], type(error).__name__, error)  # fmt: skip
            return None
    log.info("model %s (%d trees) %s in %.1fs", sha[:12], compiled.num_trees(), how, time.perf_counter() - started)
    return CompiledForest(compiled, booster, sha)


def prior_scores(frame: pl.DataFrame, feature_names: list[str]) -> np.ndarray | None:
    """The starting score the trees add to, when the model was trained from one."""
    if PRIOR_FEATURE not in feature_names:
        return None
    return frame.get_column(PRIOR_FEATURE).cast(pl.Float64).fill_null(0.0).to_numpy()


def score(booster: "lgb.Booster | CompiledForest", frame: pl.DataFrame, feature_names: list[str]) -> pl.DataFrame:
    """Add the model's score to every candidate row: its trees plus the prior it was trained from, if any.
    `booster` may be compiled (`compile_booster`): the same scores."""
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(f"the candidate frame lacks features the model was trained with: {missing}")
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Float64).alias("score"))
    scores = booster.predict(feature_matrix(frame, feature_names, rows_contiguous=True), num_threads=1)
    prior = prior_scores(frame, feature_names)
    return frame.with_columns(pl.Series("score", scores if prior is None else scores + prior))


def top_n(scored: pl.DataFrame, n: int, score_column: str = "score") -> pl.DataFrame:
    """Each user's best `n` items as rows (user_id, item_id, rank).

    Ties in score go to the more popular item (lower `item_popularity_rank_4w`, when the
    frame has it), then to the lower item id: a shallow model scores many items alike,
    and popularity is the best guess among them.
    """
    tie_breaks = [c for c in (TIE_BREAK, "item_id") if c in scored.columns]
    # Only the ordering columns travel through the sort (the scored frame has ~50), and only
    # rows that can be in a top n: those with fewer than n better scores in their user (ties
    # kept, so the tie-breaks below still decide). Sorting every row with every column took
    # ~4% of scoring, this ~1% (benchmarks/README.md, scoring steps).
    keys = scored.select("user_id", score_column, *dict.fromkeys([*tie_breaks, "item_id"]))
    if _orderable(keys.get_column(score_column)):
        keys = keys.filter(pl.col(score_column).rank("min", descending=True).over("user_id") <= n)
    return (
        keys.sort(["user_id", score_column, *tie_breaks], descending=[False, True, *[False] * len(tie_breaks)])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
        .filter(pl.col("rank") <= n)
        .select("user_id", "item_id", "rank")
    )


def _orderable(scores: pl.Series) -> bool:
    """Whether ranking the scores orders them as the sort does: no nulls, no NaN (the sort puts both first)."""
    if scores.null_count():
        return False
    return not (scores.dtype.is_float() and scores.is_nan().any())


def recommend_with_model(
    booster: "lgb.Booster | CompiledForest",
    feature_names: list[str],
    tables: SnapshotTables,
    users: pl.Series,
    config: CandidateConfig,
    categories: list[str],
    n: int,
    *,
    frame: pl.DataFrame | None = None,
    steps: dict[str, float] | None = None,
) -> pl.DataFrame:
    """Top-n (user_id, item_id, rank) by the model over the shared candidate frame.

    Pass `frame` when the ranking frame of these users was already built with the same
    config and categories; `steps` adds each step's seconds (frame, predict, top_n).
    """
    if frame is None:
        with timed(steps, "frame"):
            frame = build_ranking_frame(tables, users, config, categories)
    with timed(steps, "predict"):
        scored = score(booster, frame, feature_names)
    with timed(steps, "top_n"):
        return top_n(scored, n)


def check_model(feature_names: list[str], encodings: dict, model: str) -> None:
    """Refuse a model that needs features or encodings the candidate frame cannot build."""
    missing = [f for f in feature_names if f not in FEATURE_NAMES]
    if missing:
        raise IncompatibleModelError(
            f"model {model} was trained with features this code does not build from a feature "
            f"snapshot: {missing}; retrain it (recsys train) or roll back to a compatible model"
        )
    if not isinstance(encodings.get("category"), list):
        raise IncompatibleModelError(
            f"model {model} has no category encoding (encodings['category']); retrain it (recsys train)"
        )
