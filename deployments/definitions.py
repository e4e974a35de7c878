"""The deployments, declared once: the three weekly ones (flow, cron schedule, defaults) and the
resolve ones (run on demand from the UI, a reason required)."""

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recsys.settings import Settings

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT_NAME = "weekly"
RESOLVE_NAME = "on-demand"
TIMEZONE = "UTC"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: which flow, when, with what defaults, and its CLI twin."""

    flow_name: str  # the name in @flow(name=...)
    flow_path: str  # "package.module:function"
    cron_field: str | None  # the Settings field holding this deployment's cron; None: on demand only
    cli_command: str
    description: str
    tags: tuple[str, ...]
    parameters: Mapping[str, object] = field(default_factory=dict)
    # flow parameter -> the Settings field giving its default (shown in the UI, overridable per run)
    settings_parameters: Mapping[str, str] = field(default_factory=dict)
    name: str = DEPLOYMENT_NAME
    timezone: str = TIMEZONE


SPECS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        flow_name="features",
        flow_path="flows.feature_flow:feature_flow",
        cron_field="features_cron",
        cli_command="recsys features",
        description="Build, validate and store the weekly feature snapshot and labels.",
        tags=("recsys", "features"),
        parameters={"backfill_history": True},
        settings_parameters={"source": "source"},
    ),
    DeploymentSpec(
        flow_name="training",
        flow_path="flows.training_flow:training_flow",
        cron_field="training_cron",
        cli_command="recsys train",
        description="Train a LambdaRank model on validated snapshots; promote it if it wins.",
        tags=("recsys", "training"),
    ),
    DeploymentSpec(
        flow_name="inference",
        flow_path="flows.inference_flow:inference_flow",
        cron_field="inference_cron",
        cli_command="recsys infer",
        description="Score every user with the champion model and publish top-N to Redis.",
        tags=("recsys", "inference"),
    ),
)

# The fixes, run from the UI or `prefect deployment run`: no schedule, the reason is a required parameter.
RESOLVE_SPECS: tuple[DeploymentSpec, ...] = tuple(
    DeploymentSpec(
        flow_name=flow_name,
        flow_path=f"flows.resolve:{function}",
        cron_field=None,
        cli_command=command,
        description=description,
        tags=("recsys", "resolve"),
        name=RESOLVE_NAME,
    )
    for flow_name, function, command, description in (
        ("publication-rollback", "publication_rollback_flow", "recsys publish rollback --reason ...",
         "Point readers back to the previous publication."),
        ("publication-approve", "publication_approve_flow", "recsys publish approve VERSION --reason ...",
         "Make a publication held by the checks live."),
        ("model-promote", "model_promote_flow", "recsys models promote VERSION --reason ... [--force]",
         "Make a model version the champion."),
        ("model-rollback", "model_rollback_flow", "recsys models rollback --reason ...",
         "Give the champion alias back to its previous holder."),
    )
)  # fmt: skip


def load_flow(flow_path: str) -> "Flow":
    """Import the flow object named by `module:attribute`."""
    module_name, _, attribute = flow_path.partition(":")
    if not attribute:
        raise ValueError(f"flow path {flow_path!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module_name), attribute)


def cron_of(spec: DeploymentSpec, settings: Settings) -> str | None:
    """The cron expression configured for one deployment (None: run on demand only)."""
    return getattr(settings, spec.cron_field) if spec.cron_field else None


def build_deployments(settings: Settings, specs: tuple[DeploymentSpec, ...] = SPECS) -> list["RunnerDeployment"]:
    """One runner deployment per spec, scheduled in UTC if it has a cron, never two runs at once."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    return [
        load_flow(spec.flow_path).to_deployment(
            spec.name,
            # The slug is what the UI shows on the deployment page: the cron and its time zone, explicitly.
            schedule=Cron(
                cron_of(spec, settings), timezone=spec.timezone, slug=f"{cron_of(spec, settings)} ({spec.timezone})"
            )
            if spec.cron_field
            else None,
            parameters=parameters_of(spec, settings),
            tags=list(spec.tags),
            description=f"{spec.description} Schedule: cron '{cron_of(spec, settings)}' in {spec.timezone}."
            if spec.cron_field
            else f"{spec.description} On demand; a reason is required. CLI: {spec.cli_command}",
            # A run that collides with a running one waits for it rather than overlapping.
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE"),
            # Module paths resolve wherever the project is installed (venv or image).
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for spec in specs
    ]


def full_name(spec: DeploymentSpec) -> str:
    """`<flow-name>/<deployment-name>`, as `prefect deployment run` expects it."""
    return f"{spec.flow_name}/{spec.name}"


def parameters_of(spec: DeploymentSpec, settings: Settings) -> dict[str, object]:
    """The deployment's default parameters: fixed ones, then those taken from the settings."""
    return dict(spec.parameters) | {name: getattr(settings, field) for name, field in spec.settings_parameters.items()}
