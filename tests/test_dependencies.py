"""Every third-party package medvl imports is declared in pyproject.toml, in the group an install needs.

scipy came only through scikit-learn's own requirement for a long time, and the service imports pydantic and
starlette directly although only FastAPI was declared: a new release of either dependency dropping them would
break medvl without any change here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "medvl"


def _distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;@ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"core": {_distribution_name(r) for r in project["dependencies"]}}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        groups[extra] = {_distribution_name(r) for r in requirements}
    return groups


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level module names ``path`` imports: (at module level, anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name.split(".")[0] for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return [node.module.split(".")[0]]
        return []

    def third_party(found: list[str]) -> set[str]:
        return {name for name in found if name not in sys.stdlib_module_names and name not in {"medvl", "__future__"}}

    top = third_party([name for node in tree.body for name in names(node)])
    anywhere = third_party([name for node in ast.walk(tree) for name in names(node)])
    return top, anywhere


def _distributions(module: str, installed: dict[str, list[str]]) -> set[str]:
    return {name.lower().replace("_", "-") for name in installed.get(module, [])}


def test_the_parser_reads_requirement_names():
    assert _distribution_name("ray[data]>=2.40,<2.64") == "ray"
    assert _distribution_name("uvloop>=0.19; sys_platform != 'win32'") == "uvloop"
    assert _distribution_name("python_multipart>=0.0.13") == "python-multipart"
    assert _distribution_name("scipy") == "scipy"


def test_every_imported_package_is_declared_and_module_level_imports_come_with_the_install_that_needs_them():
    groups = _declared()
    every = set().union(*groups.values())
    installed = importlib.metadata.packages_distributions()
    undeclared, outside_core, outside_serve = [], [], []
    for path in sorted(SOURCE.rglob("*.py")):
        where = path.relative_to(SOURCE).as_posix()
        top, anywhere = _imports(path)
        for module in sorted(anywhere):
            distributions = _distributions(module, installed)
            assert distributions, f"{where} imports {module}, which no installed distribution provides"
            if not distributions & every:
                undeclared.append(f"{where}: {module} ({', '.join(sorted(distributions))})")
        for module in sorted(top):
            distributions = _distributions(module, installed)
            if where.startswith("serve/"):  # the service's modules are imported only by `medvl serve` ([serve])
                if not distributions & (groups["core"] | groups["serve"]):
                    outside_serve.append(f"{where}: {module}")
            elif not distributions & groups["core"]:
                outside_core.append(f"{where}: {module}")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not outside_core, f"imported when the module loads, so a core dependency is needed: {outside_core}"
    assert not outside_serve, f"the service's modules import these at load, outside [serve]: {outside_serve}"
