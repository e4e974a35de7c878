"""The README's Prefect examples name deployments that exist."""

import re
from pathlib import Path

from deployments.definitions import RESOLVE_SPECS, SPECS, full_name

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_the_readme_runs_exists():
    named = set(re.findall(r"prefect deployment run ([\w-]+/[\w-]+)", (ROOT / "README.md").read_text()))
    assert named, "the README shows how to trigger a deployment"
    assert named <= {full_name(spec) for spec in (*SPECS, *RESOLVE_SPECS)}
