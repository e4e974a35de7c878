"""The three deployments: names, schedules, concurrency; and the serve banner."""

from datetime import date

import pytest
from pydantic import ValidationError

from deployments.definitions import (
    RESOLVE_SPECS,
    SPECS,
    build_deployments,
    full_name,
    load_flow,
)
from deployments.serve import describe_serving
from recsys.settings import Settings
from recsys.stores import redact_url


@pytest.fixture(scope="module")
def deployments() -> dict:
    return {f"{d.flow_name}/{d.name}": d for d in build_deployments(Settings())}


def cron_and_timezone(deployment) -> tuple[str, str]:
    (schedule,) = deployment.schedules
    return schedule.schedule.cron, schedule.schedule.timezone


def test_one_weekly_deployment_per_flow(deployments: dict) -> None:
    assert sorted(deployments) == ["features/weekly", "inference/weekly", "training/weekly"]
    assert sorted(full_name(spec) for spec in SPECS) == sorted(deployments)


def test_default_schedules_are_monday_1_3_5_utc(deployments: dict) -> None:
    assert cron_and_timezone(deployments["features/weekly"]) == ("0 1 * * 1", "UTC")
    assert cron_and_timezone(deployments["training/weekly"]) == ("0 3 * * 1", "UTC")
    assert cron_and_timezone(deployments["inference/weekly"]) == ("0 5 * * 1", "UTC")


def test_each_deployment_allows_one_run_at_a_time_and_queues_the_rest(
    deployments: dict,
) -> None:
    for deployment in deployments.values():
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"


def test_entrypoints_are_module_paths_importable_from_an_installed_package(
    deployments: dict,
) -> None:
    assert deployments["features/weekly"].entrypoint == "flows.feature_flow.feature_flow"
    assert deployments["training/weekly"].entrypoint == "flows.training_flow.training_flow"
    assert deployments["inference/weekly"].entrypoint == "flows.inference_flow.inference_flow"


def test_every_flow_takes_as_of_so_runs_can_be_triggered_for_a_week() -> None:
    for spec in SPECS:
        assert "as_of" in load_flow(spec.flow_path).parameters.properties, spec.flow_path


def test_a_cron_can_be_overridden_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_TRAINING_CRON", "30 4 * * 2")
    settings = Settings()
    assert (settings.features_cron, settings.training_cron) == ("0 1 * * 1", "30 4 * * 2")


def test_an_invalid_cron_is_rejected_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="inference_cron"):
        Settings(inference_cron="every monday")


def test_redact_url_drops_credentials_only() -> None:
    assert redact_url("http://admin:s3cret@host:4200/api", drop_credentials=True) == "http://host:4200/api"
    assert redact_url("http://127.0.0.1:4200/api", drop_credentials=True) == "http://127.0.0.1:4200/api"


def test_banner_gives_ui_and_an_ad_hoc_command_per_deployment_without_secrets() -> None:
    banner = describe_serving(
        "http://admin:s3cret@127.0.0.1:4200/api",
        None,
        Settings(features_cron="0 2 * * *"),
        example_as_of=date(2026, 11, 23),
        auth=True,
    )
    assert "Prefect UI: http://127.0.0.1:4200 " in banner
    assert "s3cret" not in banner
    assert "features/weekly  cron '0 2 * * *'" in banner
    for name in ("features/weekly", "training/weekly", "inference/weekly"):
        assert f"prefect deployment run {name} --param as_of=2026-11-23" in banner
    for spec in SPECS:
        assert f"{spec.cli_command} --as-of 2026-11-23" in banner
    assert "PREFECT_API_AUTH_STRING" in banner


@pytest.fixture(scope="module")
def resolve_deployments() -> dict:
    return {f"{d.flow_name}/{d.name}": d for d in build_deployments(Settings(), RESOLVE_SPECS)}


def test_resolve_deployments_run_on_demand_only_and_require_a_reason(resolve_deployments: dict) -> None:
    assert sorted(resolve_deployments) == [
        "model-promote/on-demand", "model-rollback/on-demand",
        "publication-approve/on-demand", "publication-rollback/on-demand",
    ]  # fmt: skip
    for name, deployment in resolve_deployments.items():
        assert deployment.schedules == [], name
        assert deployment.concurrency_limit == 1, name
    for spec in RESOLVE_SPECS:
        assert "reason" in load_flow(spec.flow_path).parameters.required, spec.flow_path
    assert load_flow("flows.resolve:publication_approve_flow").parameters.required == ["version", "reason"]
    assert resolve_deployments["model-promote/on-demand"].entrypoint == "flows.resolve.model_promote_flow"


def test_banner_gives_a_run_command_with_a_reason_for_each_resolve_deployment() -> None:
    banner = describe_serving("http://127.0.0.1:4200/api", None, Settings(), example_as_of=date(2026, 11, 23))

    for spec in RESOLVE_SPECS:
        (line,) = [line for line in banner.splitlines() if f"prefect deployment run {full_name(spec)}" in line]
        assert "--param reason=" in line and spec.cli_command in line
    assert "publication-approve/on-demand --param version=VERSION --param reason=" in banner
