"""The served model is the gate's recipe refitted through the newest labelled week H (issue #14): planned as
the next week's run plans its gate model of H + 1 week, keyed so that run reuses it, and the champion is
compared only on the gate weeks after its training weeks."""

from datetime import date, timedelta

import pytest

from ranking.candidates import CandidateConfig
from ranking.registry import ModelRecord
from tests.evidence import FIRST_WEEK, evidence
from training import store
from training.plan import Widening, plan_gate, plan_refit, plan_weeks
from training.promotion import decide
from training.ranker import RankerParams

WEEK = timedelta(weeks=1)
AS_OF = date(2026, 11, 23)
LABELLED = [AS_OF - n * WEEK for n in range(20, 0, -1)]  # labels complete up to H = AS_OF - 1 week
H = AS_OF - WEEK
SAMPLING = {"negatives_per_user": 50, "seed": 42, "max_users": 10_000, "batch_users": 2_500}


def next_weeks_gate_model_plan(labelled, training_weeks, validation_weeks, widening=None):
    """What the run one week later plans for its newest gate week, once H + 1 week is labelled."""
    return plan_gate([*labelled, H + WEEK], AS_OF + WEEK, training_weeks, 4, validation_weeks, widening)[-1]


@pytest.mark.parametrize(("training_weeks", "validation_weeks"), [(4, 3), (4, 1), (1, 1), (8, 2)])
def test_the_refit_trains_through_the_newest_labelled_week_on_next_weeks_gate_plan(training_weeks, validation_weeks):
    latest = plan_gate(LABELLED, AS_OF, training_weeks, 4, validation_weeks)[-1]
    refit = plan_refit(LABELLED, latest, training_weeks, validation_weeks)
    assert refit.validation[-1] == latest.holdout == H, "it learns from the newest labelled week"
    assert refit.holdout == H + WEEK and len(refit.validation) == validation_weeks
    assert len(refit.train) == training_weeks and refit.train[-1] < refit.validation[0]
    following = next_weeks_gate_model_plan(LABELLED, training_weeks, validation_weeks)
    assert (refit.train, refit.validation, refit.holdout) == (following.train, following.validation, following.holdout)


def test_the_refit_widens_small_weeks_as_next_weeks_plan_does():
    widening = Widening(dict.fromkeys([*LABELLED, H + WEEK], 40), min_users=1_000, max_weeks=12)
    latest = plan_gate(LABELLED, AS_OF, 4, 4, 3, widening)[-1]
    refit = plan_refit(LABELLED, latest, 4, 3, widening)
    assert len(refit.train) == 12 and refit.train[-1] == latest.train[-1] + WEEK
    following = next_weeks_gate_model_plan(LABELLED, 4, 3, widening)
    assert (refit.train, refit.validation) == (following.train, following.validation)


def test_the_refit_ignores_labelled_weeks_after_the_gates_newest_holdout():
    """Training as of an old week in a store that holds later weeks: the refit stops at that run's newest holdout."""
    later = [*LABELLED, AS_OF, AS_OF + WEEK, AS_OF + 2 * WEEK]
    latest = plan_weeks(later, AS_OF, 4, 3)
    assert latest.holdout == H
    assert plan_refit(later, latest, 4, 3) == plan_refit(LABELLED, latest, 4, 3)


def test_with_little_history_the_refit_still_trains_one_week_and_validates_on_the_rest():
    labelled = LABELLED[-3:]  # a fresh deployment's 3 labelled weeks
    latest = plan_weeks(labelled, AS_OF, 4, 3)
    refit = plan_refit(labelled, latest, 4, 3)
    assert refit.train == labelled[:1] and refit.validation == labelled[1:]


@pytest.fixture
def digests(monkeypatch) -> dict[str, str]:
    stored = {f"{t}@{w}": f"{t}-{w}" for w in [*LABELLED, H + WEEK] for t in ("user_features", "labels")}

    def of_weeks(engine, weeks):
        return {key: value for key, value in stored.items() if date.fromisoformat(key.split("@")[1]) in weeks}

    monkeypatch.setattr(store, "snapshot_digests", of_weeks)
    return stored


