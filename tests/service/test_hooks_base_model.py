"""Base-model resolution follows its documented order (docs/hooks.md), on a real MLflow server; nothing is fetched."""
from __future__ import annotations

import json

import yaml
from mlflow import MlflowClient

from tunelens.config import with_changes
from tunelens.registry.base_model import BASE_MODEL_TAG, resolve_base_model


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
    config = with_changes(None, {"hooks": {"base_models": {"org/base": str(dirs["mapped"]),
                                                           "org/missing": str(tmp_path / "nowhere")}}})
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
    config = with_changes(config, {"hooks": {"base_models": {}}})
    found = resolve()
    assert found.path == dirs["flavor"] and found.source == "MLmodel local_base_model_path"
    dirs["flavor"].rmdir()
    assert resolve().path == dirs["recorded"]
    dirs["recorded"].rmdir()
    found = resolve()
    assert found.path is None and found.source == "none" and len(found.tried) >= 4


def _hub_cache(root, hub_id, weights_from):
    """A Hugging Face cache laid out as huggingface_hub writes it: blobs, a snapshot of links to
    them, refs/main naming the snapshot."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes((weights_from / name).read_bytes())
        (snapshot / name).symlink_to(f"../../blobs/blob-{name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_base_from_the_local_hugging_face_cache(mlflow_server, tmp_path, monkeypatch,
                                                       llama_base, llama_adapter):
    """A hub id no map names is found in the HF cache (after the tag and the map), analysed from
    its linked blobs; a hub id absent from the cache is said so, nothing is downloaded."""
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    cache = tmp_path / "hf-cache"
    snapshot = _hub_cache(cache, "meta-llama/Llama-3.1-8B", llama_base)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model("cached")
    version = client.create_model_version("cached", "s3://bucket/cached/model", None).version
    model = _model_dir(tmp_path, recorded="meta-llama/Llama-3.1-8B")
    found = resolve_base_model(client, "cached", version, None, model)
    assert found.path == snapshot
    assert found.source == ("Hugging Face cache 'meta-llama/Llama-3.1-8B' (adapter "
                            "base_model_name_or_path)")
    mapped = tmp_path / "mapped"
    mapped.mkdir()
    config = with_changes(None, {"hooks": {"base_models": {"meta-llama/Llama-3.1-8B": str(mapped)}}})
    assert resolve_base_model(client, "cached", version, config, model).path == mapped
    client.set_model_version_tag("cached", version, BASE_MODEL_TAG, "meta-llama/Llama-3.1-8B")
    tagged = resolve_base_model(client, "cached", version, None, model)
    assert tagged.path == snapshot and tagged.source.endswith("(Hugging Face cache)")
    client.delete_model_version_tag("cached", version, BASE_MODEL_TAG)
    result = analyze_adapter(llama_adapter, found.path, progress=False)
    assert all(m.relative_fro is not None for m in result.modules)
    missing = resolve_base_model(client, "cached", version, None,
                                 _model_dir(tmp_path / "other", recorded="org/not-cached"))
    assert missing.path is None
    assert any("'org/not-cached'" in t and "Hugging Face cache" in t for t in missing.tried)
