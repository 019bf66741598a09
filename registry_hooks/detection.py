"""Is a registered model version a LoRA adapter? Look at its artifacts, download only what is needed.

A version is analysed when its artifacts hold a PEFT `adapter_config.json` with peft_type LORA,
either at the root (a plain adapter directory) or in `peft/` (an `mlflow.transformers` PEFT model,
whose MLmodel is fetched too for the base model's path). Anything else is skipped with a reason.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from tunelens.errors import TunelensError

ADAPTER_CONFIG = "adapter_config.json"
PEFT_DIR = "peft"  # mlflow.transformers' folder for a PEFT adapter (mlflow.transformers.peft)


class AdapterDetectionError(TunelensError):
    """The version looks like an adapter but its config cannot be read."""


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


def _names(repo, path: str = "") -> dict[str, bool]:
    """Entries directly under `path`: basename -> is_dir."""
    return {posixpath.basename(f.path): f.is_dir for f in repo.list_artifacts(path or None)}


def detect_adapter(client: MlflowClient, name: str, version: str, dest: Path) -> Detection:
    """Find and download the version's LoRA adapter under `dest`; skip_reason says why not."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = client.get_model_version_download_uri(name, version)
    repo = get_artifact_repository(source, tracking_uri=client.tracking_uri)
    root = _names(repo)
    if root.get(ADAPTER_CONFIG) is False:
        adapter_path = ""
    elif root.get(PEFT_DIR) and _names(repo, PEFT_DIR).get(ADAPTER_CONFIG) is False:
        adapter_path = PEFT_DIR
    else:
        return Detection(dest, None, None, f"no PEFT {ADAPTER_CONFIG} at the root of {source} "
                         f"or in its {PEFT_DIR}/ folder: not a PEFT adapter")

    config_file = Path(repo.download_artifacts(posixpath.join(adapter_path, ADAPTER_CONFIG),
                                               dst_path=str(dest)))
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise AdapterDetectionError(f"{ADAPTER_CONFIG} of {name} version {version} is not a JSON "
                                    f"object ({exc}); re-log the adapter with PEFT's "
                                    f"save_pretrained") from None
    if str(peft_type).upper() != "LORA":
        return Detection(dest, None, str(peft_type),
                         f"peft_type is {peft_type!r}, not LORA: only LoRA adapters are analysed")

    for entry, is_dir in (_names(repo, adapter_path) if adapter_path else root).items():
        # adapter_config.json, adapter_model.safetensors/.bin: tokenizers and checkpoints are not
        # needed for the weight analysis.
        if not is_dir and entry.startswith("adapter_") and entry != ADAPTER_CONFIG:
            repo.download_artifacts(posixpath.join(adapter_path, entry), dst_path=str(dest))
    if root.get("MLmodel") is False:  # an MLflow model: MLmodel names the local base model
        repo.download_artifacts("MLmodel", dst_path=str(dest))
    return Detection(dest, dest / adapter_path if adapter_path else dest, "LORA")
