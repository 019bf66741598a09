"""Registry-store plugin (`mlflow.model_registry_store` entry points `tunelens+sqlite`,
`tunelens+postgresql`): MLflow's SQL registry store whose new model versions are born queued.

    mlflow server --backend-store-uri sqlite:///mlflow.db \\
                  --registry-store-uri tunelens+sqlite:///mlflow.db

It runs inside MLflow's request, so it only enqueues: the `tunelens.analysis.status=queued` tag is
written in the same insert as the version (nothing can be lost between them). The hook service's
scan picks queued versions up; nothing is computed here. Only models in the hook service's scope
(`hooks.models` / `hooks.models_tag` from $TUNELENS_CONFIG, or the scope `tunelens server` hands
it) are tagged: outside it tunelens writes nothing.
"""
from __future__ import annotations

import importlib.util
import os

from mlflow.entities.model_registry import ModelVersionTag
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from tunelens.config import load_config
from tunelens.registry_hooks.service.scope import SCOPE_ENV, Scope, with_default_models
from tunelens.registry_hooks.service.state import QUEUED, STATUS

PREFIX = "tunelens+"


def inner_uri(store_uri: str) -> str:
    """The SQLAlchemy URI behind a tunelens+ URI (postgresql uses psycopg2 when psycopg is absent)."""
    uri = store_uri[len(PREFIX):] if store_uri.startswith(PREFIX) else store_uri
    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        uri = "postgresql+psycopg2://" + uri[len("postgresql://"):]
    return uri


class EnqueueingRegistryStore(SqlAlchemyStore):
    """SqlAlchemyStore that tags every new model version `queued` for the tunelens worker."""

    def __init__(self, store_uri: str, read_db_uri: str | None = None):
        super().__init__(inner_uri(store_uri), read_db_uri)
        handed = os.environ.get(SCOPE_ENV)  # run by `tunelens server`: its hook service's scope
        self.scope = (Scope.from_json(handed) if handed
                      else Scope.from_config(with_default_models(load_config(), ())))

    def _in_scope(self, name: str) -> bool:
        if self.scope.everything or self.scope.matches_name(name):
            return True
        return self.scope.tag is not None and self.scope.includes(
            name, self.get_registered_model(name).tags)

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None,
                             description=None, local_model_path=None, model_id=None):
        tags = list(tags or [])
        if self._in_scope(name) and not any(tag.key == STATUS for tag in tags):
            tags.append(ModelVersionTag(STATUS, QUEUED))
        return super().create_model_version(name, source, run_id=run_id, tags=tags,
                                            run_link=run_link, description=description,
                                            local_model_path=local_model_path, model_id=model_id)


def build_store(store_uri: str, tracking_uri: str | None = None, **_) -> EnqueueingRegistryStore:
    """The entry point MLflow calls for a tunelens+<sql> registry store URI."""
    return EnqueueingRegistryStore(store_uri)
