"""Base-model resolution follows its documented order (docs/hooks.md), on a real MLflow server; nothing is fetched."""
from __future__ import annotations

import json

import yaml
from mlflow import MlflowClient

from tunelens.registry_hooks.service.base_resolution import BASE_MODEL_TAG, resolve_base_model


def _model_dir(tmp_path, *, hub_id=None, local_base=None, recorded=None):
    model = tmp_path / "model"
    (model / "peft").mkdir(parents=True)
    flavor = {"source_model_name": hub_id} if hub_id else {}
    if local_base:
        flavor["local_base_model_path"] = str(local_base)
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"transformers": flavor}}))
    (model / "peft" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": recorded}))
    return model


def test_resolution_order(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model("based")
    version = client.create_model_version("based", "s3://bucket/based/model", None).version
    dirs = {k: tmp_path / k for k in ("tagged", "model-tagged", "mapped", "flavor", "recorded")}
    for d in dirs.values():
        d.mkdir()
    config = {"hooks": {"base_models": {"org/base": str(dirs["mapped"]),
                                        "org/missing": str(tmp_path / "nowhere")}}}
    model = _model_dir(tmp_path, hub_id="org/base", local_base=dirs["flavor"],
                       recorded=str(dirs["recorded"]))

    def resolve():
        return resolve_base_model(client, "based", version, config, model)

    client.set_model_version_tag("based", version, BASE_MODEL_TAG, str(dirs["tagged"]))
    client.set_registered_model_tag("based", BASE_MODEL_TAG, str(dirs["model-tagged"]))
    assert resolve().path == dirs["tagged"]
    client.set_model_version_tag("based", version, BASE_MODEL_TAG, "org/missing")
    found = resolve()
    assert found.path == dirs["model-tagged"] and found.source.startswith("registered model tag")
    assert any("org/missing" in t and "not a directory" in t for t in found.tried)
    client.delete_registered_model_tag("based", BASE_MODEL_TAG)
    client.delete_model_version_tag("based", version, BASE_MODEL_TAG)
    assert resolve().path == dirs["mapped"]
    config["hooks"]["base_models"] = {}
    found = resolve()
    assert found.path == dirs["flavor"] and found.source == "MLmodel local_base_model_path"
    dirs["flavor"].rmdir()
    assert resolve().path == dirs["recorded"]
    dirs["recorded"].rmdir()
    found = resolve()
    assert found.path is None and found.source == "none" and len(found.tried) >= 4
