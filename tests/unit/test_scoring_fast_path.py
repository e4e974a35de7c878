"""The fast scoring path (issue #16) publishes exactly the lists the straightforward one did.

`full_sort_top_n` is `ranking.scoring.top_n` as it was before the speed-up: every candidate
row, every column, sorted. The fast path must give the same rows on frames full of ties,
and the same published lists on a small fixed synthetic world with a trained ranker. The
compiled model (`compile_booster`, lleaves) must give LightGBM's scores bit for bit, so that
no near-tie can be ordered differently.
"""

import logging
import sys
from collections import OrderedDict
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.synthetic import generate_log
from features.transform import build_feature_tables, build_labels, week_start
from inference import scoring
from ranking import scoring as ranking_scoring
from ranking.candidates import CandidateConfig, SnapshotTables, build_ranking_frame, category_encoding
from ranking.scoring import TIE_BREAK, CompiledForest, compile_booster, feature_matrix, score, top_n
from training.frames import labelled_frame
from training.ranker import RankerParams, train_ranker

AS_OF = date(2026, 11, 23)


def full_sort_top_n(scored: pl.DataFrame, n: int, score_column: str = "score") -> pl.DataFrame:
    tie_breaks = [c for c in (TIE_BREAK, "item_id") if c in scored.columns]
    return (
        scored.sort(["user_id", score_column, *tie_breaks], descending=[False, True, *[False] * len(tie_breaks)])
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("rank"))
        .filter(pl.col("rank") <= n)
        .select("user_id", "item_id", "rank")
    )


@st.composite
def scored_frames(draw) -> pl.DataFrame:
    """Candidate rows of a few users with scores and popularity ranks drawn from tiny sets: many ties."""
    pairs = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 30)), min_size=0, max_size=60, unique=True))
    scores = draw(st.lists(st.sampled_from([0.0, 0.5, 1.25, -2.0, 3.0]), min_size=len(pairs), max_size=len(pairs)))
    ranks = draw(st.lists(st.integers(1, 4), min_size=len(pairs), max_size=len(pairs)))
    return pl.DataFrame(
        {
            "user_id": [u for u, _ in pairs],
            "item_id": [i for _, i in pairs],
            "score": scores,
            TIE_BREAK: ranks,
            "other_feature": [float(i) for _, i in pairs],
        },
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "score": pl.Float64, TIE_BREAK: pl.Int64,
                "other_feature": pl.Float64},
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(frame=scored_frames(), n=st.integers(1, 8))
def test_top_n_ranks_exactly_as_sorting_every_row(frame, n):
    assert top_n(frame, n).equals(full_sort_top_n(frame, n))


@settings(max_examples=50, deadline=None)
@given(frame=scored_frames(), n=st.integers(1, 8))
def test_top_n_without_popularity_ties_by_item_id_as_before(frame, n):
    frame = frame.drop(TIE_BREAK)
    assert top_n(frame, n).equals(full_sort_top_n(frame, n))


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_top_n_with_missing_or_nan_scores_orders_them_as_sorting_does(bad):
    frame = pl.DataFrame(
        {"user_id": [1, 1, 1, 2], "item_id": [1, 2, 3, 4], "score": [1.0, bad, 2.0, 0.5]},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "score": pl.Float64},
    )
    assert top_n(frame, 2).equals(full_sort_top_n(frame, 2))


