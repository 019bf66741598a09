"""Where the models come from: registry versions and aliases resolved to local adapter folders."""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from safetensors import safe_open

from tunelens.errors import TunelensError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-.]+))$")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, downloaded: its MLflow model folder and its adapter folder."""

    name: str
    version: str
    model_dir: Path
    adapter_dir: Path


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    match = MODEL_URI.match(model_uri.strip())
    if not match:
        raise TunelensError(f"{model_uri!r} is not a registered model URI: use models:/NAME/VERSION "
                            "or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


def resolve_version(client, name: str, reference: str) -> str:
    """A version number from "3", "v3" or an alias name of model `name`."""
    if re.fullmatch(r"v?\d+", reference):
        version = reference.lstrip("v")
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise TunelensError(f"model {name!r} has no version {version}") from None
        return version
    try:
        return client.get_model_version_by_alias(name, reference).version
    except MlflowException:
        raise TunelensError(f"model {name!r} has no version or alias {reference!r}") from None


def download_version(client, name: str, version: str, max_bytes: int,
                     into: Path | None = None) -> ModelRef:
    """The version's adapter files in a local folder, fetched as the registry hooks fetch them
    (service.detection: artifact paths checked, at most `max_bytes` = hooks.max_download_bytes,
    only the adapter's files and MLmodel)."""
    from tunelens.registry_hooks.service.detection import detect_adapter

    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise TunelensError(f"registered model {name!r} version {version} does not exist "
                            f"(tracking server {client.tracking_uri})") from None
    target = Path(into or tempfile.mkdtemp(prefix=f"tunelens-{name}-v{version}-"))
    try:
        detection = detect_adapter(client, name, version, target, max_bytes)
    except MlflowException as exc:
        raise TunelensError(f"cannot download models:/{name}/{version}: {exc.message}") from None
    if not detection.is_lora:
        raise TunelensError(f"models:/{name}/{version}: {detection.skip_reason}; tunelens "
                            "evaluates LoRA adapters against their base")
    return ModelRef(name, version, detection.model_dir, detection.adapter_dir)


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_adapter_fits(base_dir: Path, adapter_dir: Path) -> None:
    """Every LoRA pair of the adapter must sit on a base weight of matching shape, else raise."""
    base_files = sorted(Path(base_dir).glob("*.safetensors"))
    adapter_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not base_files or not adapter_file.is_file():
        return  # .bin checkpoints are not opened here (never unpickled); the backend checks them
    base = _tensor_shapes(base_files)
    base_keys = {key.removesuffix(".weight"): shape for key, shape in base.items()}
    for key, shape in _tensor_shapes([adapter_file]).items():
        part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
        if part is None:
            continue
        module = re.sub(r"^base_model\.model\.", "", key.split(part)[0])
        base_shape = base_keys.get(module) or base_keys.get(module.removeprefix("model."))
        if base_shape is None:
            raise TunelensError(f"adapter {adapter_dir} does not fit base {base_dir}: the base "
                                f"has no module {module}; pass the base it was trained on (--base)")
        # lora_A is (r, in), lora_B (out, r); GPT-2's Conv1D stores its weight as (in, out).
        size = shape[1] if part == ".lora_A." else shape[0]
        if size not in base_shape:
            raise TunelensError(f"adapter {adapter_dir} does not fit base {base_dir}: {module} "
                                f"is {size} wide in the adapter but the base weight is "
                                f"{'x'.join(map(str, base_shape))}; pass the base it was trained on")
