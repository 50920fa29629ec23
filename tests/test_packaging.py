"""Every third-party module klstudy's packages import is declared in pyproject.toml.

CI installs the project from pyproject.toml into a fresh venv: an import that works here only
because the package happens to be installed (statsmodels once) fails there at collection. A
module-level import must come from a core dependency; one inside a function (an optional
feature) from a core dependency or an extra.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OWN = {"study", "workers", "analysis"}


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_norm(Requirement(r).name) for r in project["dependencies"]}
    extras = {_norm(Requirement(r).name) for reqs in project["optional-dependencies"].values()
              for r in reqs}
    return core, extras - {"klstudy"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, at module level?, line) for each absolute import in path."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Try, ast.If))
            if isinstance(child, ast.Import):
                found.extend([(a.name.split(".")[0], top, child.lineno) for a in child.names])
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return found


def test_every_imported_distribution_is_declared() -> None:
    core, extras = _declared()
    by_module = md.packages_distributions()
    wrong: list[str] = []
    for package in sorted(OWN):
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, top, line in _imports(path):
                if module in OWN or module in sys.stdlib_module_names or module == "__future__":
                    continue
                dists = {_norm(d) for d in by_module.get(module, [module])}
                allowed = core if top else core | extras
                if not dists & allowed:
                    where = f"{path.relative_to(ROOT)}:{line}"
                    need = "[project] dependencies" if top else "dependencies or an extra"
                    wrong.append(f"{where}: imports {module} ({', '.join(sorted(dists))}), "
                                 f"not in pyproject.toml's {need}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_module_level_import_it_must_find(tmp_path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom statsmodels.stats import multitest\n"
                      "def f():\n    import boto3\n")
    assert _imports(source) == [("os", True, 1), ("statsmodels", True, 2), ("boto3", False, 4)]