def test_the_refits_key_is_the_key_next_weeks_run_looks_its_gate_model_up_by(digests):
    """Steady state: next week's gate week H + 1 reuses this week's refit instead of training it again."""
    latest = plan_gate(LABELLED, AS_OF, 4, 4, 3)[-1]
    refit = plan_refit(LABELLED, latest, 4, 3)
    next_run = plan_gate([*LABELLED, H + WEEK], AS_OF + WEEK, 4, 4, 3)
    options = {"config": CandidateConfig(), "params": RankerParams(), "sampling": SAMPLING}
    refit_key = store.gate_model_key(None, refit, ["drama", "rock"], **options)
    looked_up = store.gate_model_key(None, next_run[-1], ["drama", "rock"], **options)
    assert refit_key == looked_up
    # ... and the gate models of next week's other gate weeks are this week's, not the refit.
    this_run = plan_gate(LABELLED, AS_OF, 4, 4, 3)
    this_keys = {store.gate_model_key(None, p, ["drama", "rock"], **options) for p in this_run}
    assert {store.gate_model_key(None, p, ["drama", "rock"], **options) for p in next_run[:-1]} <= this_keys
    assert refit_key not in this_keys, "the refit learns from H: no gate model of this week is the refit"
    # A week's relabelling, or other categories, names another model: it is trained again, never misused.
    digests[f"labels@{H}"] = "recomputed"
    assert store.gate_model_key(None, next_run[-1], ["drama", "rock"], **options) != refit_key
    digests[f"labels@{H}"] = f"labels-{H}"
    assert store.gate_model_key(None, next_run[-1], ["drama", "jazz", "rock"], **options) != refit_key


def record(training: list[date], validation: date | None) -> ModelRecord:
    return ModelRecord(
        name="m", version=1, created_at=None, status="champion", as_of=None, training_as_ofs=training,
        validation_as_of=validation, holdout_as_of=None, feature_snapshots={}, feature_names=[], encodings={},
        params={}, metrics={}, decision=None, model_sha256="", flow_run_id=None, code_version=None,
    )  # fmt: skip


def test_a_model_is_trained_through_its_validation_week_or_its_newest_training_week():
    assert (
        store.trained_through(record([FIRST_WEEK, FIRST_WEEK + WEEK], FIRST_WEEK + 2 * WEEK)) == FIRST_WEEK + 2 * WEEK
    )
    assert store.trained_through(record([FIRST_WEEK, FIRST_WEEK + WEEK], None)) == FIRST_WEEK + WEEK
    assert store.trained_through(record([], None)) is None


RATES = {"model": 0.30, "champion": 0.20, "ease": 0.10}


def test_the_champion_is_pooled_and_compared_only_on_the_weeks_after_its_training():
    everywhere = evidence(300, RATES)
    pooled = evidence(300, RATES, champion_after=FIRST_WEEK + WEEK)
    later = [FIRST_WEEK + 2 * WEEK, FIRST_WEEK + 3 * WEEK]
    assert pooled.champion_weeks == later and everywhere.champion_weeks == everywhere.weeks
    assert pooled.gains["champion"].units == 600 and everywhere.gains["champion"].units == 1200
    assert pooled.metrics["champion"]["users"] == 600 and pooled.metrics["model"]["users"] == 1200
    assert pooled.gains["ease"].units == 1200, "the baselines are compared on every gate week"
    # Its units are null on its own training weeks, so no per-week table shows an in-sample score.
    in_sample = pooled.units.filter(~pooled.units["week"].is_in(later))
    assert in_sample["champion"].null_count() == in_sample.height == 600
    assert pooled.units.filter(pooled.units["week"].is_in(later))["champion"].null_count() == 0
    paired = pooled.units.filter(pooled.units["week"].is_in(later))
    assert pooled.gains["champion"].mean_b == pytest.approx(paired["champion"].mean())


def test_a_champion_trained_through_every_gate_week_is_left_out_of_the_pool():
    pooled = evidence(300, RATES, champion_after=FIRST_WEEK + 3 * WEEK)
    assert pooled.champion_weeks == [] and "champion" not in pooled.metrics and "champion" not in pooled.gains
    assert "champion" not in pooled.units.columns


def decide_against_champion(pooled, *, refresh: bool, through: date = FIRST_WEEK + WEEK):
    return decide(
        pooled.metrics, pooled.gains, metric="ndcg@10", margin=0.0, weeks=pooled.weeks, champion_through=through,
        champion_weeks=pooled.champion_weeks, refresh=refresh,
    )  # fmt: skip


