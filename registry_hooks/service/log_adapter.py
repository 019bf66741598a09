"""`tunelens.log_adapter`: log a PEFT LoRA adapter as a proper MLflow transformers model, registered.

mlflow.transformers stores only the adapter (peft/ folder) when it is given the local base via
`base_model_path`; without it a local base is saved broken (LoRA-injected keys, mlflow #23761).
So a local base directory is required: the argument, or the adapter's base_model_name_or_path
when that is a local directory.

The model is saved by mlflow.transformers, through this module as the flavor MLflow's Model.log
calls (`save_model`): its python_function flavor is then the version handle
(tunelens.registry.version_handle), so `mlflow.models.evaluate(model="models:/NAME/V",
evaluators=["tunelens"])` loads nothing heavy; `mlflow.transformers.load_model` loads it as before.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.registry.version_handle import LOADER_MODULE

# log_model would otherwise infer (and pin torchvision when torch is present). mlflow-tunelens
# holds the pyfunc flavor's loader, for environments MLflow restores from these requirements.
PIP_REQUIREMENTS = ["mlflow", "mlflow-tunelens", "torch", "transformers", "peft", "safetensors"]


@dataclass
class LoggedAdapter:
    model_uri: str
    run_id: str | None
    registered_model_name: str | None
    version: int | None


def _base_dir(adapter_dir: Path, base: str | Path | None) -> Path:
    if base is not None:
        path = Path(base).expanduser()
        if not (path / "config.json").is_file():
            raise TunelensError(f"base model {path} is not a local transformers model directory "
                                f"(no config.json); pass the directory the adapter was trained on")
        return path
    from tunelens.registry_hooks.engine.loading import read_json_object

    recorded = read_json_object(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if recorded and (Path(recorded).expanduser() / "config.json").is_file():
        return Path(recorded).expanduser()
    raise TunelensError(f"the adapter names base model {recorded!r}, which is not a local "
                        f"directory; pass base=<local base model dir> (--base)")


def _require_adapter_only_logging(mlflow) -> None:
    """mlflow.transformers.log_model stores a PEFT adapter alone on a local base only where it
    takes base_model_path (MLflow 3.12 and newer); older releases would save the base too."""
    if "base_model_path" not in inspect.signature(mlflow.transformers.log_model).parameters:
        raise TunelensError(
            f"logging an adapter alone needs MLflow 3.12 or newer (this is {mlflow.__version__}): "
            "register the adapter folder with MlflowClient.create_model_version(name, "
            "source=<its artifact URI>) instead; the hooks analyse it all the same")


def log_adapter(adapter_dir: str | Path, base: str | Path | None = None, *,
                registered_model_name: str | None = None, name: str = "model",
                task: str = "text-generation", tracking_uri: str | None = None) -> LoggedAdapter:
    """Log `adapter_dir` on `base` with mlflow.transformers (adapter only) and register it."""
    import mlflow
    from mlflow.models import Model

    _require_adapter_only_logging(mlflow)
    from tunelens.registry_hooks.engine.loading import find_adapter_dir

    found = find_adapter_dir(Path(adapter_dir).expanduser())
    if found is None:
        raise TunelensError(f"{adapter_dir} holds no adapter_config.json (directly or in peft/); "
                            f"pass a PEFT adapter directory saved with save_pretrained")
    adapter = Path(found)
    base_dir = _base_dir(adapter, base)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_name=f"log adapter {adapter.name}") as run:
        info = Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__],
                         flavor_name="transformers",
                         transformers_model={"model": model, "tokenizer": tokenizer}, task=task,
                         base_model_path=str(base_dir),
                         registered_model_name=registered_model_name,
                         pip_requirements=PIP_REQUIREMENTS)
    return LoggedAdapter(info.model_uri, run.info.run_id, registered_model_name,
                         info.registered_model_version)


def save_model(path: str, mlflow_model, **transformers_arguments) -> None:
    """mlflow.transformers.save_model, then the python_function flavor replaced by the version
    handle's loader (MLflow's Model.log calls this: this module is the flavor it is given)."""
    import mlflow
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.utils.environment import _CONDA_ENV_FILE_NAME, _PYTHON_ENV_FILE_NAME

    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, **transformers_arguments)
    pyfunc.add_to_model(mlflow_model, loader_module=LOADER_MODULE,
                        conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME)
    mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))
