"""Which local base model goes with a registered adapter version (in the order docs/hooks.md gives).

1. tag `tunelens.base_model` on the version, then on the registered model (a local directory, or
   a hub id looked up in conf.yaml's hooks.base_models);
2. conf.yaml's hooks.base_models map, for the hub id the model names (MLmodel's
   source_model_name, then the adapter's base_model_name_or_path);
3. that hub id's snapshot in the local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
   ~/.cache/huggingface/hub), when it holds config.json and safetensors weights (a hub id in a
   tag is looked up there too, after the map);
4. the transformers flavor's `local_base_model_path` in MLmodel;
5. the adapter's `base_model_name_or_path` (mlx-lm's `model`), when it is a local directory.
Nothing is downloaded. No base found -> path None and `tried` says what was looked at; `source`
says which step found it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow import MlflowClient

from tunelens.settings import Settings

BASE_MODEL_TAG = "tunelens.base_model"


@dataclass
class BaseModelResolution:
    """The local base directory (or None), where it came from, and every candidate looked at."""

    path: Path | None
    source: str
    tried: list[str] = field(default_factory=list)


def _local_dir(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_dir() else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it, read from the environment now."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                             "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(hub_id: str | None) -> Path | None:
    """The local snapshot of model `hub_id` (`org/name`) in the Hugging Face cache, never a
    download: the revision refs/main names (huggingface_hub's try_to_load_from_cache), else the
    newest snapshot; only one with config.json and *.safetensors weights counts."""
    if not hub_id or hub_id.count("/") != 1 or hub_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    cache = hub_cache_dir()
    try:
        config = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache)
    except HFValidationError:
        return None
    candidates = [Path(config).parent] if isinstance(config, str) else []
    snapshots = cache / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda d: d.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
            return snapshot
    return None


def _read_model_dir(model_dir: Path | None) -> tuple[dict, dict]:
    """(transformers flavor of MLmodel, adapter_config.json) found under model_dir, else empty."""
    if model_dir is None:
        return {}, {}
    from tunelens.registry_hooks.engine.loading import find_adapter_dir, is_mlx_config

    model_dir = Path(model_dir)
    flavor, adapter = {}, {}
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        try:
            flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get(
                "transformers", {}) or {}
        except yaml.YAMLError:
            flavor = {}
    adapter_dir = find_adapter_dir(model_dir)
    if adapter_dir is not None:
        try:
            adapter = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        except (OSError, ValueError):
            adapter = {}
    if isinstance(adapter, dict) and is_mlx_config(adapter):  # mlx-lm names its base `model`
        adapter = {"base_model_name_or_path": adapter.get("model")}
    return flavor, adapter if isinstance(adapter, dict) else {}


class _Candidates:
    """Turns a named base (a local directory or a hub id) into a local directory, noting in
    `tried` every value that did not lead to one."""

    def __init__(self, hub_map: dict[str, str]):
        self.hub_map = hub_map
        self.tried: list[str] = []

    def local(self, value: str | None, where: str) -> Path | None:
        """A tag's value: a local directory, a mapped hub id, or a cached hub id."""
        if not value:
            return None
        found = _local_dir(value) or _local_dir(self.hub_map.get(value))
        if found is not None:
            return found
        if value in self.hub_map:
            self.tried.append(f"{where} {value!r} maps to {self.hub_map[value]!r}, which is not a "
                              "directory")
        cached = cached_snapshot(value)
        if cached is None:
            self.tried.append(f"{where} {value!r} is neither a local directory, nor in "
                              f"hooks.base_models, nor in the Hugging Face cache {hub_cache_dir()}")
        return cached

    def mapped(self, hub_ids: list[tuple[str, str | None]]) -> BaseModelResolution | None:
        """Step 2: the first hub id that hooks.base_models maps to a local directory."""
        for where, hub_id in hub_ids:
            if hub_id and hub_id in self.hub_map:
                found = _local_dir(self.hub_map[hub_id])
                if found is not None:
                    return BaseModelResolution(found, f"hooks.base_models[{hub_id!r}] ({where})",
                                               self.tried)
                self.tried.append(f"hooks.base_models[{hub_id!r}] = {self.hub_map[hub_id]!r} is "
                                  "not a directory")
        self.tried.append("hooks.base_models has no entry for the model's hub id" if self.hub_map
                          else "hooks.base_models is empty")
        return None

    def cached(self, hub_ids: list[tuple[str, str | None]]) -> BaseModelResolution | None:
        """Step 3: the first hub id whose snapshot is in the local Hugging Face cache."""
        for where, hub_id in hub_ids:
            if hub_id and _local_dir(hub_id) is None:
                found = cached_snapshot(hub_id)
                if found is not None:
                    return BaseModelResolution(found, f"Hugging Face cache {hub_id!r} ({where})",
                                               self.tried)
                self.tried.append(f"{hub_id!r} ({where}) is not in the Hugging Face cache "
                                  f"{hub_cache_dir()}")
        return None

    def directory(self, value: str | None, where: str) -> BaseModelResolution | None:
        """Steps 4 and 5: a path the model's files name, when it is a local directory."""
        if _local_dir(value) is not None:
            return BaseModelResolution(_local_dir(value), where, self.tried)
        self.tried.append(f"{where} {value!r} is not a local directory" if value
                          else f"no {where}")
        return None


def _tagged(client: MlflowClient, name: str, version: str,
            candidates: _Candidates) -> BaseModelResolution | None:
    """Step 1: tag tunelens.base_model on the version, then on the registered model."""
    for where, tags in (("version tag", client.get_model_version(name, version).tags),
                        ("registered model tag", client.get_registered_model(name).tags)):
        found = candidates.local(tags.get(BASE_MODEL_TAG), f"{where} {BASE_MODEL_TAG}")
        if found is not None:
            via = " (Hugging Face cache)" if found.is_relative_to(hub_cache_dir()) else ""
            return BaseModelResolution(found, f"{where} {BASE_MODEL_TAG}{via}", candidates.tried)
        if BASE_MODEL_TAG not in tags:
            candidates.tried.append(f"no {where} {BASE_MODEL_TAG}")
    return None


def resolve_base_model(client: MlflowClient, name: str, version: str | int, config: Settings | None,
                       model_dir: Path | None = None) -> BaseModelResolution:
    """The version's local base model, by the documented order; path None if none is found."""
    hub_map = dict(config.hooks.base_models) if config is not None else {}
    candidates = _Candidates(hub_map)
    flavor, adapter = _read_model_dir(model_dir)
    hub_ids = [("MLmodel source_model_name", flavor.get("source_model_name")),
               ("adapter base_model_name_or_path", adapter.get("base_model_name_or_path"))]
    found = (_tagged(client, name, str(version), candidates)
             or candidates.mapped(hub_ids) or candidates.cached(hub_ids)
             or candidates.directory(flavor.get("local_base_model_path"),
                                     "MLmodel local_base_model_path")
             or candidates.directory(adapter.get("base_model_name_or_path"),
                                     "adapter base_model_name_or_path"))
    return found or BaseModelResolution(None, "none", candidates.tried)