def test_a_refresh_of_the_champions_recipe_replaces_it_when_not_worse_beyond_noise():
    pooled = evidence(300, {"model": 0.30, "champion": 0.30, "ease": 0.10}, champion_after=FIRST_WEEK + WEEK)
    champion = pooled.gains["champion"]
    assert champion.relative_gain_low < 0 <= champion.relative_gain_high, "a tie within noise, or it proves nothing"
    refreshed = decide_against_champion(pooled, refresh=True)
    assert refreshed.promote and refreshed.serve_baseline is None
    assert refreshed.reason == (
        "promotes the candidate: the candidate is the champion's recipe refitted on newer weeks: candidate ndcg@10 "
        f"vs the champion (out of sample: pooled over 2 weeks {FIRST_WEEK + 2 * WEEK} … {FIRST_WEEK + 3 * WEEK}): "
        f"{champion.describe()}; vs ease (the best baseline): {pooled.gains['ease'].describe()} (pooled over 4 weeks "
        f"{FIRST_WEEK} … {FIRST_WEEK + 3 * WEEK}): a refresh replaces the champion unless it is worse than the "
        "champion or the best baseline beyond noise (an upper bound below 0): it is not"
    )
    # The same evidence for a new recipe: it must beat the champion, and does not.
    other = decide_against_champion(pooled, refresh=False)
    assert not other.promote and other.reason.startswith("keeps the champion: a new recipe: ")
    assert other.reason.endswith(
        "a new recipe must beat the champion and the best baseline: the lower bound over the champion does not "
        "clear the margin 0.00%"
    )


def test_a_refresh_within_noise_of_the_best_baseline_still_replaces_the_champion_of_its_recipe():
    """The recipe cleared the baseline when it was promoted; a noisy pool does not freeze an older model of it."""
    pooled = evidence(40, {"model": 0.32, "champion": 0.30, "ease": 0.30}, champion_after=FIRST_WEEK + WEEK)
    ease = pooled.gains["ease"]
    assert ease.relative_gain_low < 0 <= ease.relative_gain_high, "within noise of ease, or it proves nothing"
    assert decide_against_champion(pooled, refresh=True).promote
    assert not decide_against_champion(pooled, refresh=False).promote, "a new recipe must clear ease"


def test_a_refresh_worse_than_the_champion_or_the_best_baseline_beyond_noise_is_rejected():
    worse = evidence(300, {"model": 0.20, "champion": 0.40, "ease": 0.10}, champion_after=FIRST_WEEK + WEEK)
    assert worse.gains["champion"].relative_gain_high < 0
    decision = decide_against_champion(worse, refresh=True)
    assert not decision.promote and decision.reason.startswith("keeps the champion: the candidate is the champion's")
    assert decision.reason.endswith("it is worse than the champion")
    losing = evidence(300, {"model": 0.20, "champion": 0.20, "ease": 0.40}, champion_after=FIRST_WEEK + WEEK)
    assert losing.gains["ease"].relative_gain_high < 0
    decision = decide_against_champion(losing, refresh=True)
    assert not decision.promote and decision.reason.endswith("it is worse than ease")


def test_a_new_recipe_that_beats_the_champion_out_of_sample_and_the_best_baseline_is_promoted():
    pooled = evidence(300, {"model": 0.40, "champion": 0.20, "ease": 0.10}, champion_after=FIRST_WEEK + WEEK)
    decision = decide_against_champion(pooled, refresh=False)
    assert decision.promote and decision.reason.startswith("promotes the candidate: a new recipe: ")
    assert decision.reason.endswith("the lower bounds clear the margin 0.00%")
    weak = evidence(300, {"model": 0.40, "champion": 0.20, "ease": 0.40}, champion_after=FIRST_WEEK + WEEK)
    decision = decide_against_champion(weak, refresh=False)
    assert not decision.promote and decision.reason.endswith(
        "the lower bound over ease does not clear the margin 0.00%"
    )


def test_without_a_gate_week_after_the_champions_training_the_champion_is_kept_and_the_reason_says_why():
    through = FIRST_WEEK + 3 * WEEK
    pooled = evidence(300, {"model": 0.40, "champion": 0.10, "ease": 0.10}, champion_after=through)
    for refresh in (True, False):
        decision = decide_against_champion(pooled, refresh=refresh, through=through)
        assert not decision.promote and decision.serve_baseline is None
        assert decision.reason.startswith(
            f"keeps the champion: it trained through {through}, so no gate week falls after its training weeks"
        )
        assert "no out-of-sample evidence to replace it on" in decision.reason
        assert f"vs ease (the best baseline): {pooled.gains['ease'].describe()}" in decision.reason
