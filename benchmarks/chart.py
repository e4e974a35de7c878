"""The weekly-job benchmark's chart: time per stage against size (events), log-log, with matplotlib."""

from pathlib import Path

Series = dict[str, list[tuple[float, float]]]


def draw_stage_chart(seconds: Series, path: Path, *, relative: Series | None = None) -> Path:
    """A PNG of each stage's time against the log's events: seconds, and beside it the same in × ref
    (seconds / the run's reference workload time) when `relative` is given. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    panels = [(seconds, "seconds")] + ([(relative, "× reference workload")] if relative else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for axis, (series, label) in zip(axes[0], panels, strict=True):
        colours = plt.get_cmap("tab20").colors  # 11 stages: no two lines share a colour
        for index, (stage, points) in enumerate(series.items()):
            if not points:
                continue
            events, values = zip(*sorted(points), strict=True)
            axis.plot(events, values, marker="o", label=stage, color=colours[index % len(colours)])
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("events in the log")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_title("Weekly job: time per stage against size")
    if len(panels) > 1:
        axes[0][1].set_title("the same, relative to the reference workload")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", frameon=False)
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
