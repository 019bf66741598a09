"""The evaluators' rooms hold together: each is installed and every backend module is listed."""
from __future__ import annotations

import configparser

from support import REPO

EVALUATORS = REPO / "evaluators"


def test_every_room_is_an_installed_package():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    installed = set(setup["options"]["packages"].split())
    rooms = {"tunelens.evaluators" + "".join(f".{part}" for part in init.parent.relative_to(
        EVALUATORS).parts) for init in EVALUATORS.rglob("__init__.py")}
    assert rooms <= installed, sorted(rooms - installed)
    assert sorted(p.name for p in EVALUATORS.rglob("templates/*.html")) == [
        "domains_section.html", "load_section.html", "matrix_section.html", "side_by_side.html",
        "texts_section.html"]
    assert setup["options.package_data"]["tunelens.evaluators.pages"] == "templates/*"


def test_every_engine_module_is_a_listed_backend():
    from tunelens.evaluators.engines.choice import BACKENDS

    modules = {p.stem for p in (EVALUATORS / "engines").glob("*.py")} - {
        "__init__", "interface", "choice"}
    assert modules == set(BACKENDS)
    for name in modules:
        module = __import__(f"tunelens.evaluators.engines.{name}", fromlist=["BACKEND"])
        assert module.BACKEND is BACKENDS[name]
