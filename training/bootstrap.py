"""Paired bootstrap confidence intervals for comparing two recommenders on the same units.

A unit is one evaluated (user, week); each recommender has one metric value per unit
(e.g. its NDCG@k, 0 when it missed). Resampling units with replacement, together for both
recommenders, gives percentile intervals for the difference of means and for the relative
gain mean(a) / mean(b) - 1, so a gate can ask whether a gain is larger than noise.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from features.contracts import require_columns

# Resampled indices drawn at once (resamples in a chunk × units): about 8 MB of int64.
_CHUNK_CELLS = 1 << 20


@dataclass(frozen=True)
class GainEstimate:
    """Point estimates and percentile intervals of a's gain over b on the same units.

    With a single unit the spread is unknown and every interval is (-inf, inf).
    When mean(b) is 0 the ratio is undefined; the relative gain is then taken as +inf if
    mean(a) > 0, -inf if mean(a) < 0 and 0 if mean(a) is 0 too (the same rule per resample).
    """

    units: int
    mean_a: float
    mean_b: float
    difference: float  # mean(a) - mean(b)
    difference_low: float
    difference_high: float
    relative_gain: float  # mean(a) / mean(b) - 1
    relative_gain_low: float
    relative_gain_high: float
    confidence: float
    resamples: int

    def clears(self, margin: float) -> bool:
        """True when the lower bound of the relative gain is above `margin` (0.02 = 2 %)."""
        return self.relative_gain_low > margin

    def describe(self) -> str:
        """One readable line: the gain, its interval and the number of units."""
        return (
            f"gain {self.relative_gain:+.2%} [{self.confidence:.0%} CI {self.relative_gain_low:+.2%}, "
            f"{self.relative_gain_high:+.2%}], {self.mean_a:.4f} vs {self.mean_b:.4f} over {self.units} units"
        )


def bootstrap_gain(
    a: Sequence[float] | np.ndarray | pl.Series,
    b: Sequence[float] | np.ndarray | pl.Series,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 42,
) -> GainEstimate:
    """Paired percentile bootstrap of a's gain over b; a[i] and b[i] are the same unit.

    Bounds are order statistics of the resampled estimates (the lower one rounded down,
    the upper one up), so no interval is narrower than the exact percentiles.
    """
    a_values, b_values = _as_values(a, "a"), _as_values(b, "b")
    if a_values.size != b_values.size:
        raise ValueError(f"bootstrap_gain: a has {a_values.size} units, b has {b_values.size}; pair them first")
    if a_values.size == 0:
        raise ValueError("bootstrap_gain: no units to compare (both inputs are empty)")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_gain: confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"bootstrap_gain: resamples must be >= 1, got {resamples}")

    n = a_values.size
    mean_a, mean_b = float(a_values.mean()), float(b_values.mean())
    point = {
        "units": n,
        "mean_a": mean_a,
        "mean_b": mean_b,
        "difference": mean_a - mean_b,
        "relative_gain": float(_relative_gain(np.array(mean_a), np.array(mean_b))),
        "confidence": confidence,
        "resamples": resamples,
    }
    if n == 1:
        return GainEstimate(
            **point, difference_low=-math.inf, difference_high=math.inf,
            relative_gain_low=-math.inf, relative_gain_high=math.inf,
        )  # fmt: skip

    rng = np.random.default_rng(seed)
    means_a, means_b = np.empty(resamples), np.empty(resamples)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        picks = rng.integers(0, n, size=(stop - start, n))
        means_a[start:stop] = a_values[picks].mean(axis=1)
        means_b[start:stop] = b_values[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    differences = means_a - means_b
    gains = _relative_gain(means_a, means_b)
    return GainEstimate(
        **point,
        difference_low=float(np.quantile(differences, tail, method="lower")),
        difference_high=float(np.quantile(differences, 1 - tail, method="higher")),
        relative_gain_low=float(np.quantile(gains, tail, method="lower")),
        relative_gain_high=float(np.quantile(gains, 1 - tail, method="higher")),
    )


def bootstrap_gain_of_units(
    units: pl.DataFrame,
    *,
    a: str = "a",
    b: str = "b",
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 42,
) -> GainEstimate:
    """`bootstrap_gain` on a frame of one row per unit: key columns plus the columns `a` and `b`.

    Every column other than `a` and `b` is a unit key; a key repeated is an error. Rows
    are taken in key order, so the result does not depend on the frame's row order.
    """
    require_columns(units.columns, (a, b), "units")
    keys = [c for c in units.columns if c not in (a, b)]
    if keys and units.select(keys).is_duplicated().any():
        raise ValueError(f"units: repeated unit keys {keys}; pass one row per unit")
    ordered = units.sort(keys) if keys else units
    return bootstrap_gain(ordered[a], ordered[b], confidence=confidence, resamples=resamples, seed=seed)


def pair_units(a: pl.DataFrame, b: pl.DataFrame, *, value: str) -> pl.DataFrame:
    """One row per unit with `value` of a and of b as columns `a` and `b`, joined on the other columns.

    Both frames must hold the same units: a unit present in only one is an error.
    """
    require_columns(a.columns, (value,), "a")
    require_columns(b.columns, (value,), "b")
    keys = [c for c in a.columns if c != value]
    if sorted(keys) != sorted(c for c in b.columns if c != value):
        raise ValueError(f"pair_units: a is keyed by {keys}, b by {[c for c in b.columns if c != value]}")
    paired = a.rename({value: "a"}).join(b.rename({value: "b"}), on=keys, how="full", coalesce=True)
    unmatched = paired.filter(pl.col("a").is_null() | pl.col("b").is_null()).height
    if unmatched:
        raise ValueError(
            f"pair_units: {unmatched} units appear in only one of a and b; evaluate both on the same units"
        )
    return paired.sort(keys)


def _relative_gain(mean_a: np.ndarray, mean_b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean_a / mean_b - 1
        undefined = np.where(mean_a == 0, 0.0, np.sign(mean_a) * np.inf)
    return np.where(mean_b != 0, ratio, undefined)


def _as_values(values: Sequence[float] | np.ndarray | pl.Series, name: str) -> np.ndarray:
    array = values.to_numpy() if isinstance(values, pl.Series) else np.asarray(values)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"bootstrap_gain: {name} must be one value per unit, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"bootstrap_gain: {name} holds {int((~np.isfinite(array)).sum())} null or non-finite values")
    return array