@pytest.fixture(scope="module")
def world() -> tuple[SnapshotTables, object, list[str], list[str]]:
    """A fixed small synthetic world (seeded log, snapshot as the feature flow builds it) and a ranker
    trained on the week before, with default parameters but few trees (more than one block of lleaves'
    default 34 trees, so that a compiled forest summing its trees in blocks would show)."""
    raw = generate_log(n_users=400, n_items=300, n_events=40_000, n_weeks=8, end=week_start(AS_OF), seed=3)
    snapshot = AS_OF - timedelta(days=7)
    train_tables = SnapshotTables.from_frames(
        build_feature_tables(raw.events, raw.items, snapshot, recent_items=20, neighbours=20)
    )
    categories = category_encoding(train_tables.item_features)
    frame = labelled_frame(
        train_tables, build_labels(raw.events, snapshot), snapshot, CandidateConfig(), categories,
        negatives_per_user=50, seed=1, max_users=None, batch_users=200,
    )  # fmt: skip
    model = train_ranker(frame, frame, RankerParams(n_estimators=60, min_child_samples=5, num_threads=1))
    tables = SnapshotTables.from_frames(
        build_feature_tables(raw.events, raw.items, AS_OF, recent_items=20, neighbours=20)
    )
    import lightgbm as lgb

    return tables, lgb.Booster(model_str=model.model_text), model.feature_names, categories


def test_published_lists_on_a_fixed_world_are_those_of_sorting_every_row(world):
    tables, booster, feature_names, categories = world
    users = tables.user_features.get_column("user_id").sort()
    config = CandidateConfig()
    fast = scoring.recommend_users(booster, feature_names, categories, tables, users, config, 20)

    scored = score(booster, build_ranking_frame(tables, users, config, categories), feature_names)
    expected = (
        full_sort_top_n(scored, 20)
        .sort("user_id", "rank")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").alias("items"))
    )
    assert fast.height > 300 and fast.get_column("items").list.len().min() == 20
    assert fast.equals(expected)


def test_partition_stats_sum_the_scoring_steps_and_keep_the_wall_time():
    parts = [
        {"personal": 90, "read_s": 1.0, "score_s": 4.0, "write_s": 0.5, "pid": 7,
         "score_steps": {"frame": 1.0, "predict": 2.5, "top_n": 0.5}},
        {"personal": 100, "read_s": 2.0, "score_s": 5.0, "write_s": 0.5, "pid": 7,
         "score_steps": {"frame": 1.5, "predict": 3.0, "top_n": 0.5}},
    ]  # fmt: skip
    stats = scoring.combine_partition_stats(parts, 200, 8.0)
    assert stats["score_steps"] == {"frame": 2.5, "predict": 5.5, "top_n": 1.0}
    assert stats["partitions_s"] == 8.0 and stats["users_per_s"] == 25.0
    assert stats["fallback_users"] == 10 and stats["worker_pids"] == [7]


@pytest.fixture(scope="module")
def compiled(world) -> CompiledForest:
    _, booster, _, _ = world
    forest = compile_booster(booster)
    assert isinstance(forest, CompiledForest), "lleaves is a dependency: the model must compile"
    return forest


def test_compiled_model_scores_every_candidate_exactly_as_lightgbm(world, compiled):
    tables, booster, feature_names, categories = world
    assert booster.num_trees() > 34  # more than one of lleaves' default tree blocks
    frame = build_ranking_frame(tables, tables.user_features.get_column("user_id"), CandidateConfig(), categories)
    matrix = feature_matrix(frame, feature_names)  # column-major, as a caller may pass it
    assert frame.height > 20_000 and frame.select(pl.col(feature_names).null_count()).sum_horizontal().item() > 0
    expected = booster.predict(matrix, num_threads=1)
    # Bit for bit, not approximately: a last-bit difference is enough to swap two near-tied items.
    assert (compiled.predict(matrix) == expected).all()
    assert compiled.failed is None


def test_published_lists_of_the_compiled_model_are_lightgbms(world, compiled):
    tables, booster, feature_names, categories = world
    users = tables.user_features.get_column("user_id").sort()
    config = CandidateConfig()
    fast = scoring.recommend_users(compiled, feature_names, categories, tables, users, config, 20)
    assert fast.height > 300
    assert fast.equals(scoring.recommend_users(booster, feature_names, categories, tables, users, config, 20))


class _Shifted:
    """A compiled model whose scores are off by a relative `shift` (what a compiler bug would do)."""

    def __init__(self, compiled, shift: float):
        self.compiled, self.shift = compiled, shift

    def predict(self, matrix, n_jobs):
        return self.compiled.predict(matrix, n_jobs=n_jobs) * (1 + self.shift)


