"""A registered version's files: is it a LoRA adapter? Look at its artifacts, download only what is
needed.

A version is analysed when its artifacts hold a PEFT `adapter_config.json` with peft_type LORA
(or an mlx-lm one: `lora_parameters`, weights in `adapters.safetensors`), either at the root (a
plain adapter directory) or in `peft/` (an `mlflow.transformers` PEFT model, whose MLmodel is fetched too for the base model's path). Anything else is skipped with a reason.
Artifact paths are untrusted: one with a `..` or absolute component is refused, and so is a
version whose files add up to more than hooks.max_download_bytes.
"""
from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mlflow import MlflowClient
from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from tunelens.errors import TunelensError
from tunelens.registry.version import VersionRef
from tunelens.registry_hooks.engine.loading import (MLX_WEIGHTS_NAME, not_lora_reason,
                                                   read_json_object)

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
        return Detection(dest, None, None, f"no {ADAPTER_CONFIG} at the root of {source} "
                         f"or in its {PEFT_DIR}/ folder: not a PEFT or mlx-lm adapter")

    entries = _names(repo, adapter_path) if adapter_path else root
    # adapter_config.json, adapter_model.safetensors/.bin (tokenizers and checkpoints are not needed
    # for the weight analysis), and MLmodel, which names the local base model of an MLflow model.
    wanted = [info for entry, info in sorted(entries.items())
              if not info.is_dir and (entry.startswith("adapter_") or entry == MLX_WEIGHTS_NAME)]
    wanted += [root["MLmodel"]] if _is_file(root, "MLmodel") else []
    listed = sum(info.file_size or 0 for info in wanted)
    if listed > max_bytes:
        raise AdapterDetectionError(f"{name} version {version}: the adapter's files are {listed:,} "
                                    f"bytes, over hooks.max_download_bytes ({max_bytes:,}); raise "
                                    "it in conf.yaml if this adapter is genuine")
    config_info = entries[ADAPTER_CONFIG]
    config_file = Path(repo.download_artifacts(config_info.path, dst_path=str(dest)))
    config = read_json_object(config_file)
    reason = not_lora_reason(config)
    if reason:
        return Detection(dest, None, str(config.get("peft_type")), reason)
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


LOCAL_VERSION = "local"  # the version of a candidate folder that is not registered


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, downloaded: its MLflow model folder and its adapter folder, or,
    for a full fine-tune, the folder of the whole model (adapter_dir None). A candidate folder on
    disk that is not registered has the version LOCAL_VERSION."""

    name: str
    version: str
    model_dir: Path
    adapter_dir: Path | None
    full_dir: Path | None = None

    @property
    def registered(self) -> bool:
        return self.version != LOCAL_VERSION

    @property
    def uri(self) -> str:
        """models:/NAME/VERSION, or the folder of a local candidate."""
        return f"models:/{self.name}/{self.version}" if self.registered else str(self.model_dir)

    @property
    def title(self) -> str:
        """How pages name it: "NAME vVERSION", or the folder of a local candidate."""
        return f"{self.name} v{self.version}" if self.registered else str(self.model_dir)


def local_model(path: Path) -> ModelRef:
    """A candidate folder on disk, not registered: a LoRA adapter (PEFT or mlx-lm) or a whole
    model folder (a full fine-tune); one clear line when it is neither."""
    from tunelens.registry_hooks.engine.full_diff import is_full_model_dir

    path = Path(path).expanduser()
    if not path.is_dir():
        raise TunelensError(f"--candidate {path} is not a folder")
    if (path / ADAPTER_CONFIG).is_file():
        reason = not_lora_reason(read_json_object(path / ADAPTER_CONFIG))
        if reason:
            raise TunelensError(f"--candidate {path}: {reason}")
        return ModelRef(path.name, LOCAL_VERSION, path, path)
    if is_full_model_dir(path):
        return ModelRef(path.name, LOCAL_VERSION, path, None, path)
    raise TunelensError(f"--candidate {path} holds neither an {ADAPTER_CONFIG} nor a model "
                        "(config.json and safetensors weights)")


def _is_full_model(entries: dict[str, FileInfo]) -> bool:
    """A plain model folder at the version's root: config.json and safetensors weights, no
    adapter config."""
    return _is_file(entries, "config.json") and not _is_file(entries, ADAPTER_CONFIG) and any(
        name.endswith(".safetensors") and not info.is_dir for name, info in entries.items())


def download_full_model(client, name: str, version: str, dest: Path,
                        max_bytes: int) -> Path | None:
    """The files at the root of a version that is a whole model folder (config.json, safetensors
    weights, tokenizer), downloaded under `dest`; None when it is not one. At most `max_bytes`."""
    source = client.get_model_version_download_uri(name, version)
    repo = get_artifact_repository(source, tracking_uri=client.tracking_uri)
    root = _names(repo)
    if not _is_full_model(root):
        return None
    files = [info for info in root.values() if not info.is_dir]
    listed = sum(info.file_size or 0 for info in files)
    if listed > max_bytes:
        raise AdapterDetectionError(f"{name} version {version}: the model's files are {listed:,} "
                                    f"bytes, over hooks.max_download_bytes ({max_bytes:,}); raise "
                                    "it in conf.yaml to evaluate this full fine-tune")
    dest.mkdir(parents=True, exist_ok=True)
    for info in files:
        repo.download_artifacts(info.path, dst_path=str(dest))
    return dest


def download_version(client, name: str, version: str, max_bytes: int,
                     into: Path | None = None) -> ModelRef:
    """The version's adapter files in a local folder, fetched as the registry hooks fetch them
    (`detect_adapter`: artifact paths checked, at most `max_bytes` = hooks.max_download_bytes,
    only the adapter's files and MLmodel); a version that is a whole model folder (a full
    fine-tune) is fetched whole, within the same limit."""
    ref = VersionRef(name, version)
    try:
        client.get_model_version(name, ref.version)
    except MlflowException:
        raise TunelensError(f"registered model {name!r} version {ref.version} does not exist "
                            f"(tracking server {client.tracking_uri})") from None
    target = Path(into or tempfile.mkdtemp(prefix=f"tunelens-{name}-v{ref.version}-"))
    try:
        detection = detect_adapter(client, name, ref.version, target, max_bytes)
        if detection.is_lora:
            return ModelRef(name, ref.version, detection.model_dir, detection.adapter_dir)
        full_dir = download_full_model(client, name, ref.version, target / "model", max_bytes)
    except MlflowException as exc:
        raise TunelensError(f"cannot download {ref.uri}: {exc.message}") from None
    if full_dir is None:
        raise TunelensError(f"{ref.uri}: {detection.skip_reason}, nor a model folder "
                            "(config.json and safetensors weights at its root); tunelens "
                            "evaluates LoRA adapters and full fine-tunes against their base")
    return ModelRef(name, ref.version, target, None, full_dir)
