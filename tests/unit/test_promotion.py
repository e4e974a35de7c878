import json

import pytest

from cli.models import _describe
from tests.evidence import evidence
from training.gate import PooledEvaluation
from training.promotion import decide, pick_best_baseline

BASELINES = {"recent_popular": 0.12, "all_time_popular": 0.08, "item_knn": 0.06, "ease": 0.14, "als": 0.13}


def gate(pooled: PooledEvaluation, margin: float = 0.0, champion_baseline: str | None = None):
    return decide(
        pooled.metrics, pooled.gains, metric="ndcg@10", margin=margin, champion_baseline=champion_baseline,
        weeks=pooled.weeks,
    )  # fmt: skip


def test_a_clearly_better_candidate_is_promoted_with_its_interval_in_the_reason():
    pooled = evidence(500, BASELINES | {"model": 0.30})
    decision = gate(pooled)
    assert decision.promote and decision.serve_baseline is None
    ease = pooled.gains["ease"]
    assert ease.relative_gain_low > 0
    assert decision.reason == (
        f"no champion yet: candidate ndcg@10 vs ease (the best baseline): {ease.describe()}: "
        "the lower bound clears the margin 0.00% (pooled over 4 weeks 1998-02-02 … 1998-02-23)"
    )
    assert "[95% CI" in decision.reason and "2000 units" in decision.reason


def test_a_model_worse_than_ease_is_not_promoted_even_though_it_beats_popularity():
    pooled = evidence(500, BASELINES | {"model": 0.125, "ease": 0.25})
    assert pooled.gains["recent_popular"].relative_gain > 0
    decision = gate(pooled)
    assert not decision.promote and decision.serve_baseline == "ease"
    assert decision.reason.startswith("no model has won the gate yet: serving the best baseline ease")


def test_a_tiny_holdout_never_promotes_on_noise_even_with_a_higher_point_estimate():
    pooled = evidence(12, {"recent_popular": 0.2, "model": 0.4}, weeks=1)
    gain = pooled.gains["recent_popular"]
    assert gain.relative_gain > 0.2, "the draw must favour the model, or the test proves nothing"
    decision = gate(pooled)
    assert not decision.promote and decision.serve_baseline == "recent_popular"
    assert gain.relative_gain_low < 0 < gain.relative_gain_high
    assert "the interval is too wide: 12 (user, week) units cannot tell that gain from noise" in decision.reason
    assert f"[95% CI {gain.relative_gain_low:+.2%}, {gain.relative_gain_high:+.2%}]" in decision.reason


def test_the_margin_applies_to_the_lower_bound_of_the_gain():
    pooled = evidence(500, BASELINES | {"model": 0.20})
    low = pooled.gains["ease"].relative_gain_low
    assert 0.1 < low < 0.5
    assert gate(pooled, margin=low - 0.05).promote
    refused = gate(pooled, margin=low + 0.05)
    assert not refused.promote and f"does not clear the margin {low + 0.05:.2%}" in refused.reason


def test_a_trained_champion_is_kept_unless_the_candidate_clearly_beats_it_and_the_best_baseline():
    same = evidence(500, BASELINES | {"model": 0.30, "champion": 0.30})
    kept = gate(same)
    assert not kept.promote and kept.serve_baseline is None
    assert kept.reason.startswith("keeps the champion: candidate ndcg@10 vs the champion: gain")
    assert "; vs ease (the best baseline): gain" in kept.reason

    better = gate(evidence(500, BASELINES | {"model": 0.40, "champion": 0.20}))
    assert better.promote and better.reason.startswith("promotes the candidate: ")
    assert "the lower bounds clear the margin" in better.reason

    # Beating a weak champion is not enough when a baseline is as good as the candidate.
    weak = gate(evidence(500, BASELINES | {"model": 0.30, "champion": 0.10, "ease": 0.30}))
    assert not weak.promote and weak.serve_baseline is None
    assert "the lower bound over ease does not clear" in weak.reason


def test_a_baseline_champion_that_is_still_the_best_is_kept():
    decision = gate(evidence(500, BASELINES | {"model": 0.13}), champion_baseline="ease")
    assert not decision.promote and decision.serve_baseline is None
    assert decision.reason.startswith("keeps the champion: candidate ndcg@10 vs ease (the best baseline): gain")


def test_a_baseline_champion_that_is_no_longer_the_best_is_switched_even_when_the_model_beats_it():
    for model in (0.10, 0.16):  # below, then above the champion recent_popular; never clearly above ease
        pooled = evidence(500, BASELINES | {"model": model, "ease": 0.20})
        decision = gate(pooled, champion_baseline="recent_popular")
        assert not decision.promote and decision.serve_baseline == "ease"
        assert decision.reason.startswith("the champion baseline recent_popular is no longer the best")


def test_a_model_clearly_beating_every_baseline_replaces_a_baseline_champion():
    decision = gate(evidence(500, BASELINES | {"model": 0.30}), margin=0.1, champion_baseline="ease")
    assert decision.promote and decision.serve_baseline is None
    assert decision.reason.startswith("promotes the candidate: candidate ndcg@10 vs ease")


def test_without_evaluated_units_the_gate_refuses():
    pooled = evidence(0, {"recent_popular": 0.1, "model": 0.2}, weeks=1)
    decision = gate(pooled)
    assert not decision.promote and "no evaluated (user, week) units" in decision.reason


def test_gate_refuses_missing_or_non_finite_metrics_and_negative_margin():
    pooled = evidence(50, {"recent_popular": 0.1, "model": 0.2})
    with pytest.raises(ValueError, match="margin must be >= 0"):
        gate(pooled, margin=-0.1)
    broken = pooled.metrics | {"model": {"ndcg@10": float("nan")}}
    with pytest.raises(ValueError, match="candidate: ndcg@10 is nan"):
        decide(broken, pooled.gains, metric="ndcg@10", margin=0.0)
    with pytest.raises(ValueError, match="lack 'recall@10'"):
        decide(pooled.metrics, pooled.gains, metric="recall@10", margin=0.0)


def test_pick_best_baseline_takes_the_highest_metric_and_first_name_on_ties():
    baselines = {
        "recent_popular": {"ndcg@10": 0.2},
        "item_knn": {"ndcg@10": 0.2},
        "all_time_popular": {"ndcg@10": 0.1},
    }
    assert pick_best_baseline(baselines) == ("item_knn", {"ndcg@10": 0.2})
    with pytest.raises(ValueError, match="no baselines"):
        pick_best_baseline({})


def test_gains_are_stored_as_json_with_unbounded_values_as_none_and_shown_by_models_show():
    one_unit = evidence(1, {"recent_popular": 0.5, "model": 0.5}, weeks=1).gains_record()
    assert one_unit["recent_popular"]["low"] is None and one_unit["recent_popular"]["high"] is None
    json.dumps(one_unit, allow_nan=False)

    record = evidence(500, BASELINES | {"model": 0.30}).gains_record()
    ease = record["ease"]
    shown = _describe({"metrics": {"gains": record}})
    line = next(line for line in shown.splitlines() if "model / ease" in line)
    assert line.split(maxsplit=3)[3] == (
        f"{ease['gain']:+.1%} [95% CI {ease['low']:+.1%}, {ease['high']:+.1%}] over 2000 (user, week) units"
    )
