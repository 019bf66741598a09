"""The MLflow range setup.cfg declares is the range the tests run: requirements.lock holds a release
inside it, requirements-compat.lock holds its floor, and each run checks which one it imports
(`make test-compat` names the floor in TUNELENS_EXPECT_MLFLOW)."""
from __future__ import annotations

import configparser
import inspect
import os

import mlflow
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from support import REPO
from tunelens.errors import TunelensError


def _declared() -> Requirement:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    return next(Requirement(line) for line in lines
                if line.strip() and not line.strip().startswith("#")
                and Requirement(line).name == "mlflow")


def _locked(lock: str, name: str) -> str:
    for line in (REPO / lock).read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in {lock}")


def test_declared_range_is_a_floor_and_the_next_major_as_ceiling():
    bounds = {spec.operator: Version(spec.version) for spec in _declared().specifier}
    assert set(bounds) == {">=", "<"}, bounds
    assert bounds["<"] == Version("4")
    # Teams run MLflow 3.10 today: the floor must not lock them out.
    assert bounds[">="] <= Version("3.10.1")


def test_the_locks_hold_the_newest_tested_release_and_the_floor():
    declared = _declared()
    floor = next(spec.version for spec in declared.specifier if spec.operator == ">=")
    for name in ("mlflow", "mlflow-skinny", "mlflow-tracing"):
        assert Version(_locked("requirements-compat.lock", name)) == Version(floor), name
        assert declared.specifier.contains(_locked("requirements.lock", name)), name


def test_this_run_imports_the_mlflow_it_means_to_test():
    expected = os.environ.get("TUNELENS_EXPECT_MLFLOW") or _locked("requirements.lock", "mlflow")
    assert Version(mlflow.__version__) == Version(expected)


@pytest.mark.skipif("base_model_path" in inspect.signature(mlflow.transformers.log_model).parameters,
                    reason="this MLflow logs an adapter alone: tests/service/test_hooks_server.py "
                           "logs one with tunelens.log_adapter")
def test_log_adapter_on_an_older_mlflow_says_what_to_do_instead(llama_adapter, llama_base):
    import tunelens

    with pytest.raises(TunelensError, match="needs MLflow 3.12 or newer.*create_model_version"):
        tunelens.log_adapter(llama_adapter, base=llama_base, registered_model_name="old")
