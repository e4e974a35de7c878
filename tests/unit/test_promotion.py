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


HOLDOUT_RESULTS = {
    "model": {"ndcg@10": 0.09},
    "recent_popular": {"ndcg@10": 0.08},
    "all_time_popular": {"ndcg@10": 0.05},
    "item_knn": {"ndcg@10": 0.10},
}


def test_a_losing_model_without_champion_leaves_the_best_baseline_to_serve():
    decision = decide(HOLDOUT_RESULTS, metric="ndcg@10", margin=0.0, holdout="1998-02-23")
    assert decision == Decision(
        False,
        "no model has won the gate yet: serving the best baseline item_knn (ndcg@10 0.1000 on holdout 1998-02-23; "
        "model 0.0900)",
        serve_baseline="item_knn",
    )


def test_a_baseline_champion_that_is_still_the_best_is_kept():
    decision = decide(HOLDOUT_RESULTS, metric="ndcg@10", margin=0.0, champion_baseline="item_knn")
    assert not decision.promote and decision.serve_baseline is None
    assert decision.reason.startswith("keeps the champion: candidate ndcg@10 0.0900 does not beat champion 0.1000")


def test_a_baseline_champion_that_is_no_longer_the_best_is_switched_even_when_the_model_beats_it():
    for model in (0.07, 0.09):  # below, then above the champion recent_popular; never above item_knn
        results = HOLDOUT_RESULTS | {"model": {"ndcg@10": model}}
        decision = decide(results, metric="ndcg@10", margin=0.0, champion_baseline="recent_popular")
        assert not decision.promote and decision.serve_baseline == "item_knn"
        assert decision.reason.startswith("the champion baseline recent_popular is no longer the best")


def test_a_model_beating_every_baseline_replaces_a_baseline_champion():
    results = HOLDOUT_RESULTS | {"model": {"ndcg@10": 0.2}}
    decision = decide(results, metric="ndcg@10", margin=0.1, champion_baseline="item_knn")
    assert decision.promote and decision.serve_baseline is None
    assert decision.reason.startswith("promotes the candidate: candidate ndcg@10 0.2000 beats champion 0.1000")


def test_a_trained_champion_is_kept_when_the_model_loses():
    results = HOLDOUT_RESULTS | {"champion": {"ndcg@10": 0.095}}
    decision = decide(results, metric="ndcg@10", margin=0.0)
    assert not decision.promote and decision.serve_baseline is None
