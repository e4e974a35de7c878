"""The training run's report: the gate's decision, every recommender on the holdout, candidate recall."""

from ranking import metrics
from training.evaluation import RECALL_KEYS, WeekEvaluation
from training.plan import WeekPlan, staleness
from training.promotion import Decision


def metrics_markdown(
    version: int, plan: WeekPlan, evaluation: WeekEvaluation, decision: Decision, k: int, champion: str
) -> str:
    """Markdown: the decision and the champion now live, every recommender's metrics on the holdout,
    and candidate recall."""
    names = metrics.METRIC_NAMES
    ndcg = f"ndcg@{k}"
    results = evaluation.metrics
    model = results["model"][ndcg]
    header = "| recommender | " + " | ".join(f"{n}@{k}" for n in names) + " | users | model / this |"
    rows = [
        f"| {who} | " + " | ".join(f"{m[f'{n}@{k}']:.4f}" for n in names)
        + f" | {m['users']} | " + (f"{model / m[ndcg]:.2f}×" if m[ndcg] else "–") + " |"
        for who, m in results.items()
    ]  # fmt: skip
    recall = evaluation.candidate_recall
    verdict = "promoted to champion" if decision.promote else "rejected"
    return "\n".join(
        [
            f"# Model v{version}: {verdict}",
            "",
            decision.reason,
            "",
            f"Champion now: {champion}",
            "",
            *([f"⚠️ {stale}", ""] if (stale := staleness(plan)) else []),
            f"Holdout week {plan.holdout}; validation {plan.validation}; trained on {', '.join(map(str, plan.train))}",
            "",
            header,
            "|---" * (len(names) + 3) + "|",
            *rows,
            "",
            f"Candidate recall on the holdout ({recall['truth_items']} new items, "
            f"{recall['candidates_per_user']:.0f} candidates per user):",
            "",
            "| " + " | ".join(RECALL_KEYS) + " |",
            "|---" * len(RECALL_KEYS) + "|",
            "| " + " | ".join(f"{recall[key]:.3f}" for key in RECALL_KEYS) + " |",
        ]
    )
