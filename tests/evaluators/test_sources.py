"""The evaluator fetches a version's files the way the registry hooks do: the adapter's files only,
artifact paths checked, at most hooks.max_download_bytes (a real `mlflow server`)."""
from __future__ import annotations

import json
import shutil
import uuid

import pytest
from mlflow import MlflowClient

from tunelens.errors import TunelensError
from tunelens.registry.files import download_version


@pytest.fixture()
def register(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    name = f"fetch-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    experiment = client.create_experiment(f"exp-{name}")

    def register_dir(folder) -> str:
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(folder), "model")
        return client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                           run_id=run.info.run_id).version

    return client, name, register_dir


def test_only_the_adapter_is_fetched_and_the_size_cap_holds(register, llama_adapter, tmp_path):
    client, name, register_dir = register
    logged = tmp_path / "logged"
    shutil.copytree(llama_adapter, logged)
    (logged / "optimizer.pt").write_bytes(b"\0" * 4096)  # a training leftover the evaluator skips
    version = register_dir(logged)

    ref = download_version(client, name, version, max_bytes=10 ** 9, into=tmp_path / "got")
    fetched = sorted(p.name for p in ref.adapter_dir.iterdir())
    assert "adapter_config.json" in fetched and "adapter_model.safetensors" in fetched
    assert "optimizer.pt" not in fetched

    with pytest.raises(TunelensError, match="max_download_bytes"):
        download_version(client, name, version, max_bytes=1000, into=tmp_path / "capped")


def test_a_version_that_is_not_a_lora_adapter_is_one_clear_error(register, tmp_path):
    client, name, register_dir = register
    other = tmp_path / "ia3"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    version = register_dir(other)
    with pytest.raises(TunelensError, match="'IA3', not LORA"):
        download_version(client, name, version, max_bytes=10 ** 9)
