"""Static checks of the docker compose stack, the Dockerfile and .env.example."""

import re
from pathlib import Path

import pytest
import yaml

from recsys.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> str:
    return (ROOT / ".env.example").read_text()


def defined_variables(env_text: str) -> dict[str, str]:
    """Uncommented NAME=value lines of an env file."""
    pairs = (line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    return {name.strip(): value for name, value in pairs if not name.lstrip().startswith("#")}


def environment_of(service: dict) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")
    ]


def test_compose_declares_the_four_services(services: dict) -> None:
    assert {"postgres", "redis", "prefect-server", "flows"} <= set(services)


def test_every_published_port_binds_to_localhost_only(services: dict) -> None:
    published = [(name, str(port)) for name, s in services.items() for port in s.get("ports", [])]
    assert published, "the Prefect UI at least must be published"
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond localhost"


def test_prefect_ui_is_published_on_4200(services: dict) -> None:
    assert "127.0.0.1:4200:4200" in services["prefect-server"]["ports"]


def test_every_recsys_variable_set_by_compose_is_a_settings_field(services: dict) -> None:
    fields = set(Settings.model_fields)
    names = [name for service in services.values() for name in environment_of(service) if name.startswith("RECSYS_")]
    assert "RECSYS_DATABASE_URL" in names and "RECSYS_REDIS_URL" in names
    unknown = [name for name in names if name.removeprefix("RECSYS_").lower() not in fields]
    assert not unknown, f"compose sets RECSYS_ variables no settings class reads: {unknown}"


def test_env_example_defines_every_variable_compose_interpolates(compose_text: str, env_example: str) -> None:
    used = set(VARIABLE.findall(compose_text))
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "PREFECT_API_AUTH_STRING"} <= used
    missing = used - set(defined_variables(env_example))
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_documents_every_passthrough_variable(services: dict, env_example: str) -> None:
    passthrough = [
        name for service in services.values() for name, value in environment_of(service).items() if value is None
    ]
    undocumented = [name for name in passthrough if name not in env_example]
    assert not undocumented, f".env.example does not mention {undocumented}"


def test_secrets_come_only_from_interpolated_variables(services: dict) -> None:
    secret_names = ("PASSWORD", "AUTH_STRING", "REDISCLI_AUTH")
    for name, service in services.items():
        for key, value in environment_of(service).items():
            if any(part in key for part in secret_names) and value is not None:
                assert "${" in value, f"{name}.{key} holds a literal secret"


def test_env_example_holds_only_placeholder_secrets(env_example: str) -> None:
    secrets = {
        name: value
        for name, value in defined_variables(env_example).items()
        if "PASSWORD" in name or "AUTH_STRING" in name
    }
    assert secrets
    assert all("change-me" in value for value in secrets.values()), secrets


def test_redis_requires_a_password_persists_and_never_evicts(services: dict) -> None:
    command = " ".join(services["redis"]["command"])
    assert "--requirepass ${REDIS_PASSWORD" in command
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_flows_reach_redis_and_prefect_with_credentials(services: dict) -> None:
    env = environment_of(services["flows"])
    assert env["RECSYS_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD}@redis:6379")
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING")
    server_env = environment_of(services["prefect-server"])
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING")


def test_prefect_server_runs_on_postgres_without_analytics(services: dict) -> None:
    env = environment_of(services["prefect-server"])
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_postgres_init_creates_the_prefect_database_with_pg_trgm(compose: dict) -> None:
    target = compose["services"]["postgres"]["configs"][0]
    sql = compose["configs"][target["source"]]["content"]
    assert target["target"].startswith("/docker-entrypoint-initdb.d/")
    assert "CREATE DATABASE prefect" in sql
    assert "CREATE EXTENSION IF NOT EXISTS pg_trgm" in sql


def test_every_service_has_a_healthcheck_and_flows_wait_for_them(services: dict) -> None:
    for name in ("postgres", "redis", "prefect-server", "flows"):
        assert services[name]["healthcheck"]["test"], name
    depends = services["flows"]["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "prefect-server": "service_healthy",
    }


def test_dockerfile_serves_the_deployments_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert instructions[-1] == ("CMD", '["recsys", "serve"]')
    users = [argument for op, argument in instructions if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    # The locked versions (which include the dask extra), then the package itself without re-resolving.
    assert any(op == "RUN" and "pip install -r requirements.lock" in arg for op, arg in instructions)
    assert any(op == "RUN" and "pip install --no-deps ." in arg for op, arg in instructions)


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {arg.split()[0].rstrip("/") for op, arg in dockerfile_instructions() if op == "COPY"}
    assert set(packages) <= copied, f"the image would lack {sorted(set(packages) - copied)}"
