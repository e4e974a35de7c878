import pytest

from training.promotion import Decision, decide, decide_promotion, pick_best_baseline

BASELINE = {"ndcg@10": 0.10, "recall@10": 0.20}


def test_candidate_beating_champion_beyond_margin_is_promoted():
    decision = decide_promotion({"ndcg@10": 0.116}, {"ndcg@10": 0.10}, BASELINE, margin=0.15)
    assert decision == Decision(
        True,
        "promotes the candidate: candidate ndcg@10 0.1160 beats champion 0.1000 × (1 + margin 15.00%) = 0.1150",
    )


@pytest.mark.parametrize("score", [0.09, 0.10, 0.105])
def test_candidate_worse_equal_or_within_margin_keeps_the_champion(score):
    decision = decide_promotion({"ndcg@10": score}, {"ndcg@10": 0.10}, BASELINE, margin=0.05)
    assert not decision.promote
    assert decision.reason.startswith(f"keeps the champion: candidate ndcg@10 {score:.4f}")
    assert "0.1050" in decision.reason


def test_champion_comparison_ignores_the_baseline():
    decision = decide_promotion({"ndcg@10": 0.05}, {"ndcg@10": 0.04}, {"ndcg@10": 0.30}, margin=0.0)
    assert decision.promote


def test_without_champion_the_candidate_must_beat_the_best_baseline():
    win = decide_promotion({"ndcg@10": 0.11}, None, BASELINE, margin=0.5, baseline_name="item_knn")
    assert win == Decision(True, "no champion yet: candidate ndcg@10 0.1100 beats item_knn 0.1000")
    tie = decide_promotion({"ndcg@10": 0.10}, None, BASELINE, margin=0.0)
    assert tie == Decision(False, "no champion yet: candidate ndcg@10 0.1000 does not beat the best baseline 0.1000")


def test_gate_compares_the_chosen_metric():
    decision = decide_promotion({"ndcg@10": 0.0, "recall@10": 0.3}, None, BASELINE, metric="recall@10", margin=0.0)
    assert decision.promote
    assert "recall@10 0.3000" in decision.reason


def test_gate_refuses_missing_or_non_finite_metrics_and_negative_margin():
    with pytest.raises(ValueError, match="champion: metrics lack 'ndcg@10'"):
        decide_promotion({"ndcg@10": 0.1}, {"recall@10": 0.1}, BASELINE, margin=0.0)
    with pytest.raises(ValueError, match="candidate: ndcg@10 is nan"):
        decide_promotion({"ndcg@10": float("nan")}, None, BASELINE, margin=0.0)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        decide_promotion({"ndcg@10": 0.1}, None, BASELINE, margin=-0.1)


def test_pick_best_baseline_takes_the_highest_metric_and_first_name_on_ties():
    baselines = {
        "recent_popular": {"ndcg@10": 0.2},
        "item_knn": {"ndcg@10": 0.2},
        "all_time_popular": {"ndcg@10": 0.1},
    }
    assert pick_best_baseline(baselines) == ("item_knn", {"ndcg@10": 0.2})
    with pytest.raises(ValueError, match="no baselines"):
        pick_best_baseline({})


def test_decide_gates_the_model_on_the_best_reported_baseline_or_the_champion():
    results = {
        "model": {"ndcg@10": 0.15},
        "recent_popular": {"ndcg@10": 0.12},
        "all_time_popular": {"ndcg@10": 0.10},
        "item_knn": {"ndcg@10": 0.05},
    }
    assert decide(results, metric="ndcg@10", margin=0.0) == Decision(
        True, "no champion yet: candidate ndcg@10 0.1500 beats recent_popular 0.1200"
    )
    assert not decide(results | {"champion": {"ndcg@10": 0.15}}, metric="ndcg@10", margin=0.0).promote
