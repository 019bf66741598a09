"""An mlx-lm adapter registered in MLflow is detected, fetched (adapters.safetensors) and analysed
by the hook worker like a PEFT one; an mlx-lm DoRA run is skipped with its reason."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from support.factories import make_mlx_lm_adapter, mlx_lm_fused_deltas
from support.hooks_support import register

from tunelens.config import load_config
from tunelens.registry.files import detect_adapter
from tunelens.registry_hooks.service.state import RUN_ID, STATUS
from tunelens.registry_hooks.service.worker import Worker


def test_an_mlx_lm_version_is_detected_and_analysed(mlflow_server, llama_base, tmp_path):
    client = MlflowClient(mlflow_server.url)
    adapter = make_mlx_lm_adapter(llama_base, tmp_path / "mlx", rank=4, scale=10.0,
                                  keys=["self_attn.q_proj", "mlp.down_proj"])
    version = register(client, "mlx-lm-adapter", adapter)
    detection = detect_adapter(client, "mlx-lm-adapter", version, tmp_path / "fetched",
                               max_bytes=10 ** 8)
    assert detection.is_lora and (detection.adapter_dir / "adapters.safetensors").is_file()
    outcome = Worker(mlflow_server.url, load_config()).process("mlx-lm-adapter", version)
    tags = client.get_model_version("mlx-lm-adapter", version).tags
    assert outcome.status == tags[STATUS] == "done", tags
    local = client.download_artifacts(tags[RUN_ID], "tunelens/analysis.json", str(tmp_path))
    data = json.loads(open(local, encoding="utf-8").read())
    assert (data["adapter"]["format"], data["adapter"]["scale"]) == ("mlx-lm", 10.0)
    assert data["base_model"] == str(llama_base)  # the config's `model`, a local directory
    reference = {name: float((d ** 2).sum() ** 0.5)
                 for name, d in mlx_lm_fused_deltas(adapter, 10.0).items()}
    assert {m["name"]: m["fro"] for m in data["modules"]} == pytest.approx(reference, rel=1e-9)

    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "fine_tune_type": "dora"}))
    dora = register(client, "mlx-lm-adapter", adapter)
    skipped = detect_adapter(client, "mlx-lm-adapter", dora, tmp_path / "dora", max_bytes=10 ** 8)
    assert not skipped.is_lora and "an mlx-lm 'dora' fine-tune" in skipped.skip_reason
