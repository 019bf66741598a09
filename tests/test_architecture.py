"""Imports point one way: service -> report -> engine; the engine needs no MLflow and no matplotlib.

Read from the source with ast (no import runs), so a lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "registry_hooks"
# What each package may not import: a later layer, or a library that belongs to a later layer.
FORBIDDEN = {
    "engine": ("tunelens.registry_hooks.report", "tunelens.registry_hooks.service", "mlflow",
               "matplotlib", "jinja2", "tunelens.evaluators", "tunelens.plugin"),
    "report": ("tunelens.registry_hooks.service", "mlflow", "tunelens.evaluators",
               "tunelens.plugin"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            names.add("tunelens.registry_hooks." + (node.module or ""))  # `..service.x`
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    wrong = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sorted((PACKAGE / package).rglob("*.py")) for name in sorted(_imports(path))
             if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not wrong, wrong


def test_every_module_lives_in_a_package():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]
