"""The promotion gate: does a newly trained model replace the champion, and until a model has
won it, which baseline is served as champion?

The evidence is pooled over several weeks (`training.gate`): each comparison is the paired
bootstrap interval of the model's relative gain over (user, week) units. A model is promoted
only when the interval's lower bound clears the margin over the best baseline and, when a
trained model holds the champion alias, over that champion too: a point estimate that
looks better on a few dozen users is not enough.

The champion is compared only on the gate weeks after the last week it trained on (its
out-of-sample weeks; the training flow pools them apart), never on its own training weeks;
with none, it is kept. A candidate of a new recipe must beat a trained champion and the best
baseline. The champion's own recipe refitted on newer weeks (a refresh) need not beat either
again, as the recipe did when it was promoted: it replaces the champion unless it is worse than
the champion or the best baseline beyond noise (an upper bound of its gain below 0), so the
served model does not go stale while nothing shows its recipe losing. (In a steady weekly run
the gate model of the champion's one out-of-sample week is the champion itself, reused: that
comparison is then a tie by construction, and the best baseline is the bar that counts.)
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from training.bootstrap import GainEstimate
from training.evaluation import BASELINES


@dataclass(frozen=True)
class Decision:
    """Whether to promote a candidate, a readable sentence saying why, and the baseline to
    make champion instead (when no model has won the gate yet)."""

    promote: bool
    reason: str
    serve_baseline: str | None = None


def decide(
    results: dict[str, dict],
    gains: dict[str, GainEstimate],
    *,
    metric: str,
    margin: float,
    champion_baseline: str | None = None,
    weeks: Sequence[date] = (),
    champion_through: date | None = None,
    champion_weeks: Sequence[date] = (),
    refresh: bool = False,
) -> Decision:
    """The gate on pooled results: `results` holds each recommender's pooled metrics ("model",
    the baselines, "champion" when a trained model holds the alias), `gains` the model's gain
    over each of them.

    A baseline champion (`champion_baseline`) is a stand-in: the model must clear the best
    baseline. A model that does not win while no model holds the champion alias leaves the
    best baseline (by pooled point estimate) to serve (`serve_baseline`).

    `champion_through`: the last week the trained champion trained on; its results and gain are then
    those of the `champion_weeks` after it only, and without them ("champion" missing) it is kept.
    `refresh`: the candidate is the champion's recipe refitted on newer weeks (module docstring).
    """
    if not margin >= 0:
        raise ValueError(f"decide: margin must be >= 0, got {margin}")
    best_name, best = pick_best_baseline({n: results[n] for n in BASELINES if n in results}, metric=metric)
    trained_champion = champion_baseline is None and ("champion" in results or champion_through is not None)
    if trained_champion and (refresh or champion_through is not None):
        return _against_trained_champion(
            gains, best_name, metric=metric, margin=margin, span=_describe_weeks(weeks),
            champion_through=champion_through, champion_weeks=champion_weeks, refresh=refresh,
        )  # fmt: skip
    bars = (["champion"] if trained_champion else []) + [best_name]
    missing = [b for b in bars if b not in gains]
    score = _metric_of(results["model"], metric, "candidate")
    span = _describe_weeks(weeks)
    if missing:
        cleared, reason = False, f"no evaluated (user, week) units to compare the candidate with {missing}{span}"
    else:
        cleared = all(gains[b].clears(margin) for b in bars)
        reason = _compare(bars, best_name, gains, metric, margin, cleared) + span
    if trained_champion:
        return Decision(cleared, f"{'promotes the candidate' if cleared else 'keeps the champion'}: {reason}")
    if cleared:
        context = "no champion yet" if champion_baseline is None else "promotes the candidate"
        return Decision(True, f"{context}: {reason}")
    if champion_baseline == best_name:
        return Decision(False, f"keeps the champion: {reason}")  # the baseline champion is still the best
    why = (
        "no model has won the gate yet"
        if champion_baseline is None
        else f"the champion baseline {champion_baseline} is no longer the best and no model clears {best_name}"
    )
    best_score = _metric_of(best, metric, best_name)
    return Decision(
        False,
        f"{why}: serving the best baseline {best_name} ({metric} {best_score:.4f}; model {score:.4f}): {reason}",
        serve_baseline=best_name,
    )


def _against_trained_champion(
    gains: dict[str, GainEstimate],
    best_name: str,
    *,
    metric: str,
    margin: float,
    span: str,
    champion_through: date | None,
    champion_weeks: Sequence[date],
    refresh: bool,
) -> Decision:
    """The gate against a trained champion, compared on its out-of-sample weeks only (`decide`)."""
    if best_name not in gains:
        return Decision(False, f"keeps the champion: no evaluated (user, week) units to compare the candidate with "
                               f"{best_name}{span}")  # fmt: skip
    recipe = "the candidate is the champion's recipe refitted on newer weeks" if refresh else "a new recipe"
    over_best = f"vs {best_name} (the best baseline): {gains[best_name].describe()}{span}"
    if "champion" not in gains:
        through = f" through {champion_through}" if champion_through is not None else ""
        return Decision(
            False,
            f"keeps the champion: it trained{through}, so no gate week falls after its training weeks and it is never "
            f"scored on weeks it trained on: there is no out-of-sample evidence to replace it on ({recipe}; "
            f"candidate {metric} {over_best})",
        )
    out_of_sample = _describe_weeks(champion_weeks).strip(" ()") or "weeks after its training"
    over_champion = f"vs the champion (out of sample: {out_of_sample}): {gains['champion'].describe()}"
    bars = {"the champion": gains["champion"], best_name: gains[best_name]}
    if refresh:
        worse = [who for who, gain in bars.items() if gain.relative_gain_high < 0]
        promote = not worse
        rule = (
            "a refresh replaces the champion unless it is worse than the champion or the best baseline beyond noise "
            "(an upper bound below 0): " + ("it is not" if promote else f"it is worse than {' and '.join(worse)}")
        )
    else:
        failing = [who for who, gain in bars.items() if not gain.clears(margin)]
        promote = not failing
        rule = "a new recipe must beat the champion and the best baseline: " + (
            f"the lower bounds clear the margin {margin:.2%}"
            if promote
            else f"the lower bound over {' and '.join(failing)} does not clear the margin {margin:.2%}"
        )
    verb = "promotes the candidate" if promote else "keeps the champion"
    return Decision(promote, f"{verb}: {recipe}: candidate {metric} {over_champion}; {over_best}: {rule}")


def _compare(
    bars: list[str], best_name: str, gains: dict[str, GainEstimate], metric: str, margin: float, cleared: bool
) -> str:
    """'candidate ndcg@10 vs X: gain +5.0% [95% CI +1.0%, +9.0%] ...: the lower bound clears the margin'."""
    parts = []
    for bar in bars:
        who = f"{best_name} (the best baseline)" if bar == best_name else "the champion"
        parts.append(f"vs {who}: {gains[bar].describe()}")
    text = f"candidate {metric} " + "; ".join(parts)
    if cleared:
        bounds = "the lower bounds clear" if len(bars) > 1 else "the lower bound clears"
        return f"{text}: {bounds} the margin {margin:.2%}"
    failing = [b for b in bars if not gains[b].clears(margin)]
    over = " and ".join("the champion" if b == "champion" else b for b in failing)
    text += f": the lower bound over {over} does not clear the margin {margin:.2%}"
    if noisy := [b for b in failing if gains[b].relative_gain > margin]:
        text += (
            f" (the point estimate does, but the interval is too wide: {gains[noisy[0]].units} (user, week) units "
            "cannot tell that gain from noise)"
        )
    return text


def _describe_weeks(weeks: Sequence[date]) -> str:
    if not weeks:
        return ""
    if len(weeks) == 1:
        return f" (holdout {weeks[0]})"
    return f" (pooled over {len(weeks)} weeks {min(weeks)} … {max(weeks)})"


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
