"""A registered model version, named once: `VersionRef` and the URIs users type for it."""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from tunelens.errors import TunelensError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-.]+))$")


@dataclass(frozen=True)
class VersionRef:
    """Registered model `name`, version `version` (a number as a string)."""

    name: str
    version: str

    def __post_init__(self):
        object.__setattr__(self, "version", str(self.version))

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return self.uri


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    match = MODEL_URI.match(model_uri.strip())
    if not match:
        raise TunelensError(f"{model_uri!r} is not a registered model URI: use models:/NAME/VERSION "
                            "or models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


def resolve_version(client, name: str, reference: str) -> str:
    """The version number of model `name` that "3", "v3" or an alias name refers to."""
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


_LOGGED_MODEL_SOURCE = re.compile(r"models:/(m-[0-9a-f]+)")


def logged_model_id(version) -> str | None:
    """The LoggedModel a version was registered from (MLflow 3): its model_id, which the REST API
    leaves empty, else its `models:/<model_id>` source; None for a plain artifact URI."""
    found = _LOGGED_MODEL_SOURCE.fullmatch(version.source or "")
    return getattr(version, "model_id", None) or (found.group(1) if found else None)
