"""Is a registered model version a LoRA adapter? Look at its artifacts, download only what is needed.

A version is analysed when its artifacts hold a PEFT `adapter_config.json` with peft_type LORA,
either at the root (a plain adapter directory) or in `peft/` (an `mlflow.transformers` PEFT model,
whose MLmodel is fetched too for the base model's path). Anything else is skipped with a reason.
Artifact paths are untrusted: one with a `..` or absolute component is refused, and so is a
version whose files add up to more than hooks.max_download_bytes.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mlflow import MlflowClient
from mlflow.entities import FileInfo
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from tunelens.errors import TunelensError

from tunelens.registry_hooks.engine.loading import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
PEFT_DIR = "peft"  # mlflow.transformers' folder for a PEFT adapter (mlflow.transformers.peft)


class AdapterDetectionError(TunelensError):
    """The version looks like an adapter but its artifacts cannot be fetched safely."""


@dataclass
class Detection:
    """Where the version's adapter landed locally, or why there is none to analyse."""

    model_dir: Path  # local copy of what was downloaded (the version's root layout)
    adapter_dir: Path | None
    peft_type: str | None
    skip_reason: str | None = None

    @property
    def is_lora(self) -> bool:
        return self.adapter_dir is not None


def _names(repo, path: str = "") -> dict[str, FileInfo]:
    """Entries directly under `path`: basename -> FileInfo; a path that could leave the download
    directory (`..`, absolute, backslash) is refused whatever the artifact store allowed."""
    entries = {}
    for info in repo.list_artifacts(path or None):
        where = PurePosixPath(info.path)
        if where.is_absolute() or ".." in where.parts or "\\" in info.path:
            raise AdapterDetectionError(f"artifact path {info.path!r} is absolute or contains "
                                        "'..': refused; re-log the adapter from a plain directory")
        entries[posixpath.basename(info.path)] = info
    return entries


def detect_adapter(client: MlflowClient, name: str, version: str, dest: Path,
                   max_bytes: int) -> Detection:
    """Find and download the version's LoRA adapter under `dest`; skip_reason says why not.
    At most `max_bytes` (hooks.max_download_bytes) are downloaded, checked on the listed sizes
    before and on the files on disk after."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = client.get_model_version_download_uri(name, version)
    repo = get_artifact_repository(source, tracking_uri=client.tracking_uri)
    root = _names(repo)
    if _is_file(root, ADAPTER_CONFIG):
        adapter_path = ""
    elif _is_dir(root, PEFT_DIR) and _is_file(_names(repo, PEFT_DIR), ADAPTER_CONFIG):
        adapter_path = PEFT_DIR
    else:
        return Detection(dest, None, None, f"no PEFT {ADAPTER_CONFIG} at the root of {source} "
                         f"or in its {PEFT_DIR}/ folder: not a PEFT adapter")

    entries = _names(repo, adapter_path) if adapter_path else root
    # adapter_config.json, adapter_model.safetensors/.bin (tokenizers and checkpoints are not needed
    # for the weight analysis), and MLmodel, which names the local base model of an MLflow model.
    wanted = [info for entry, info in sorted(entries.items())
              if not info.is_dir and entry.startswith("adapter_")]
    wanted += [root["MLmodel"]] if _is_file(root, "MLmodel") else []
    listed = sum(info.file_size or 0 for info in wanted)
    if listed > max_bytes:
        raise AdapterDetectionError(f"{name} version {version}: the adapter's files are {listed:,} "
                                    f"bytes, over hooks.max_download_bytes ({max_bytes:,}); raise "
                                    "it in conf.yaml if this adapter is genuine")
    config_info = entries[ADAPTER_CONFIG]
    config_file = Path(repo.download_artifacts(config_info.path, dst_path=str(dest)))
    peft_type = read_json_object(config_file).get("peft_type")
    if str(peft_type).upper() != "LORA":
        return Detection(dest, None, str(peft_type),
                         f"peft_type is {peft_type!r}, not LORA: only LoRA adapters are analysed")
    for info in wanted:
        if info is not config_info:
            repo.download_artifacts(info.path, dst_path=str(dest))
    on_disk = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if on_disk > max_bytes:  # the listing may omit or understate sizes
        raise AdapterDetectionError(f"{name} version {version}: downloaded {on_disk:,} bytes, over "
                                    f"hooks.max_download_bytes ({max_bytes:,})")
    return Detection(dest, dest / adapter_path if adapter_path else dest, "LORA")


def _is_file(entries: dict[str, FileInfo], name: str) -> bool:
    return name in entries and not entries[name].is_dir


def _is_dir(entries: dict[str, FileInfo], name: str) -> bool:
    return name in entries and entries[name].is_dir