def test_a_compiled_model_that_disagrees_with_lightgbm_is_dropped_for_lightgbm(world, compiled, caplog):
    tables, booster, feature_names, categories = world
    frame = build_ranking_frame(tables, tables.user_features.get_column("user_id"), CandidateConfig(), categories)
    matrix = feature_matrix(frame, feature_names, rows_contiguous=True)
    expected = booster.predict(matrix, num_threads=1)
    wrong = CompiledForest(_Shifted(compiled.compiled, 1e-6), booster, compiled.sha256)
    with caplog.at_level(logging.ERROR, logger="ranking.scoring"):
        assert (wrong.predict(matrix) == expected).all()
    assert wrong.failed and "differ from LightGBM" in caplog.text
    # Within the tolerance it stays compiled.
    close = CompiledForest(_Shifted(compiled.compiled, 1e-12), booster, compiled.sha256)
    close.predict(matrix)
    assert close.failed is None


def test_compiling_is_skipped_for_few_rows_and_falls_back_when_lleaves_is_missing(world, monkeypatch, caplog):
    _, booster, _, _ = world
    assert compile_booster(booster, rows=ranking_scoring.COMPILE_MIN_ROWS - 1) is booster
    monkeypatch.setattr(ranking_scoring, "_compiled", OrderedDict())
    monkeypatch.setitem(sys.modules, "lleaves", None)  # import lleaves raises ImportError
    with caplog.at_level(logging.WARNING, logger="ranking.scoring"):
        assert compile_booster(booster) is booster
    assert "scored by LightGBM: lleaves cannot be imported" in caplog.text


def test_a_compiled_model_is_kept_on_disk_and_loaded_by_the_next_run(world, compiled, tmp_path, monkeypatch):
    tables, booster, feature_names, categories = world
    monkeypatch.setattr(ranking_scoring, "_compiled", OrderedDict())
    first = compile_booster(booster, cache_dir=tmp_path / "compiled")
    kept = list((tmp_path / "compiled").iterdir())
    assert [p.name.startswith(compiled.sha256) and p.suffix == ".o" for p in kept] == [True]
    monkeypatch.setattr(ranking_scoring, "_compiled", OrderedDict())  # a new process
    second = compile_booster(booster, cache_dir=tmp_path / "compiled")
    assert second is not first and isinstance(second, CompiledForest)
    frame = build_ranking_frame(tables, tables.user_features.get_column("user_id"), CandidateConfig(), categories)
    matrix = feature_matrix(frame, feature_names, rows_contiguous=True)
    assert (second.predict(matrix) == booster.predict(matrix, num_threads=1)).all()


def test_a_process_keeps_only_the_last_few_compiled_models(world, monkeypatch):
    """A long-lived process (`recsys serve`) meets a new champion every week: old compilations go."""
    _, booster, _, _ = world
    monkeypatch.setattr(ranking_scoring, "_compiled", OrderedDict())
    compiled_keys = []
    monkeypatch.setattr(ranking_scoring, "_compile", lambda text, b, sha, cache_dir: compiled_keys.append(cache_dir))
    kept = ranking_scoring.COMPILED_KEPT
    folders = [Path(f"/nonexistent/{i}") for i in range(kept + 1)]  # one key per folder; never written
    for folder in folders[:kept]:
        compile_booster(booster, cache_dir=folder)
    compile_booster(booster, cache_dir=folders[0])  # used again: now the most recent
    compile_booster(booster, cache_dir=folders[kept])  # one too many: the least recently used (folders[1]) goes
    assert len(ranking_scoring._compiled) == kept
    compile_booster(booster, cache_dir=folders[0])
    assert compiled_keys == folders  # folders[0] was kept, not compiled again
    compile_booster(booster, cache_dir=folders[1])
    assert compiled_keys == [*folders, folders[1]]  # folders[1] had been dropped: compiled again
