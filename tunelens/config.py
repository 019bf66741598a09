"""conf.yaml: packaged defaults merged with the user's file, key by key, then checked once."""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .settings import Settings

DEFAULTS_PATH = Path(__file__).with_name("conf.yaml")
ENV_VAR = "TUNELENS_CONFIG"
# libyaml's safe loader when PyYAML was built with it: the same documents, ten times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A settings file that cannot be read or has an unknown key."""


def _merge(defaults: dict, override: dict, where: str) -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in override.items():
        if key not in defaults:
            raise ConfigError(f"unknown setting '{where}{key}' (see conf.yaml for the valid keys)")
        if isinstance(defaults[key], dict) and defaults[key] and isinstance(value, dict):
            merged[key] = _merge(defaults[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_LOADER) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Defaults from the packaged conf.yaml, overridden by `path` or $TUNELENS_CONFIG if given."""
    config = _read(DEFAULTS_PATH)
    user_path = path or os.environ.get(ENV_VAR)
    if user_path:
        config = _merge(config, _read(Path(user_path)), "")
    try:
        Settings.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, user_path)) from None
    return config


@functools.lru_cache(maxsize=1)
def _packaged() -> dict[str, Any]:
    return _read(DEFAULTS_PATH)


def with_endpoint(config: dict[str, Any], url: str | None, api_key_env: str | None
                  ) -> dict[str, Any]:
    """`config` evaluating on the OpenAI-compatible server at `url` (unchanged when None),
    checked as conf.yaml is."""
    if url is None:
        if api_key_env is not None:
            raise ConfigError("an API key variable was given without an endpoint URL")
        return config
    endpoint = {**config["evaluation"]["endpoint"], "url": url}
    if api_key_env is not None:
        endpoint["api_key_env"] = api_key_env
    updated = {**config, "evaluation": {**config["evaluation"], "endpoint": endpoint}}
    try:
        Settings.model_validate(updated)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, "the endpoint given")) from None
    return updated


def section(config: dict[str, Any] | None, name: str):
    """conf.yaml's section `name` as its type in tunelens.settings: `config`'s values (a
    load_config() result, or a partial mapping such as {"analysis": {"top_neurons": 5}}) over the
    packaged defaults, checked the way load_config checks a file."""
    kind = Settings.model_fields[name].annotation
    given = (config or {}).get(name) or {}
    try:
        return kind.model_validate({**_packaged()[name], **given})
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, "the settings given", prefix=f"{name}.")) from None


def _first_error(exc: ValidationError, user_path, prefix: str = "") -> str:
    """One line: the key's dotted path, what is wrong with it, the value given, and where from."""
    error = exc.errors()[0]
    key = prefix + ".".join(str(part) for part in error["loc"])
    where = f" in {user_path}" if user_path else " in the packaged conf.yaml"
    if error["type"] == "extra_forbidden":
        return f"unknown setting '{key}'{where} (see conf.yaml for the valid keys)"
    return f"setting '{key}'{where}: {error['msg'][0].lower()}{error['msg'][1:]} (got {error['input']!r})"
