"""Gate evidence built from per-user NDCG drawn at chosen rates: pooled exactly as the training flow pools."""

from datetime import date, timedelta

import numpy as np
import polars as pl

from training.evaluation import RECALL_KEYS, WeekEvaluation
from training.gate import PooledEvaluation, pool_weeks

FIRST_WEEK = date(1998, 2, 2)
RECALL = dict.fromkeys(RECALL_KEYS, 0.5) | {"truth_items": 10, "candidates_per_user": 100.0}


def evidence(
    users: int, rates: dict[str, float], *, weeks: int = 4, seed: int = 0, champion_after: date | None = None
) -> PooledEvaluation:
    """`weeks` weeks of `users` users each; every user's NDCG under recommender r is 1 with probability
    rates[r], else 0 (independent draws), so r's expected NDCG is rates[r]. `champion_after`: as `pool_weeks`."""
    rng = np.random.default_rng(seed)
    evaluations = {}
    for w in range(weeks):
        per_user = pl.DataFrame(
            {"user_id": np.arange(users)} | {name: (rng.random(users) < p).astype(float) for name, p in rates.items()}
        )
        results = {name: {"ndcg@10": per_user[name].mean(), "users": users} for name in rates}
        evaluations[FIRST_WEEK + timedelta(weeks=w)] = WeekEvaluation(results, RECALL, per_user)
    return pool_weeks(evaluations, confidence=0.95, resamples=1000, seed=42, champion_after=champion_after)
