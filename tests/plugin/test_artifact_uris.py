"""Test sets named by an MLflow artifact URI are fetched from a real MLflow server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tunelens.artifact_uris import fetch_dataset, is_artifact_uri
from tunelens.errors import TunelensError

ROWS = "".join(json.dumps({"inputs": f"she go {i}", "targets": "she goes"}) + "\n"
               for i in range(3))


@pytest.fixture(scope="module")
def logged_test_set(mlflow_server, tmp_path_factory):
    """A run on the server holding test.jsonl; returns the run."""
    path = tmp_path_factory.mktemp("logged") / "test.jsonl"
    path.write_text(ROWS)
    client = MlflowClient(mlflow_server.url)
    run = client.create_run(client.create_experiment("artifact-uri-test-sets"))
    client.log_artifact(run.info.run_id, str(path))
    return run


def test_local_paths_stay_local():
    for local in ("test.jsonl", "/data/test.jsonl", "file:///data/test.jsonl", "C:\\data\\t.csv"):
        assert not is_artifact_uri(local), local
        assert fetch_dataset(local, None) == local
    for uri in ("runs:/0123/test.jsonl", "models:/m/1", "mlflow-artifacts:/1/x/t.csv",
                "s3://bucket/t.parquet"):
        assert is_artifact_uri(uri), uri


def test_runs_models_and_mlflow_artifacts_uris_give_the_logged_file(mlflow_server,
                                                                  logged_test_set, tmp_path):
    run_id = logged_test_set.info.run_id
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model("registered-test-set")
    version = client.create_model_version("registered-test-set", logged_test_set.info.artifact_uri,
                                          run_id=run_id).version
    for index, uri in enumerate((f"runs:/{run_id}/test.jsonl",
                                 f"models:/registered-test-set/{version}/test.jsonl",
                                 f"{logged_test_set.info.artifact_uri}/test.jsonl")):
        into = tmp_path / str(index)
        into.mkdir()
        local = fetch_dataset(uri, into, mlflow_server.url)
        assert open(local).read() == ROWS, uri


def test_a_missing_artifact_is_one_line_from_the_cli(mlflow_server, logged_test_set, tmp_path):
    uri = f"runs:/{logged_test_set.info.run_id}/missing.jsonl"
    with pytest.raises(TunelensError, match="cannot fetch the test set"):
        fetch_dataset(uri, tmp_path, mlflow_server.url)
    done = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "evaluate", "models:/m/1",
                           "--data", uri, "--tracking-uri", mlflow_server.url],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines and lines[0].startswith("tunelens evaluate: error: cannot fetch the test set"), \
        done.stderr[-2000:]
    assert "Traceback" not in done.stderr
