"""The promotion gate's reasons and its choice of the best baseline by the gate's own metric.

Written to kill mutmut's survivors in `training/promotion.py` (issue #17): the decision is what
the registry records and the flow returns, the reason is what an operator reads, so each test
pins one rule of either.
"""

import pytest

from tests.evidence import FIRST_WEEK, evidence
from training.bootstrap import bootstrap_gain
from training.promotion import decide, pick_best_baseline


def gate(pooled, *, margin: float = 0.0, champion_baseline: str | None = None, weeks=None):
    return decide(
        pooled.metrics, pooled.gains, metric="ndcg@10", margin=margin, champion_baseline=champion_baseline,
        weeks=pooled.weeks if weeks is None else weeks,
    )  # fmt: skip


def test_a_candidate_below_both_champion_and_best_baseline_names_both_in_the_reason():
    decision = gate(evidence(500, {"model": 0.10, "champion": 0.30, "ease": 0.30}))
    assert decision.promote is False and decision.serve_baseline is None
    assert "the lower bound over the champion and ease does not clear the margin 0.00%" in decision.reason


def test_a_candidate_equal_to_the_baseline_is_not_called_a_noisy_gain():
    # The same per-unit values for both: a gain of exactly 0, equal to a margin of 0 but not above it.
    values = [1.0, 0.0, 1.0, 1.0, 0.0] * 40
    gains = {"ease": bootstrap_gain(values, values)}
    results = {"model": {"ndcg@10": 0.6}, "ease": {"ndcg@10": 0.6}}
    assert gains["ease"].relative_gain == 0.0 and not gains["ease"].clears(0.0)
    decision = decide(results, gains, metric="ndcg@10", margin=0.0)
    assert decision.promote is False and decision.serve_baseline == "ease"
    assert decision.reason.endswith("the lower bound over ease does not clear the margin 0.00%")


def test_the_reason_names_the_span_of_weeks_it_pooled():
    pooled = evidence(100, {"model": 0.3, "ease": 0.1}, weeks=1)
    assert gate(pooled).reason.endswith(f"the lower bound clears the margin 0.00% (holdout {FIRST_WEEK})")
    assert gate(pooled, weeks=()).reason.endswith("the lower bound clears the margin 0.00%")


def test_a_kept_baseline_champion_or_a_refused_candidate_is_a_false_decision_not_a_missing_one():
    kept = gate(evidence(500, {"model": 0.10, "ease": 0.30}), champion_baseline="ease")
    assert kept.promote is False and kept.reason.startswith("keeps the champion")
    served = gate(evidence(500, {"model": 0.10, "ease": 0.30}))
    assert served.promote is False and served.serve_baseline == "ease"


def test_the_best_baseline_is_the_best_by_the_gate_metric():
    pooled = evidence(500, {"model": 0.30, "ease": 0.25, "recent_popular": 0.10})
    # By recall, recent_popular is the best baseline; by NDCG ease is.
    results = {
        "model": pooled.metrics["model"] | {"recall@10": 0.50},
        "ease": pooled.metrics["ease"] | {"recall@10": 0.20},
        "recent_popular": pooled.metrics["recent_popular"] | {"recall@10": 0.60},
    }
    decision = decide(results, pooled.gains, metric="recall@10", margin=0.0)
    assert decision.reason.startswith("no champion yet: candidate recall@10 vs recent_popular (the best baseline)")


def test_a_baseline_without_the_metric_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"^baseline ease: metrics lack 'ndcg@10' \(have \['users'\]\)$"):
        pick_best_baseline({"recent_popular": {"ndcg@10": 0.1}, "ease": {"users": 3}})
    with pytest.raises(ValueError, match="^pick_best_baseline: no baselines given$"):
        pick_best_baseline({})
