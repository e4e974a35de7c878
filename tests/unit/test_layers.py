"""Dependencies point one way: entry points → flows → pipelines → ranking/features → the ground.

Each first-party package may import only the packages listed for it (and itself); the
imports are read with `ast`, including those inside functions, so a lazy import counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the first-party packages it may import
ALLOWED = {
    "recsys": set(),
    "features": {"recsys"},
    "ranking": {"recsys", "features"},
    "training": {"recsys", "features", "ranking"},
    "inference": {"recsys", "features", "ranking"},
    "flows": {"recsys", "features", "ranking", "training", "inference"},
    "deployments": {"recsys", "flows"},
    "cli": {"recsys", "features", "ranking", "training", "inference", "flows", "deployments"},
    "benchmarks": {"recsys", "features", "ranking", "training", "inference", "flows"},
}
FIRST_PARTY = set(ALLOWED) | {"tests"}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Each first-party top-level package that `path` imports, with the line of the import."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in FIRST_PARTY}
    return found


def upward_imports(package: str) -> list[str]:
    allowed = ALLOWED[package] | {package}
    return [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for imported, line in sorted(imported_packages(path))
        if imported not in allowed
    ]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import polars\n\ndef f():\n    from flows.feature_flow import feature_flow\n")
    assert imported_packages(module) == {("flows", 4)}


def test_every_first_party_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(ALLOWED)
