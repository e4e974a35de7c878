"""The Prefect UI of a local server lists the three weekly deployments (headless Chromium)."""

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.definitions import build_deployments
from deployments.serve import run_local_server
from recsys.settings import Settings

pytestmark = pytest.mark.browser

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def ui_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local Prefect server with the three deployments registered; its UI address."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "false")  # faster start
    with run_local_server(tmp_path / "prefect", port=0) as api_url:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            for deployment in build_deployments(Settings()):
                deployment.apply()
        yield api_url.removesuffix("/api")


def render(url: str, profile: Path) -> str:
    """The DOM of `url` after the page's scripts ran, as headless Chromium sees it."""
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    command += ["--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install chromium)")
def test_deployments_page_lists_the_three_weekly_deployments(ui_url: str, tmp_path: Path) -> None:
    dom = render(f"{ui_url}/deployments", tmp_path / "chromium-profile")

    assert "Deployments" in dom
    for flow_name in ("features", "training", "inference"):
        assert re.search(rf">\s*{flow_name}\s*<", dom), f"{flow_name} not on the deployments page"
    assert len(re.findall(r">\s*weekly\s*<", dom)) >= 3
