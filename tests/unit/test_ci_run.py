"""`.ci/run` never quietly does less under CI=true: unreachable system services fail it.

The script runs with a PATH of its own: `make` (the suite) and `chromium` succeed without doing
anything, `pg_isready` and `redis-cli` report the services down, and there is nothing that could
start them, so the machine's real services are never touched.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_TOOLS = ("bash", "dirname", "id", "seq", "sleep", "ls", "mkdir")


@pytest.fixture
def services_down(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine whose PostgreSQL and Redis are unreachable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in REAL_TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for fake, code in (("make", 0), ("chromium", 0), ("pg_isready", 1), ("redis-cli", 1)):
        (bin_dir / fake).write_text(f"#!/bin/sh\nexit {code}\n")
        (bin_dir / fake).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def run_ci(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [env["PATH"] + "/bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60
    )


def test_unreachable_services_fail_the_run_under_ci(services_down):
    done = run_ci(services_down | {"CI": "true"})

    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL (CI=true): system services not reachable" in done.stderr
    assert "PostgreSQL" in done.stderr and "Redis" in done.stderr


def test_unreachable_services_only_warn_outside_ci(services_down):
    done = run_ci(services_down)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "integration tests run on embedded servers only" in done.stdout


class _Item:
    def __init__(self, fixturenames: list[str], fspath: str = "tests/unit/test_a.py") -> None:
        self.fixturenames, self.markers, self.fspath = fixturenames, [], fspath

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


def test_tests_using_the_session_stores_are_the_ones_ci_runs_against_the_system_services():
    from tests.conftest import pytest_collection_modifyitems

    uses, private = _Item(["flow_env", "clean_stores", "stores"]), _Item(["private_postgres", "tmp_path"])
    pytest_collection_modifyitems([uses, private])

    assert (uses.markers, private.markers) == (["services"], [])
    assert "pytest -q -m services" in (ROOT / ".ci" / "run").read_text()


def test_the_slow_files_run_first_and_every_other_test_keeps_its_place():
    from tests.conftest import SLOW_FILES, pytest_collection_modifyitems

    paths = ["tests/unit/test_b.py", f"tests/reliability/{SLOW_FILES[1]}", "tests/unit/test_a.py",
             f"tests/integration/{SLOW_FILES[0]}", "tests/unit/test_c.py"]  # fmt: skip
    items = [_Item([], path) for path in paths]
    pytest_collection_modifyitems(items)

    assert [item.fspath for item in items] == [paths[3], paths[1], paths[0], paths[2], paths[4]]
