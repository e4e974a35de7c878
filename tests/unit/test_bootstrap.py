import math

import numpy as np
import polars as pl
import pytest

from training.bootstrap import bootstrap_gain, bootstrap_gain_of_units, pair_units


def synthetic(n: int, extra: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """b ~ U(0, 1); a = b + noise of mean `extra`: the true relative gain is extra / 0.5."""
    rng = np.random.default_rng(seed)
    b = rng.random(n)
    return b + rng.normal(extra, 0.2, n), b


def test_interval_contains_the_true_gain_on_synthetic_data():
    a, b = synthetic(5_000, extra=0.05)
    estimate = bootstrap_gain(a, b)
    assert estimate.relative_gain_low < 0.10 < estimate.relative_gain_high
    assert estimate.difference_low < 0.05 < estimate.difference_high


def test_point_estimates_are_the_gain_and_difference_of_the_means():
    estimate = bootstrap_gain([0.3, 0.1, 0.2], [0.1, 0.1, 0.2])
    assert estimate.relative_gain == pytest.approx(0.6 / 0.4 - 1)
    assert estimate.difference == pytest.approx(0.2 / 3)
    assert (estimate.units, estimate.resamples, estimate.confidence) == (3, 1000, 0.95)


def test_a_clearly_better_recommender_has_a_lower_bound_above_zero():
    estimate = bootstrap_gain(*synthetic(2_000, extra=0.1))
    assert estimate.relative_gain_low > 0
    assert estimate.clears(0.0)
    assert not estimate.clears(estimate.relative_gain)


def test_identical_recommenders_give_an_interval_of_zero():
    values = np.random.default_rng(1).random(500)
    estimate = bootstrap_gain(values, values)
    assert estimate.relative_gain_low == estimate.relative_gain_high == 0.0
    assert not estimate.clears(0.0)


def test_equally_good_recommenders_give_an_interval_around_zero():
    estimate = bootstrap_gain(*synthetic(3_000, extra=0.0))
    assert estimate.relative_gain_low < 0 < estimate.relative_gain_high
    assert not estimate.clears(0.0)


def test_tiny_samples_give_wider_intervals_than_large_ones():
    def width(n: int) -> float:
        estimate = bootstrap_gain(*synthetic(n, extra=0.05))
        return estimate.relative_gain_high - estimate.relative_gain_low

    assert width(10) > 10 * width(10_000)


def test_a_single_unit_gives_an_unbounded_interval_that_clears_nothing():
    estimate = bootstrap_gain([0.5], [0.25])
    assert estimate.relative_gain == pytest.approx(1.0)
    assert (estimate.relative_gain_low, estimate.relative_gain_high) == (-math.inf, math.inf)
    assert (estimate.difference_low, estimate.difference_high) == (-math.inf, math.inf)
    assert not estimate.clears(0.0)


def test_zero_mean_of_b_makes_the_gain_infinite_when_a_scored_anything():
    estimate = bootstrap_gain([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
    assert estimate.relative_gain == estimate.relative_gain_low == math.inf
    assert estimate.clears(0.5)


def test_zero_means_on_both_sides_count_as_no_gain():
    estimate = bootstrap_gain([0.0, 0.0], [0.0, 0.0])
    assert estimate.relative_gain == estimate.relative_gain_low == estimate.relative_gain_high == 0.0


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    a, b = synthetic(300, extra=0.02)
    assert bootstrap_gain(a, b, seed=3) == bootstrap_gain(a, b, seed=3)
    assert bootstrap_gain(a, b, seed=3) != bootstrap_gain(a, b, seed=4)


def test_a_wider_confidence_gives_a_wider_interval():
    a, b = synthetic(300, extra=0.02)
    narrow, wide = bootstrap_gain(a, b, confidence=0.8), bootstrap_gain(a, b, confidence=0.99)
    assert wide.relative_gain_low < narrow.relative_gain_low < narrow.relative_gain_high < wide.relative_gain_high


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="no units"):
        bootstrap_gain([], [])


def test_inputs_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="a has 2 units, b has 1"):
        bootstrap_gain([0.1, 0.2], [0.1])


def test_null_values_are_an_error():
    with pytest.raises(ValueError, match="b holds 1 null or non-finite"):
        bootstrap_gain(pl.Series([0.1, 0.2]), pl.Series([0.1, None]))


@pytest.mark.parametrize("options", [{"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}])
def test_invalid_settings_are_an_error(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        bootstrap_gain([0.1, 0.2], [0.1, 0.2], **options)


def test_describe_states_the_gain_its_interval_and_the_units():
    text = bootstrap_gain(*synthetic(200, extra=0.1)).describe()
    assert text.startswith("gain +") and "95% CI" in text and text.endswith("over 200 units")


def test_frame_version_does_not_depend_on_row_order():
    a, b = synthetic(200, extra=0.03)
    units = pl.DataFrame({"week": [1, 2] * 100, "user_id": range(200), "a": a, "b": b})
    shuffled = units.sample(fraction=1.0, shuffle=True, seed=5)
    assert bootstrap_gain_of_units(units) == bootstrap_gain_of_units(shuffled)


def test_frame_version_rejects_repeated_units():
    units = pl.DataFrame({"user_id": [1, 1], "a": [0.1, 0.2], "b": [0.1, 0.1]})
    with pytest.raises(ValueError, match="repeated unit keys"):
        bootstrap_gain_of_units(units)


def test_pair_units_joins_two_recommenders_on_their_unit_keys():
    a = pl.DataFrame({"week": [1, 1], "user_id": [2, 1], "ndcg": [0.5, 0.0]})
    b = pl.DataFrame({"user_id": [1, 2], "week": [1, 1], "ndcg": [0.25, 1.0]})
    paired = pair_units(a, b, value="ndcg")
    assert paired.to_dicts() == [
        {"week": 1, "user_id": 1, "a": 0.0, "b": 0.25},
        {"week": 1, "user_id": 2, "a": 0.5, "b": 1.0},
    ]


def test_pair_units_rejects_units_evaluated_for_only_one_recommender():
    a = pl.DataFrame({"user_id": [1, 2], "ndcg": [0.5, 0.0]})
    b = pl.DataFrame({"user_id": [1], "ndcg": [0.25]})
    with pytest.raises(ValueError, match="1 units appear in only one"):
        pair_units(a, b, value="ndcg")
