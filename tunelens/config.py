"""conf.yaml: packaged defaults merged with the user's file, key by key, then checked once."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from .settings import Section, Settings

DEFAULTS_PATH = Path(__file__).with_name("conf.yaml")
ENV_VAR = "TUNELENS_CONFIG"
# libyaml's safe loader when PyYAML was built with it: the same documents, ten times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A settings file that cannot be read or has an unknown key."""


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


def load_config(path: str | os.PathLike | None = None) -> Settings:
    """Defaults from the packaged conf.yaml, overridden by `path` or $TUNELENS_CONFIG if given."""
    user_path = path or os.environ.get(ENV_VAR)
    if not user_path:
        return packaged_settings()
    return with_changes(packaged_settings(), _read(Path(user_path)), user_path)


@functools.lru_cache(maxsize=1)
def packaged_settings() -> Settings:
    """The packaged conf.yaml's settings: the defaults, part of the code (no user file read)."""
    return _validated(_read(DEFAULTS_PATH), None)


def with_changes(config: Settings | None, changes: Mapping[str, Any],
                 where: str = "the settings given") -> Settings:
    """`config` (the packaged defaults when None) with `changes` (a partial conf.yaml mapping,
    e.g. {"verdict": {"alpha": 0.1}}) merged key by key, checked the way load_config checks a
    file."""
    return _validated(_changed(config or packaged_settings(), changes, ""), where)


def _changed(section: Section, changes: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`section`'s values with `changes` in: a sub-section key by key, any other value (a list,
    a free-form mapping such as hooks.base_models) replaced whole."""
    values = section.model_dump()
    for key, value in changes.items():
        if key not in type(section).model_fields:
            raise ConfigError(f"unknown setting '{where}{key}' (see conf.yaml for the valid keys)")
        current = getattr(section, key)
        values[key] = (_changed(current, value, f"{where}{key}.")
                       if isinstance(current, Section) and isinstance(value, Mapping) else value)
    return values


def with_endpoint(config: Settings, url: str | None, api_key_env: str | None) -> Settings:
    """`config` evaluating on the OpenAI-compatible server at `url` (unchanged when None),
    checked as conf.yaml is."""
    if url is None:
        if api_key_env is not None:
            raise ConfigError("an API key variable was given without an endpoint URL")
        return config
    endpoint: dict[str, Any] = {"url": url}
    if api_key_env is not None:
        endpoint["api_key_env"] = api_key_env
    return with_changes(config, {"evaluation": {"endpoint": endpoint}}, "the endpoint given")


def _validated(values: dict[str, Any], where) -> Settings:
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, where)) from None


def _first_error(exc: ValidationError, user_path) -> str:
    """One line: the key's dotted path, what is wrong with it, the value given, and where from."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    where = f" in {user_path}" if user_path else " in the packaged conf.yaml"
    if error["type"] == "extra_forbidden":
        return f"unknown setting '{key}'{where} (see conf.yaml for the valid keys)"
    # a check of tunelens.settings says it in its own words, without pydantic's "Value error, "
    what = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if not key:  # a check across sections (tunelens.settings.Settings): its own words say which
        return f"{what}{where}"
    return f"setting '{key}'{where}: {what[0].lower()}{what[1:]} (got {error['input']!r})"
