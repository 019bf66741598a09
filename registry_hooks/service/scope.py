"""Which registered models tunelens may touch (`hooks.models`, `hooks.models_tag`).

Outside its scope tunelens writes nothing at all: no status tag, no `skipped`, no description
edit. A model is in scope when its name matches one of `hooks.models` (exact names or glob
patterns such as `team-a/*`) or it carries the registered-model tag `hooks.models_tag`
(`key=value`, default `tunelens.enabled=true`), so a team opts a model in from MLflow's UI.
`hooks.models: null` means the command's default: `tunelens server` (its own registry) takes every
model, `tunelens hooks` (usually a shared server) only the tagged ones.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass

from tunelens.config import with_changes
from tunelens.settings import Settings

EVERYTHING = ("*",)
# The hook service's scope handed to the registry-store plugin inside the MLflow server it runs.
SCOPE_ENV = "TUNELENS_HOOKS_SCOPE"


@dataclass(frozen=True)
class Scope:
    patterns: tuple[str, ...]
    tag: tuple[str, str] | None

    @classmethod
    def of(cls, models: list[str] | str | None, models_tag: str | None) -> "Scope":
        """hooks.models (names or glob patterns) and hooks.models_tag (KEY=VALUE) as a scope."""
        patterns = (models,) if isinstance(models, str) else tuple(models or ())
        tag = None
        if models_tag:
            key, _, value = str(models_tag).partition("=")
            tag = (key.strip(), value.strip())
        return cls(tuple(str(p) for p in patterns), tag)

    @classmethod
    def from_config(cls, config: Settings) -> "Scope":
        return cls.of(config.hooks.models, config.hooks.models_tag)

    @classmethod
    def from_json(cls, text: str) -> "Scope":
        handed = json.loads(text)
        return cls.of(handed.get("models"), handed.get("models_tag"))

    def to_json(self) -> str:
        tag = f"{self.tag[0]}={self.tag[1]}" if self.tag else None
        return json.dumps({"models": list(self.patterns), "models_tag": tag})

    @property
    def everything(self) -> bool:
        """True when every model is in scope (no registered-model lookup needed)."""
        return "*" in self.patterns

    def matches_name(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def includes(self, name: str, model_tags: dict[str, str]) -> bool:
        """Whether the registered model `name` (with its tags) is tunelens's to analyse."""
        if self.matches_name(name):
            return True
        return self.tag is not None and model_tags.get(self.tag[0]) == self.tag[1]

    def describe(self) -> str:
        parts = []
        if self.patterns:
            parts.append("models " + ", ".join(self.patterns))
        if self.tag:
            parts.append(f"models tagged {self.tag[0]}={self.tag[1]}")
        return " or ".join(parts) or "no model (set hooks.models or hooks.models_tag)"


def with_default_models(config: Settings, models: tuple[str, ...]) -> Settings:
    """`config` with hooks.models set to `models` when the user left it null."""
    if config.hooks.models is not None:
        return config
    return with_changes(config, {"hooks": {"models": list(models)}})
