"""Process-wide settings the entry points apply before the numeric libraries load."""

import os


def configure_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (LightGBM and implicit use OpenMP).

    GNU OpenMP's default keeps a waiting thread spinning on its core. On a machine whose cores
    are shared with other work (a scheduled run beside the Prefect server, a CI runner) the
    spinning threads take the cores from the ones doing the work: LightGBM with 2 threads took
    88 ms per boosting round instead of 5 ms at load average 5 on 2 cores (15k rows, 40
    features; passive: 4.6 ms). The runtime reads OMP_WAIT_POLICY once, when it loads, so
    entry points call this before importing lightgbm. A value already set wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
