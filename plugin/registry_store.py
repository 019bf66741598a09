"""Registry-store plugin (`mlflow.model_registry_store` entry points `tunelens+sqlite`,
`tunelens+postgresql`): MLflow's SQL registry store whose new model versions are born queued, and
which holds the guarded aliases.

    mlflow server --backend-store-uri sqlite:///mlflow.db \\
                  --registry-store-uri tunelens+sqlite:///mlflow.db

It runs inside MLflow's request, so it only enqueues: the `tunelens.analysis.status=queued` tag is
written in the same insert as the version (nothing can be lost between them). The hook service's
scan picks queued versions up; nothing is computed here. Only models in the hook service's scope
(`hooks.models` / `hooks.models_tag` from $TUNELENS_CONFIG, or the scope `tunelens server` hands
it) are tagged: outside it tunelens writes nothing.

Every write of a guarded alias (promotion.guarded_aliases) of a model in scope, from the MLflow UI,
any client or the REST API, is judged by `tunelens.registry.gate` before it happens and refused with the reason
otherwise; so is a write of tunelens's verdict or break-glass tags that its verdict key does not
verify. Deleting an alias is MLflow's own behaviour, but the version it pointed at is recorded and
stays the holder to beat.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import inspect
import logging
import os
import threading
from pathlib import Path

from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from sqlalchemy import text

# MLflow loads this plugin in every process that makes a registry client. MLflow before 3.10 sets
# alembic's log level to INFO, and importing the SQL store below then prints alembic's plugin
# set-up lines on the stderr of every client command: keep alembic at WARNING, as 3.10 does.
logging.getLogger("alembic").setLevel(logging.WARNING)
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore  # noqa: E402

from tunelens.config import load_config
from tunelens.registry.gate import AliasOverride, deleted_holder_tag, judge
from tunelens.registry.promotion import Gatekeeper, alias_move
from tunelens.registry.signing import digest
from tunelens.registry.verdicts import (REASONS_TAG, STATEMENT_TAG, VOUCHED, VerdictStatement,
                                        statement_problem)
from tunelens.registry.version import VersionRef
from tunelens.registry_hooks.service.scope import SCOPE_ENV, Scope, with_default_models
from tunelens.registry_hooks.service.state import QUEUED, STATUS

PREFIX = "tunelens+"
_OVERRIDE_PREFIX, _OVERRIDE_SUFFIX = "tunelens.promotion.", ".override"


def inner_uri(store_uri: str) -> str:
    """The SQLAlchemy URI behind a tunelens+ URI (postgresql uses psycopg2 when psycopg is absent)."""
    uri = store_uri[len(PREFIX):] if store_uri.startswith(PREFIX) else store_uri
    if uri.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        uri = "postgresql+psycopg2://" + uri[len("postgresql://"):]
    return uri


class EnqueueingRegistryStore(SqlAlchemyStore):
    """SqlAlchemyStore that tags every new model version `queued` for the tunelens worker and
    lets a guarded alias move only as tunelens.registry.gate allows."""

    def __init__(self, store_uri: str):
        super().__init__(inner_uri(store_uri))  # the one argument every 3.x takes
        config = load_config()
        handed = os.environ.get(SCOPE_ENV)  # run by `tunelens server`: its hook service's scope
        self.scope = (Scope.from_json(handed) if handed
                      else Scope.from_config(with_default_models(config, ())))
        self.gate = Gatekeeper.from_config(config)
        self._local_lock = threading.Lock()

    def _in_scope(self, name: str) -> bool:
        if self.scope.everything or self.scope.matches_name(name):
            return True
        return self.scope.tag is not None and self.scope.includes(
            name, self.get_registered_model(name).tags)

    # The signature of MLflow 3.3 to 3.18; arguments a later 3.x adds pass through unread.
    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None,
                             description=None, local_model_path=None, model_id=None, **later):
        tags = list(tags or [])
        if self._in_scope(name) and not any(tag.key == STATUS for tag in tags):
            tags.append(ModelVersionTag(STATUS, QUEUED))
        return super().create_model_version(name, source, run_id=run_id, tags=tags,
                                            run_link=run_link, description=description,
                                            local_model_path=local_model_path, model_id=model_id,
                                            **later)

    def set_registered_model_alias(self, name, alias, version):
        if alias not in self.gate.guarded or not self._in_scope(name):
            return super().set_registered_model_alias(name, alias, version)
        with self._one_move_at_a_time(name):
            # The store answers get_registered_model / get_model_version as a client does.
            answer = judge(self.gate.key, alias_move(self, self.gate, name, str(version), alias))
            if not answer.allowed:
                raise MlflowException(answer.refusal, PERMISSION_DENIED)
            return super().set_registered_model_alias(name, alias, version)

    def delete_registered_model_alias(self, name, alias):
        if alias in self.gate.guarded and self._in_scope(name):
            with self._one_move_at_a_time(name):
                holder = self.get_registered_model(name).aliases.get(alias)
                if holder is not None:
                    super().set_registered_model_tag(
                        name, RegisteredModelTag(deleted_holder_tag(alias), str(holder)))
                return super().delete_registered_model_alias(name, alias)
        return super().delete_registered_model_alias(name, alias)

    def set_registered_model_tag(self, name, tag):
        self._refuse_holder_record(tag.key)
        return super().set_registered_model_tag(name, tag)

    def delete_registered_model_tag(self, name, key):
        self._refuse_holder_record(key)
        return super().delete_registered_model_tag(name, key)

    @staticmethod
    def _refuse_holder_record(key: str) -> None:
        """The deleted alias's holder is the store's own record: written or removed from outside,
        it would choose the version a guarded alias may return to."""
        if key.startswith("tunelens.alias.") and key.endswith(".deleted"):
            raise MlflowException(f"{key} is written by tunelens's registry store only, when the "
                                  "alias is deleted", PERMISSION_DENIED)

    def set_model_version_tag(self, name, version, tag):
        problem = self._tag_problem(VersionRef(name, version), tag.key, tag.value)
        if problem is not None:
            raise MlflowException(f"{tag.key} on {VersionRef(name, version).uri} refused: "
                                  f"{problem}", PERMISSION_DENIED)
        return super().set_model_version_tag(name, version, tag)

    def _tag_problem(self, ref: VersionRef, key: str, value: str) -> str | None:
        """Why writing tunelens's tag `key` = `value` on `ref` is not tunelens's own statement."""
        if key == STATEMENT_TAG:
            return statement_problem(self.gate.key, ref, VerdictStatement.from_tag(value))
        if key.startswith(_OVERRIDE_PREFIX) and key.endswith(_OVERRIDE_SUFFIX):
            record = AliasOverride.from_tag(value)
            if record is None or not record.signed_by(self.gate.key) or (
                    record.name, record.version) != (ref.name, ref.version):
                return "break-glass record not written by tunelens (`tunelens promote --force`)"
            return None
        if key not in VOUCHED and key != REASONS_TAG:
            return None
        statement = VerdictStatement.from_tag(
            self.get_model_version(ref.name, ref.version).tags.get(STATEMENT_TAG, ""))
        if statement is None or statement_problem(self.gate.key, ref, statement) is not None:
            return "verdict tag not written by tunelens: no signed verdict stands behind it"
        said = digest(value) if key == REASONS_TAG else value
        if said != (statement.reasons if key == REASONS_TAG else getattr(statement, VOUCHED[key])):
            return "verdict tag not written by tunelens: it disagrees with the signed verdict"
        return None

    @contextlib.contextmanager
    def _one_move_at_a_time(self, name: str):
        """Serialise the judge-then-write of one model's guarded aliases across threads and server
        processes: a PostgreSQL advisory lock (held by a session of its own, so MLflow's write in
        its own session is not blocked by it), MySQL's GET_LOCK, or a lock file beside SQLite."""
        with self._local_lock, self._database_lock(name):
            yield

    @contextlib.contextmanager
    def _database_lock(self, name: str):
        if self.db_type == "sqlite":
            database = Path(self.db_uri.split(":///", 1)[-1]) if ":///" in self.db_uri else None
            if database is None:
                yield
                return
            with open(f"{database}.tunelens-alias.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
            return
        key = f"tunelens-alias:{name}"
        with self._write_session() as session:
            if self.db_type == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
                yield
            elif self.db_type == "mysql":
                session.execute(text("SELECT GET_LOCK(:key, 60)"), {"key": key})
                try:
                    yield
                finally:
                    session.execute(text("SELECT RELEASE_LOCK(:key)"), {"key": key})
            else:
                yield

    def _write_session(self):
        """A session on the primary database (MLflow releases that take `read_only` default it
        to True)."""
        if "read_only" in inspect.signature(self.ManagedSessionMaker).parameters:
            return self.ManagedSessionMaker(read_only=False)
        return self.ManagedSessionMaker()


def build_store(store_uri: str, tracking_uri: str | None = None, **_) -> EnqueueingRegistryStore:
    """The entry point MLflow calls for a tunelens+<sql> registry store URI."""
    return EnqueueingRegistryStore(store_uri)
