"""Serve the deployments (three weekly, four on demand): to the configured Prefect server, or to a local
one started here.

`python -m deployments.serve` (or `recsys serve`) runs until Ctrl-C or SIGTERM and then
stops everything it started: the runner, the local Prefect server, embedded stores.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, date, datetime
from pathlib import Path

from deployments.definitions import (
    RESOLVE_SPECS,
    SPECS,
    build_deployments,
    cron_of,
    full_name,
    parameters_of,
)
from recsys.clock import week_floor
from recsys.settings import Settings
from recsys.stores import open_stores, redact_url

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 180.0  # first start migrates the database; slow on a busy machine
SERVER_STOP_TIMEOUT_S = 20.0


def serve_deployments(settings: Settings) -> None:
    """Serve features/training/inference on their cron schedules, and the resolve flows on demand, until stopped."""
    from prefect import serve
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_API_AUTH_STRING,
        get_current_settings,
        temporary_settings,
    )

    # Importing the flows first fails fast, before any server is started.
    deployments = build_deployments(settings, SPECS + RESOLVE_SPECS)
    with ExitStack() as stack:
        stack.enter_context(_sigterm_exits())
        api_url = get_current_settings().api.url
        updates = {}
        if not api_url:
            api_url = stack.enter_context(run_local_server(settings.data_dir / "prefect", settings.prefect_port))
            updates[PREFECT_API_URL] = api_url
            # The server we started checks this string; the runner must send the same one.
            server_auth = PREFECT_SERVER_API_AUTH_STRING.value()
            if server_auth and not PREFECT_API_AUTH_STRING.value():
                updates[PREFECT_API_AUTH_STRING] = server_auth
        stack.enter_context(_shared_stores(settings))
        # Flow runs are subprocesses; Prefect passes them these settings as env vars.
        stack.enter_context(temporary_settings(updates=updates))

        print(
            describe_serving(
                api_url,
                get_current_settings().ui_url,
                settings,
                example_as_of=week_floor(datetime.now(UTC)),
                auth=get_current_settings().api.auth_string is not None,
            ),
            flush=True,
        )
        serve(*deployments, pause_on_shutdown=False, print_starting_message=False)
    log.info("serve stopped")


def describe_serving(
    api_url: str,
    ui_url: str | None,
    settings: Settings,
    example_as_of: date,
    auth: bool = False,
) -> str:
    """The banner: where the UI is, what is scheduled, how to run each flow now, and the fixes on demand."""
    api = redact_url(api_url, drop_credentials=True)
    ui = redact_url(ui_url, drop_credentials=True) if ui_url else api.removesuffix("/api")
    lines = [
        f"Prefect UI: {ui}   (API: {api})",
        "Serving, schedules in UTC:",
        *(
            f"  {full_name(spec)}  cron '{cron_of(spec, settings)}' {spec.timezone}"
            + "".join(f"  {name}={value!r}" for name, value in parameters_of(spec, settings).items())
            for spec in SPECS
        ),
        "Run one now from another shell:",
        *(
            f"  PREFECT_API_URL={api} prefect deployment run {full_name(spec)}"
            f" --param as_of={example_as_of.isoformat()}"
            for spec in SPECS
        ),
        "or without Prefect:",
        *(f"  {spec.cli_command} --as-of {example_as_of.isoformat()}" for spec in SPECS),
        "On demand, to resolve (a reason is required; the same as the CLI command after #):",
        *(
            f"  PREFECT_API_URL={api} prefect deployment run {full_name(spec)}"
            + "".join(f" --param {name}={value}" for name, value in _EXAMPLE_PARAMETERS[spec.flow_name])
            + f" --param reason='...'   # {spec.cli_command}"
            for spec in RESOLVE_SPECS
        ),
    ]
    if auth:
        lines.append("The API needs basic auth: export PREFECT_API_AUTH_STRING (see .env).")
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


_EXAMPLE_PARAMETERS = {
    "publication-rollback": (),
    "publication-approve": (("version", "VERSION"),),
    "model-promote": (("version", "VERSION"),),
    "model-rollback": (),
}


@contextmanager
def run_local_server(home: Path, port: int, timeout_s: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1:`port` with its data in `home`; yield its API URL.

    Port 0 picks a free port.
    """
    port = port or free_port()
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI derives the API address its browser code calls from these two.
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log_path = home / "server.log"
    log.info("starting Prefect server on port %d (log: %s)", port, log_path)
    with log_path.open("ab") as server_log:
        # Own session: Ctrl-C reaches only us, and we stop the server after the runner.
        process = subprocess.Popen(
            command, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_healthy(api_url, process, log_path, timeout_s)
        yield api_url
    finally:
        stop_process(process)
        log.info("Prefect server stopped")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(api_url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Return once `api_url`/health answers; raise if the server exits or times out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(
                f"Prefect server exited with code {process.returncode} before it was healthy; see {log_path}"
            )
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    log.info("Prefect server healthy after %.1f s", time.monotonic() - started)
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"Prefect server at {api_url} not healthy after {timeout_s:.0f} s; see {log_path}")


def stop_process(process: subprocess.Popen, timeout_s: float = SERVER_STOP_TIMEOUT_S) -> None:
    """SIGTERM the process, then SIGKILL it if it is still there after `timeout_s`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _shared_stores(settings: Settings) -> Iterator[None]:
    """Keep the embedded stores running while serving, when no store URL is configured.

    Flow runs are subprocesses that build their Settings from the same environment: with the
    same data folder they attach to these running servers instead of starting their own.
    """
    if settings.database_url is not None and settings.redis_url is not None:
        yield
        return
    with open_stores(settings):
        yield


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit during start-up so cleanup still runs.

    Prefect's runner installs its own graceful SIGTERM handler once it is serving.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point of `python -m deployments.serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The runner polls the API every few seconds; one INFO line per request drowns the rest.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve_deployments(Settings())


if __name__ == "__main__":
    main()
