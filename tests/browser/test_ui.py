"""The Prefect UI of a local server, as headless Chromium renders it: the three weekly deployments
with their schedules, and the artifacts of a flow run.

One server per module (deployments registered, not served: nothing runs on a schedule); each
page is rendered once with `--dump-dom` after its scripts ran, in a fresh browser profile.
"""

import html
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest

from deployments.definitions import SPECS, build_deployments, cron_of
from deployments.serve import run_local_server
from recsys.settings import Settings

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        (CHROMIUM := next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)) is None,
        reason="chromium is not on PATH (apt-get install chromium)",
    ),
]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1200",  # wide enough that schedule and tag cells are not folded into "+1"
]
# What the UI writes for each deployment's default cron (cronstrue wording of Prefect's UI).
SCHEDULE_TEXT = {"features": "At 01:00 AM, only on Monday", "training": "At 03:00 AM, only on Monday",
                 "inference": "At 05:00 AM, only on Monday"}  # fmt: skip
AS_OF = date(2025, 3, 3)


@dataclass
class PrefectUI:
    url: str  # the UI's address (the API is at url + "/api")
    api_url: str
    deployment_ids: dict[str, str]  # flow name -> deployment id
    profiles: Path  # a fresh Chromium profile folder per page under here

    def render(self, path: str) -> str:
        """The DOM of `path` after the page's scripts ran, as headless Chromium sees it."""
        profile = self.profiles / f"profile-{len(list(self.profiles.iterdir()))}"
        command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        command += ["--virtual-time-budget=20000", "--dump-dom", f"{self.url}{path}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def visible_text(dom: str) -> str:
    """The page's text, tags and scripts removed, whitespace collapsed: what a reader sees."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectUI]:
    """A local Prefect server with the three deployments registered."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path_factory.mktemp("prefect-ui")
    (folder / "chromium").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "false")  # faster start
        with run_local_server(folder / "prefect", port=0) as api_url:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                ids = {
                    spec.flow_name: str(deployment.apply())
                    for spec, deployment in zip(SPECS, build_deployments(Settings()), strict=True)
                }
            yield PrefectUI(api_url.removesuffix("/api"), api_url, ids, folder / "chromium")


@pytest.fixture(scope="module")
def deployment_pages(ui: PrefectUI) -> dict[str, str]:
    """Each deployment's page, as visible text, by flow name."""
    return {name: visible_text(ui.render(f"/deployments/deployment/{id_}")) for name, id_ in ui.deployment_ids.items()}


def test_deployments_page_lists_the_three_weekly_deployments_with_their_schedules(ui: PrefectUI) -> None:
    dom = ui.render("/deployments")
    text = visible_text(dom)

    assert "3 Deployments" in text
    for flow_name in ("features", "training", "inference"):
        assert re.search(rf">\s*{flow_name}\s*<", dom), f"{flow_name} not on the deployments page"
    assert len(re.findall(r">\s*weekly\s*<", dom)) >= 3
    for flow_name, schedule in SCHEDULE_TEXT.items():
        assert schedule in text, f"the {flow_name} schedule ({schedule!r}) is not on the deployments page"


def test_each_deployment_page_shows_its_flow_and_weekly_schedule(deployment_pages: dict[str, str]) -> None:
    for flow_name, text in deployment_pages.items():
        assert "Deployment: weekly" in text and f"Flow {flow_name}" in text, text[:300]
        assert "Concurrency Limit 1" in text


def test_each_deployment_page_shows_its_cron_and_the_utc_time_zone(deployment_pages: dict[str, str]) -> None:
    for spec in SPECS:
        cron = cron_of(spec, Settings())
        assert f"{cron} (UTC)" in deployment_pages[spec.flow_name], f"{spec.flow_name}: no {cron!r} (UTC)"


def test_a_feature_flow_run_shows_its_validation_artifact(
    ui: PrefectUI, clean_stores, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real feature flow run reported to this server: its Artifacts tab and the artifact's page."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from features.synthetic import ensure_synthetic_log
    from flows.configs import synthetic_log_config
    from flows.feature_flow import feature_flow
    from tests.conftest import SMALL_JOB

    env = {
        "RECSYS_DATABASE_URL": settings.database_url.get_secret_value(),
        "RECSYS_REDIS_URL": settings.redis_url.get_secret_value(),
        "RECSYS_DATA_DIR": str(settings.data_dir),
        **SMALL_JOB,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ensure_synthetic_log(synthetic_log_config(Settings()), AS_OF)
    with temporary_settings(updates={PREFECT_API_URL: ui.api_url}):
        state = feature_flow(as_of=AS_OF, return_state=True)
        assert state.is_completed(), state
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
        # Send this run's queued events and logs to this server now: once the module's server
        # stops, workers still holding them would keep the test process from exiting.
        EventsWorker.drain_all(timeout=60)
        APILogWorker.drain_all(timeout=60)
    assert [a.key for a in artifacts] == ["feature-validation"]

    run_page = visible_text(ui.render(f"/runs/flow-run/{run_id}"))
    assert f"features-{AS_OF}" in run_page and "Completed" in run_page and "Artifacts" in run_page

    # The artifact's own page: its markdown rendered, and the flow run it belongs to.
    artifact_page = visible_text(ui.render(f"/artifacts/artifact/{artifacts[0].id}"))
    assert "Feature validation passed" in artifact_page, artifact_page[:1000]
    assert f"Snapshot {AS_OF}" in artifact_page
    assert f"features-{AS_OF}" in artifact_page, artifact_page[:1000]
