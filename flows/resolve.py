"""Resolve flows: the fixes an operator applies from the Prefect UI, each the twin of a CLI command.

Publication rollback and approval, model promotion and rollback; a reason is required, the
actor recorded is `prefect:<flow run id>`. Each calls the same pipeline function as the CLI.
"""

from prefect import flow

from flows.common import current_run_id
from flows.runs import run_body
from inference import publications, publish
from ranking import registry
from recsys.settings import Settings
from recsys.stores import open_stores


def actor() -> str:
    """Who did it, for the audit trails: `prefect:<flow run id>`."""
    return f"prefect:{current_run_id() or 'no-run'}"


@flow(name="publication-rollback")
@run_body
def publication_rollback_flow(reason: str) -> str:
    """Point readers back to the previous publication (`recsys publish rollback`); the version live now."""
    settings = Settings()
    with open_stores(settings) as stores:
        publications.ensure_schema(stores.engine)
        return publish.rollback_publication(
            stores.engine, stores.redis, settings.redis_prefix, reason=reason, actor=actor()
        )


@flow(name="publication-approve")
@run_body
def publication_approve_flow(version: str, reason: str) -> str:
    """Make a held publication live (`recsys publish approve`); the version live now."""
    settings = Settings()
    with open_stores(settings) as stores:
        publications.ensure_schema(stores.engine)
        return publish.approve_publication(
            stores.engine, stores.redis, settings.redis_prefix, version, reason=reason, actor=actor(),
            keep=settings.keep_versions,
        ).version  # fmt: skip


@flow(name="model-promote")
@run_body
def model_promote_flow(version: int, reason: str, force: bool = False) -> int:
    """Make a model version the champion (`recsys models promote`); the champion's version."""
    settings = Settings()
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        registry.promote(stores.engine, settings.model_name, version, reason=reason, actor=actor(), force=force)
    return version


@flow(name="model-rollback")
@run_body
def model_rollback_flow(reason: str) -> int:
    """Give the champion alias back to its previous holder (`recsys models rollback`); the champion's version."""
    settings = Settings()
    with open_stores(settings) as stores:
        registry.ensure_schema(stores.engine)
        return registry.rollback(stores.engine, settings.model_name, reason=reason, actor=actor())
