"""The README's examples are part of the product: every `recsys` command in its shell blocks
runs here, in the README's order, exactly as written (on MovieLens, from the repository root)."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from cli import main as cli

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.movielens]


def readme_commands() -> list[list[str]]:
    """Each `recsys ...` line of the README's ```sh blocks, split as a shell would (comments dropped)."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("recsys ")]


def test_the_readme_shows_runnable_examples_of_the_main_commands():
    shown = {args[1] for args in readme_commands()}
    assert {"run", "recs", "explain", "models", "publish", "quality", "replay", "evaluate"} <= shown


def test_every_readme_example_runs_on_the_data_it_names(
    movielens_dir, clean_stores, settings, prefect_harness, monkeypatch, capsys
):
    assert movielens_dir == ROOT.parent / "shared" / "data" / "ml-100k"  # the path the README names
    for key in [name for name in os.environ if name.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RECSYS_DATABASE_URL", settings.database_url.get_secret_value())
    monkeypatch.setenv("RECSYS_REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("RECSYS_DATA_DIR", str(settings.data_dir))
    monkeypatch.chdir(ROOT)
    outputs = {}
    for args in readme_commands():
        code = cli.main(args[1:])
        captured = capsys.readouterr()
        assert code == 0, f"README example `{shlex.join(args)}` exited {code}: {captured.err.strip()[-500:]}"
        outputs[shlex.join(args)] = captured.out

    recs = [json.loads(line) for line in outputs["recsys recs 1 2 3 --json"].splitlines()]
    assert [r["user_id"] for r in recs] == [1, 2, 3] and all(r["items"] for r in recs)
    assert "1998-03-02" in outputs["recsys quality"]
    assert outputs["recsys recs 1 --week 1998-03-02"].startswith("user 1: [")
