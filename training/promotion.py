"""The promotion gate: does a newly trained model replace the champion, and until a model has
won it, which baseline is served as champion?"""

import math
from dataclasses import dataclass
from datetime import date

from training.evaluation import BASELINES


@dataclass(frozen=True)
class Decision:
    """Whether to promote a candidate, a readable sentence saying why, and the baseline to
    make champion instead (when no model has won the gate yet)."""

    promote: bool
    reason: str
    serve_baseline: str | None = None


def decide_promotion(
    candidate: dict,
    champion: dict | None,
    best_baseline: dict,
    *,
    metric: str = "ndcg@10",
    margin: float,
    baseline_name: str = "the best baseline",
) -> Decision:
    """Promote when the candidate beats the champion by `margin` (relative), or, with no
    champion yet, when it beats the best baseline. All metrics come from the same holdout."""
    if not margin >= 0:
        raise ValueError(f"decide_promotion: margin must be >= 0, got {margin}")
    score = _metric_of(candidate, metric, "candidate")
    if champion is None:
        bar = _metric_of(best_baseline, metric, baseline_name)
        context, against = "no champion yet", f"{baseline_name} {bar:.4f}"
    else:
        held = _metric_of(champion, metric, "champion")
        bar = held * (1 + margin)
        context = "promotes the candidate" if score > bar else "keeps the champion"
        against = f"champion {held:.4f} × (1 + margin {margin:.2%}) = {bar:.4f}"
    verb = "beats" if score > bar else "does not beat"
    return Decision(score > bar, f"{context}: candidate {metric} {score:.4f} {verb} {against}")


def decide(
    results: dict[str, dict],
    *,
    metric: str,
    margin: float,
    champion_baseline: str | None = None,
    holdout: date | None = None,
) -> Decision:
    """The gate on one holdout's results (`WeekEvaluation.metrics`): the model against the
    champion when there is one, otherwise against the best of the reported baselines.

    A baseline champion (`champion_baseline`, scored by its own entry in `results`) is a
    stand-in: the model must also beat the best baseline. A model that does not win while
    no model holds the champion alias leaves the best baseline to serve (`serve_baseline`).
    """
    best_name, best = pick_best_baseline({n: results[n] for n in BASELINES if n in results}, metric=metric)
    champion = results[champion_baseline] if champion_baseline else results.get("champion")
    decision = decide_promotion(results["model"], champion, best, metric=metric, margin=margin, baseline_name=best_name)
    score, best_score = _metric_of(results["model"], metric, "candidate"), _metric_of(best, metric, best_name)
    if decision.promote and (champion_baseline is None or score > best_score):
        return decision
    if champion is not None and champion_baseline in (None, best_name):
        return decision  # a trained champion, or the baseline champion that is still the best, stays
    why = (
        "no model has won the gate yet"
        if champion_baseline is None
        else f"the champion baseline {champion_baseline} is no longer the best and no model beats {best_name}"
    )
    on = f" on holdout {holdout}" if holdout else ""
    return Decision(
        False,
        f"{why}: serving the best baseline {best_name} ({metric} {best_score:.4f}{on}; model {score:.4f})",
        serve_baseline=best_name,
    )


def pick_best_baseline(baselines: dict[str, dict], *, metric: str = "ndcg@10") -> tuple[str, dict]:
    """The (name, metrics) of the baseline with the highest `metric`; ties go to the first name."""
    if not baselines:
        raise ValueError("pick_best_baseline: no baselines given")
    name = max(sorted(baselines), key=lambda n: _metric_of(baselines[n], metric, f"baseline {n}"))
    return name, baselines[name]


def _metric_of(metrics: dict, metric: str, who: str) -> float:
    if metric not in metrics:
        raise ValueError(f"{who}: metrics lack {metric!r} (have {sorted(metrics)})")
    value = float(metrics[metric])
    if not math.isfinite(value):
        raise ValueError(f"{who}: {metric} is {value}, not a finite number")
    return value
