"""Guarded aliases where only webhooks reach tunelens (a plain `mlflow server` + `tunelens hooks`).

MLflow writes an alias before it tells anyone, so here tunelens cannot prevent a move: it undoes
it. On `model_version_alias.created` for a guarded alias (promotion.guarded_aliases) of a model in
scope, the guard asks the same rule as `tunelens promote` and the registry store
(`tunelens.registry.gate.judge`), judged against the holder before the write: the version tunelens
last saw legitimately holding the alias (the signed registered-model tag
`tunelens.alias.<alias>.approved`, written by promote, rollback and every move this guard accepts;
a hand-written or copied one counts as none). A refused move is put back on that holder (or the
alias is deleted where there was none, or it had been deleted), recorded
on the version (tag `tunelens.promotion.<alias>.undone` and a line in its description) and logged.
On `model_version_alias.deleted` the deleted holder is recorded like the registry store does, so
it stays the holder to beat. Holder records are numbered: one written back after a newer one (a
saved earlier record replayed to bring an earlier holder back without `tunelens rollback`) is
older than the newest this guard has seen, so the guard keeps to the newest and writes it again. MLflow does not retry a lost delivery: every hooks.poll_interval the
guard also checks the guarded aliases of every model that has a recorded holder. Only the registry store (`tunelens server`) keeps the bad alias from
ever being visible.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tunelens.errors import one_line
from tunelens.registry.description import replace_section
from tunelens.registry.gate import deleted_holder_tag, judge
from tunelens.registry.promotion import (ApprovedHolder, Gatekeeper, alias_move, approved_holder,
                                         approved_tag, promotion_tag, record_approved)

log = logging.getLogger(__name__)

UNDONE_SECTION = "alias-undone"
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


def undone_tag(alias: str) -> str:
    """Version tag: when and why tunelens put `alias` back after it was pointed at the version."""
    return promotion_tag(alias, "undone")


class AliasGuard:
    """Checks guarded alias moves one at a time on a thread of its own; `watch` never blocks."""

    def __init__(self, tracking_uri: str, gate: Gatekeeper, in_scope, sweep_seconds: float):
        self.tracking_uri = tracking_uri
        self.gate = gate
        self.in_scope = in_scope  # (client, name) -> bool: the hook service's scope
        self.sweep_seconds = sweep_seconds
        self._inbox: queue.Queue[tuple[str, str] | None] = queue.Queue()
        # (model, its creation time, alias) -> the newest holder record seen (a model deleted and
        # registered again under its name starts afresh); only this thread uses it
        self._newest: dict[tuple[str, int, str], ApprovedHolder] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="tunelens-alias-guard")

    def watch(self, name: str, alias: str) -> None:
        """An alias of `name` changed (a webhook said so): check it soon."""
        if alias in self.gate.guarded:
            self._inbox.put((name, alias))

    def start(self) -> "AliasGuard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        client = MlflowClient(self.tracking_uri)
        while True:
            try:
                item = self._inbox.get(timeout=self.sweep_seconds)
            except queue.Empty:
                item = "sweep"
            if item is None:
                return
            try:
                for name, alias in self._recorded(client) if item == "sweep" else [item]:
                    if self.in_scope(client, name):
                        self.reconcile(client, name, alias)
            except MlflowException as exc:  # the model is gone, or the server blinked
                log.warning("alias guard: could not check %s: %s", item, one_line(exc))

    def _recorded(self, client: MlflowClient) -> list[tuple[str, str]]:
        """(model, alias) for every guarded alias with a holder recorded by tunelens: the ones
        a lost delivery could have left on a refused version."""
        found, token = [], None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            found += [(model.name, alias) for model in page for alias in sorted(self.gate.guarded)
                      if approved_tag(alias) in model.tags]
            token = page.token
            if not token:
                return found

    def reconcile(self, client: MlflowClient, name: str, alias: str) -> None:
        """Bring `name@alias` in line with the gate: accept the holder it allows, put back one
        it refuses. Reads the registry now, so a late or repeated delivery changes nothing."""
        model = client.get_registered_model(name)
        holder = model.aliases.get(alias)
        approved = self._approved(client, model, alias)
        if holder is None:  # deleted: MLflow's behaviour, but its last holder stays the one to beat
            if approved is not None and approved.present:
                self._record(client, model, alias, approved.version, present=False)
                client.set_registered_model_tag(name, deleted_holder_tag(alias), approved.version)
            return
        holder = str(holder)
        if approved is not None and approved.present and holder == approved.version:
            return
        move = dataclasses.replace(alias_move(client, self.gate, name, holder, alias),
                                   holder=approved.version if approved else None)
        answer = judge(self.gate.key, move)
        if answer.allowed:
            self._record(client, model, alias, holder)
            log.info("alias guard: %s@%s -> v%s accepted (%s)", name, alias, holder, answer.why)
            return
        self._undo(client, name, alias, holder,
                   approved.version if approved is not None and approved.present else None,
                   answer.why)

    def _approved(self, client: MlflowClient, model, alias: str) -> ApprovedHolder | None:
        """The model's holder record, unless it is older than the newest one seen here: then that
        newest one, written back."""
        recorded = approved_holder(self.gate, model, alias)
        newest = self._newest.get(self._key(model, alias))
        if newest is None or (recorded is not None and recorded.serial >= newest.serial):
            if recorded is not None:
                self._newest[self._key(model, alias)] = recorded
            return recorded
        log.warning("alias guard: %s's record of its %s holder was replaced by an older or "
                    "unsigned one; version %s, recorded last, stays the holder", model.name, alias,
                    newest.version)
        self._record(client, model, alias, newest.version, newest.present)
        return newest

    @staticmethod
    def _key(model, alias: str) -> tuple[str, int, str]:
        return model.name, model.creation_timestamp, alias

    def _record(self, client: MlflowClient, model, alias: str, version: str,
                present: bool = True) -> None:
        newest = self._newest.get(self._key(model, alias))
        self._newest[self._key(model, alias)] = record_approved(
            client, self.gate, model.name, alias, version, present,
            after=newest.serial if newest else 0)

    def _undo(self, client: MlflowClient, name: str, alias: str, version: str,
              approved: str | None, why: str) -> None:
        """Put the alias back on `approved` (delete it when None) and say so on `version`."""
        if approved is not None:
            client.set_registered_model_alias(name, alias, approved)
            back = f"put back on version {approved}"
        else:
            client.delete_registered_model_alias(name, alias)
            back = "removed (it was unset before)"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        said = f"{when}: {alias} was pointed at this version and {back} by tunelens: {why}"
        description = client.get_model_version(name, version).description
        client.update_model_version(name, version, description=replace_section(
            description, UNDONE_SECTION, f"### tunelens gate: move undone\n\n- {said}"))
        client.set_model_version_tag(name, version, undone_tag(alias), said)  # last: readers wait
        log.warning("alias guard: %s@%s -> v%s undone, %s: %s", name, alias, version, back, why)
