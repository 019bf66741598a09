"""Imports point one way, between every pair of tunelens's packages.

    core (tunelens/*.py: settings, errors, console)
      <- engine <- report                      the weight analysis, no MLflow
      <- registry                              versions, files, bases, aliases (MLflow, no torch at
                                               the store's door)
      <- evaluators                            side by side + verdict
      <- service                               the hook service: runs analyses and evaluations
      <- plugin, demo                          the edges

Read from the source with ast (no import runs), so a lazy import inside a function counts too.
docs/architecture.md draws the same graph. Two more house rules are read the same way: settings are
read from conf.yaml at the doors (plugin/) and passed down, and no function runs past 60 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO
from tunelens.settings import Settings

# package -> its folder, and the tunelens packages it may import (itself always).
FOLDERS = {
    "core": REPO / "tunelens",
    "registry": REPO / "tunelens" / "registry",
    "demo": REPO / "tunelens" / "demo",
    "engine": REPO / "registry_hooks" / "engine",
    "report": REPO / "registry_hooks" / "report",
    "service": REPO / "registry_hooks" / "service",
    "evaluators": REPO / "evaluators",
    "plugin": REPO / "plugin",
}
MODULES = {
    "core": "tunelens", "registry": "tunelens.registry", "demo": "tunelens.demo",
    "engine": "tunelens.registry_hooks.engine", "report": "tunelens.registry_hooks.report",
    "service": "tunelens.registry_hooks.service", "evaluators": "tunelens.evaluators",
    "plugin": "tunelens.plugin",
}
ALLOWED = {
    "core": {"core"},
    "engine": {"core"},
    "report": {"core", "engine"},
    "registry": {"core", "engine"},
    "evaluators": {"core", "engine", "report", "registry"},
    "service": {"core", "engine", "report", "registry", "evaluators"},
    "demo": {"core", "engine", "report", "registry", "evaluators", "service"},
    "plugin": {"core", "engine", "report", "registry", "evaluators", "service", "demo"},
}
# Libraries a package may not import: they belong to a later layer.
FORBIDDEN_LIBRARIES = {
    "engine": ("mlflow", "matplotlib", "jinja2"),
    "report": ("mlflow",),
}


def _package_of_module(name: str) -> str | None:
    """Which package an imported `tunelens...` module belongs to (the longest prefix wins)."""
    if name != "tunelens" and not name.startswith("tunelens."):
        return None
    best = max((p for p, m in MODULES.items() if name == m or name.startswith(m + ".")),
               key=lambda p: len(MODULES[p]))
    return best


def _package_of_file(path: Path) -> str:
    return max((p for p, folder in FOLDERS.items() if path.is_relative_to(folder)),
               key=lambda p: len(FOLDERS[p].parts))


def _imports(source: str, here: list[str]) -> set[str]:
    """Absolute names of every module a file of package path `here` imports, at module level or
    inside a function, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1]
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def _file_imports(path: Path) -> set[str]:
    package = _package_of_file(path)
    here = MODULES[package].split(".") + list(path.parent.relative_to(FOLDERS[package]).parts)
    return _imports(path.read_text(encoding="utf-8"), here)


def _sources(package: str) -> list[Path]:
    inner = [FOLDERS[p] for p in FOLDERS if p != package and FOLDERS[p].is_relative_to(FOLDERS[package])]
    return [path for path in sorted(FOLDERS[package].rglob("*.py"))
            if not any(path.is_relative_to(folder) for folder in inner)]


@pytest.mark.parametrize("package", sorted(FOLDERS))
def test_imports_point_one_way(package):
    wrong = []
    for path in _sources(package):
        for name in sorted(_file_imports(path)):
            target = _package_of_module(name)
            if target is not None and target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(REPO)} imports {name} ({package} -> {target})")
            if name.split(".")[0] in FORBIDDEN_LIBRARIES.get(package, ()):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, wrong


def test_the_rule_sees_lazy_and_relative_imports():
    """The checker itself: a function-level import and a `..` import are both read."""
    source = ("def f():\n    from tunelens.registry_hooks.service import state\n"
              "from ..registry_hooks.service import worker\n")
    names = _imports(source, ["tunelens", "evaluators"])
    assert names == {"tunelens.registry_hooks.service"}
    assert _package_of_module("tunelens.registry_hooks.service.worker") == "service"
    assert _package_of_module("tunelens.registry.files") == "registry"
    assert _package_of_module("tunelens.errors") == "core"


# The doors: the commands, the evaluator MLflow calls and the registry store MLflow builds.
SETTINGS_READERS = {"plugin"}
LONGEST_FUNCTION = 60


def _calls_load_config(source: str) -> bool:
    return any(isinstance(node, ast.Call) and (
        getattr(node.func, "id", None) == "load_config"
        or getattr(node.func, "attr", None) == "load_config") for node in ast.walk(ast.parse(source)))


def _product_sources() -> list[Path]:
    return [path for package in sorted(FOLDERS) for path in _sources(package)]


def test_only_the_doors_read_the_settings_file():
    readers = [str(path.relative_to(REPO)) for path in _product_sources()
               if _package_of_file(path) not in SETTINGS_READERS
               and _calls_load_config(path.read_text(encoding="utf-8"))]
    assert not readers, f"read conf.yaml at the command's edge and pass it down: {readers}"


def _settings_read_as_dicts(source: str, where: str) -> list[str]:
    """`config["verdict"]`-style subscripts: the settings are typed, read as attributes."""
    sections = set(Settings.model_fields)
    return [f"{where}:{node.lineno}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value in sections
            and (getattr(node.value, "id", None) == "config"
                 or getattr(node.value, "attr", None) == "config")]


def test_settings_are_read_as_types():
    found = [hit for path in _product_sources()
             for hit in _settings_read_as_dicts(path.read_text(encoding="utf-8"),
                                                str(path.relative_to(REPO)))]
    assert not found, f"read the typed settings (config.verdict.alpha), not a dict: {found}"
    assert _settings_read_as_dicts('a = plan.config["verdict"]["alpha"]\n', "f.py") == ["f.py:1"]
    assert not _settings_read_as_dicts('a = adapter_config["r"]\n', "f.py")


def test_the_rules_see_a_settings_read_and_a_long_function():
    assert _calls_load_config("def f(config=None):\n    return config or load_config()\n")
    assert _calls_load_config("import tunelens.config as c\nc.load_config('x')\n")
    assert not _calls_load_config("def load_config(path):\n    return path\n")
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST_FUNCTION))
    assert _long_functions(f"def f():\n{body}", "f.py") == [f"f.py:1 f ({LONGEST_FUNCTION + 1} lines)"]


def _long_functions(source: str, where: str) -> list[str]:
    return [f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]


def test_no_function_runs_past_60_lines():
    found = [line for path in _product_sources()
             for line in _long_functions(path.read_text(encoding="utf-8"),
                                         str(path.relative_to(REPO)))]
    assert not found, f"split these into functions that each do one thing: {found}"


def test_every_module_lives_in_a_package():
    assert sorted(p.name for p in (REPO / "registry_hooks").glob("*.py")) == ["__init__.py"]


def test_the_registry_store_loads_no_model_library():
    """The store runs inside the user's MLflow server: importing it must not pull torch and co."""
    import subprocess
    import sys

    probe = ("import sys, tunelens.plugin.registry_store, tunelens.plugin.cmd_promote; "
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'vllm', 'safetensors') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
