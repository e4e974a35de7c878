"""The training run's report: the gate's decision, every recommender pooled over the gate weeks
with the model's gain over it and its interval, per-week NDCG, candidate recall."""

import polars as pl

from ranking import metrics
from training.allocation import counts_text
from training.bootstrap import GainEstimate
from training.evaluation import RECALL_KEYS
from training.gate import MODEL, PooledEvaluation
from training.plan import WeekPlan, staleness
from training.promotion import Decision


def format_gain(gain: GainEstimate | None) -> str:
    """'+12.3% [-4.1%, +30.2%]': the model's relative gain and its interval, or '–' without one."""
    if gain is None:
        return "–"
    return f"{gain.relative_gain:+.1%} [{gain.relative_gain_low:+.1%}, {gain.relative_gain_high:+.1%}]"


def metrics_markdown(
    version: int,
    plans: list[WeekPlan],
    refit: WeekPlan,
    pooled: PooledEvaluation,
    decision: Decision,
    k: int,
    champion: str,
    allocation: dict | None = None,
) -> str:
    """Markdown: the decision and the champion now live, every recommender's pooled metrics with the
    model's gain over it, NDCG per week (the champion's only on the weeks after its training), and candidate
    recall, with the candidates' allocation (its `Allocation.record()`) when they were allocated by recall.
    The registered model is the gate's recipe refitted on `refit`'s weeks."""
    names = metrics.METRIC_NAMES
    confidence = next(iter(pooled.gains.values())).confidence if pooled.gains else 0.95
    header = (
        "| recommender | " + " | ".join(f"{n}@{k}" for n in names)
        + f" | (user, week) units | model's gain over this [{confidence:.0%} CI] |"
    )  # fmt: skip
    rows = [
        f"| {who} | " + " | ".join(f"{m[f'{n}@{k}']:.4f}" for n in names)
        + f" | {m['users']} | " + ("" if who == MODEL else format_gain(pooled.gains.get(who))) + " |"
        for who, m in pooled.metrics.items()
    ]  # fmt: skip
    ndcg = f"ndcg@{k}"
    recommenders = list(pooled.metrics)
    per_week = pooled.units.group_by("week", maintain_order=True).agg(
        pl.len().alias("users"), *[pl.col(n).mean() for n in recommenders]
    )
    week_rows = [
        f"| {r['week']} | {r['users']} | "
        + " | ".join("–" if r[n] is None else f"{r[n]:.4f}" for n in recommenders)
        + " |"
        for r in per_week.iter_rows(named=True)
    ]
    recall = pooled.candidate_recall
    verdict = "promoted to champion" if decision.promote else "rejected"
    latest = plans[-1]
    return "\n".join(
        [
            f"# Model v{version}: {verdict}",
            "",
            decision.reason,
            "",
            f"Champion now: {champion}",
            "",
            *([f"⚠️ {stale}", ""] if (stale := staleness(latest)) else []),
            f"Gate weeks {', '.join(map(str, pooled.weeks))}: a model trained as of each on its past only, scored "
            "there with the champion and every baseline; metrics micro-averaged over (user, week), intervals by "
            f"paired bootstrap over those units"
            + (
                f"; the champion only on {', '.join(map(str, pooled.champion_weeks))}, after its training weeks"
                if "champion" in pooled.metrics
                else ""
            )
            + f". The registered model: the same recipe refitted through {refit.validation[-1]} (validation "
            f"{', '.join(map(str, refit.validation))}, trained on {', '.join(map(str, refit.train))}); next week's "
            f"run scores it as its gate model of {refit.holdout}.",
            "",
            header,
            "|---" * (len(names) + 3) + "|",
            *rows,
            "",
            f"{ndcg} per gate week:",
            "",
            "| week | users | " + " | ".join(recommenders) + " |",
            "|---" * (len(recommenders) + 2) + "|",
            *week_rows,
            "",
            f"Candidate recall over the gate weeks ({recall['truth_items']} new items, "
            f"{recall['candidates_per_user']:.0f} candidates per user):",
            "",
            "| " + " | ".join(RECALL_KEYS) + " |",
            "|---" * len(RECALL_KEYS) + "|",
            "| " + " | ".join(f"{recall[key]:.3f}" for key in RECALL_KEYS) + " |",
            *([] if allocation is None else ["", allocation_sentence(allocation)]),
        ]
    )


def allocation_sentence(allocation: dict) -> str:
    """The candidates' counts per source (per history band, when allocated by band) and what they held where
    they were measured (`Allocation.record()`)."""
    best = allocation["best_single_source"]
    by_band = " by history length (events before the week)" if allocation.get("band_edges") else ""
    return (
        f"Candidates per user allocated by measured recall{by_band} on {', '.join(allocation['weeks'])} "
        f"({allocation['users']} (user, week) units, budget {allocation['budget']}): {counts_text(allocation)}; "
        f"there they held "
        f"{allocation['recall']:.3f} of the new items at {allocation['candidates_per_user']:.0f} per user, "
        f"{best} alone {allocation['single_source'][best]:.3f} at as many."
    )
