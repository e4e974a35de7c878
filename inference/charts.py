"""Charts for the Prefect artifacts, drawn with matplotlib (imported only when a chart is drawn: it is slow)."""

import io

import polars as pl

from inference.quality import COUNTERFACTUALS


def draw_quality_trend(series: pl.DataFrame) -> bytes:
    """PNG of the served NDCG per week next to the counterfactual recent popularity and item-kNN."""
    # A Figure without pyplot renders with the Agg canvas and touches no global backend state.
    from matplotlib.figure import Figure

    series = series.sort("as_of")
    k = series["k"][-1] if series.height else 10
    figure = Figure(figsize=(8, 3.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    weeks = series["as_of"].to_list()
    axes.plot(weeks, series["ndcg"].to_list(), marker="o", linewidth=2, label="served")
    for prefix, name in COUNTERFACTUALS.items():
        axes.plot(weeks, series[f"{prefix}_ndcg"].to_list(), marker=".", linestyle="--", label=name)
    axes.set(xlabel="week (as_of)", ylabel=f"NDCG@{k}", title=f"Realized NDCG@{k} of the served lists")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.autofmt_xdate()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
