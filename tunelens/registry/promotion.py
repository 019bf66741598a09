"""Move a registry alias through the gate: promote, auto-promote, rollback, and what the version
page says about it.

Every move asks `gate.judge` first. The alias's earlier holders are kept, oldest first, in the
registered-model tag `tunelens.alias.<alias>.previous` (e.g. "3,5"); `rollback` moves the alias back
to the last of them and drops it from the list, so repeated rollbacks walk back through the
promotions. With no earlier holder recorded, rollback refuses and changes nothing: it never
deletes an alias. `--force --reason` and rollback are the break-glass paths: each writes a signed
record on the version (which the registry store inside the MLflow server lets through, and nothing
else) and an audit run: who, when, the previous holder, the verdict overridden and the reason.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from tunelens.artifact_uris import fetch_dataset
from tunelens.config import packaged_settings
from tunelens.errors import TunelensError
from tunelens.registry.datasets import content_digest, load_dataset
from tunelens.registry.description import replace_section
from tunelens.registry.experiments import experiment_id
from tunelens.registry.gate import (EVAL_DATASET_TAG, AliasMove, AliasOverride, GateAnswer,
                                    deleted_holder_tag, judge, override_tag)
from tunelens.registry.signing import sign, verdict_key, verify
from tunelens.registry.verdicts import STATEMENT_TAG, VERDICT_TAG
from tunelens.registry.version import VersionRef
from tunelens.settings import Settings

log = logging.getLogger(__name__)
PROMOTABILITY_SECTION = "promotion"


class PromotionRefused(TunelensError):
    """The gate (or the recorded history) does not allow the move; nothing was changed."""

    exit_code = 1


def history_tag(alias: str) -> str:
    return f"tunelens.alias.{alias}.previous"


def approved_tag(alias: str) -> str:
    """Registered-model tag: the version tunelens last saw legitimately holding `alias` (signed),
    the holder to put it back on when a webhook reports a move the gate refuses."""
    return f"tunelens.alias.{alias}.approved"


def promotion_tag(alias: str, field: str) -> str:
    """Version tags describing the promotion to `alias`: replaced, forced, reason, by."""
    return f"tunelens.promotion.{alias}.{field}"


@dataclass(frozen=True)
class Gatekeeper:
    """What every door needs to judge a move: the verdict key, the guarded aliases, how to read
    the test set a registered model names, and where break-glass moves are audited."""

    key: bytes
    alias: str  # promotion.alias, the default alias to move
    guarded: frozenset[str]
    auto_promote: bool
    inputs_column: str
    targets_column: str
    audit_experiment: str

    @classmethod
    def from_config(cls, config: Settings | None) -> "Gatekeeper":
        config = config or packaged_settings()
        promotion, evaluation = config.promotion, config.evaluation
        return cls(verdict_key(promotion.verdict_key_file), promotion.alias, promotion.guarded,
                   promotion.auto_promote, evaluation.inputs_column, evaluation.targets_column,
                   promotion.audit_experiment)

    def named_test_set(self, model_tags,
                       tracking_uri: str | None = None) -> tuple[str | None, str | None]:
        """(digest, None) of the test set the registered model names (a path or an MLflow
        artifact URI), (None, why) when it cannot be read, (None, None) when it names none."""
        named = model_tags.get(EVAL_DATASET_TAG)
        if not named:
            return None, None
        try:
            with tempfile.TemporaryDirectory(prefix="tunelens-test-set-") as into:
                dataset = load_dataset(Path(fetch_dataset(named, Path(into), tracking_uri))
                                       .expanduser(), inputs_column=self.inputs_column,
                                       targets_column=self.targets_column)
        except TunelensError as exc:
            return None, (f"the test set the registered model names ({EVAL_DATASET_TAG} = "
                          f"{named}) cannot be read here to check the verdict against it: {exc}")
        return content_digest(dataset), None


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _registered_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            where = getattr(client, "tracking_uri", "this registry")
            raise TunelensError(f"registered model {name!r} not found at {where}: check the name "
                                "and --tracking-uri") from None
        raise


def _model_version(client, name: str, version: str):
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if _missing(exc):
            raise TunelensError(f"{name} has no version {version}: check the version number "
                                f"(`tunelens promote NAME VERSION`)") from None
        raise


def _version_exists(client, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
        return True
    except MlflowException as exc:
        if _missing(exc):
            return False
        raise


@dataclass(frozen=True)
class ApprovedHolder:
    """The version tunelens last saw legitimately holding an alias."""

    version: str
    present: bool  # False: the alias was deleted since (the version is still the holder to beat)
    # One more than the record it replaced: a signed record written back after a newer one (a
    # replay of an earlier holder) carries a lower number than the one the alias guard last saw.
    serial: int

    def signed_fields(self, name: str, alias: str) -> dict:
        return {"name": name, "alias": alias, "version": self.version, "present": self.present,
                "serial": self.serial}


def record_approved(client, gate: "Gatekeeper", name: str, alias: str, version: str,
                    present: bool = True, after: int = 0) -> ApprovedHolder:
    """Sign and keep `version` as the legitimate holder of `name@alias`, numbered past both the
    record it replaces and `after` (the newest one the caller has seen)."""
    previous = approved_holder(gate, client.get_registered_model(name), alias)
    record = ApprovedHolder(version, present, max(previous.serial if previous else 0, after) + 1)
    client.set_registered_model_tag(name, approved_tag(alias), json.dumps(
        {"version": version, "present": present, "serial": record.serial,
         "signature": sign(gate.key, record.signed_fields(name, alias))}))
    return record


def approved_holder(gate: "Gatekeeper", model, alias: str) -> ApprovedHolder | None:
    """The holder recorded by `record_approved` for `model`'s `alias`; None when none is, or the
    record was not signed by tunelens for this model and alias (hand-written or copied)."""
    try:
        record = json.loads(model.tags.get(approved_tag(alias)) or "")
        holder = ApprovedHolder(str(record["version"]), bool(record["present"]),
                                int(record["serial"]))
        signature = str(record["signature"])
    except (ValueError, TypeError, KeyError):
        return None
    return holder if verify(gate.key, holder.signed_fields(model.name, alias), signature) else None


def holder_to_beat(client, model, alias: str) -> str | None:
    """The version holding `alias`, or, while it is deleted, the version it pointed at before
    (recorded by the registry store): a deleted alias does not lower the bar."""
    holder = model.aliases.get(alias)
    if holder is not None:
        return str(holder)
    deleted = model.tags.get(deleted_holder_tag(alias))
    return deleted if deleted and _version_exists(client, model.name, deleted) else None


def alias_move(client, gate: Gatekeeper, name: str, version: str, alias: str) -> AliasMove:
    """The registry's state for moving `name@alias` to `version`, as `judge` reads it."""
    model = _registered_model(client, name)
    tags = _model_version(client, name, version).tags
    test_set, problem = gate.named_test_set(model.tags, getattr(client, "tracking_uri", None))
    return AliasMove(VersionRef(name, version), alias, holder_to_beat(client, model, alias), tags,
                     test_set, problem)


def who() -> str:
    """The user as MLflow records it on runs."""
    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment
        return "unknown"


@dataclass(frozen=True)
class PromotionResult:
    name: str
    alias: str
    version: str
    previous: str | None  # the version that held the alias before, None if nobody did
    changed: bool  # False when the version already held the alias
    forced: bool
    verdict: str | None

    def describe(self) -> str:
        if not self.changed:
            return f"{self.name}@{self.alias} is already version {self.version}: nothing changed"
        was = f"was version {self.previous}" if self.previous else "new alias"
        forced = f", forced over verdict {self.verdict or 'none'}" if self.forced else ""
        return f"{self.name}@{self.alias} -> version {self.version} ({was}{forced})"


@dataclass(frozen=True)
class RollbackResult:
    name: str
    alias: str
    restored: str
    replaced: str | None
    skipped: list[str]  # recorded holders passed over: deleted versions or the current holder

    def describe(self) -> str:
        was = f"was version {self.replaced}" if self.replaced else "alias was unset"
        skipped = f"; skipped {', '.join(self.skipped)}" if self.skipped else ""
        return f"{self.name}@{self.alias} rolled back to version {self.restored} ({was}{skipped})"


def _history(model, alias: str) -> list[str]:
    value = model.tags.get(history_tag(alias), "")
    return [v for v in value.split(",") if v.strip()]


def _write_history(client, name: str, alias: str, history: list[str]) -> None:
    if history:
        client.set_registered_model_tag(name, history_tag(alias), ",".join(history))
    else:
        client.delete_registered_model_tag(name, history_tag(alias))


def _move(client, name: str, alias: str, version: str, previous: str | None,
          history: list[str]) -> None:
    """Point the alias, recording `history` first: a failure in between must not lose the way
    back."""
    if previous is not None:
        _write_history(client, name, alias, history + [previous])
    try:
        client.set_registered_model_alias(name, alias, version)
    except Exception:
        if previous is not None:
            _write_history(client, name, alias, history)
        raise


def promote(client, gate: Gatekeeper, name: str, version, alias: str | None = None, *,
            force: bool = False, reason: str | None = None) -> PromotionResult:
    """Point `name@alias` at `version` when the gate allows it (or force + reason, audited)."""
    version, alias = str(version), alias or gate.alias
    reason = (reason or "").strip() or None
    if force and not reason:
        raise TunelensError("--force needs --reason TEXT: say why the verdict is overridden (the "
                            "reason is recorded on the version)")
    model = _registered_model(client, name)
    verdict = _model_version(client, name, version).tags.get(VERDICT_TAG)
    previous = holder_to_beat(client, model, alias)
    if model.aliases.get(alias) is not None and str(model.aliases[alias]) == version:
        return PromotionResult(name, alias, version, previous, False, force, verdict)
    if force:
        record = AliasOverride.make(gate.key, "force", VersionRef(name, version), alias, previous,
                                    reason, who())
        client.set_model_version_tag(name, version, override_tag(alias), record.tag_value())
    answer = judge(gate.key, alias_move(client, gate, name, version, alias))
    if not answer.allowed:
        raise PromotionRefused(f"{answer.refusal}. {name}@{alias} is unchanged")
    _move(client, name, alias, version, previous, _history(model, alias))
    record_approved(client, gate, name, alias, version)
    _record_promotion(client, gate, name, version, alias, previous, answer)
    refresh_promotability(client, gate, name)
    return PromotionResult(name, alias, version, previous, True, force, verdict)


def _record_promotion(client, gate: Gatekeeper, name: str, version: str, alias: str,
                      previous: str | None, answer: GateAnswer) -> None:
    """The move on the version (replaced, forced, reason, by) and, for a break-glass move, in an
    audit run."""
    forced = answer.override is not None
    client.set_model_version_tag(name, version, promotion_tag(alias, "replaced"), previous or "none")
    client.set_model_version_tag(name, version, promotion_tag(alias, "forced"), str(forced).lower())
    client.set_model_version_tag(name, version, promotion_tag(alias, "by"), who())
    tags = client.get_model_version(name, version).tags
    if forced:
        client.set_model_version_tag(name, version, promotion_tag(alias, "reason"),
                                     answer.override.reason)
        _audit(client, gate, answer.override, answer.verdict.decision or tags.get(VERDICT_TAG))
    elif promotion_tag(alias, "reason") in tags:  # a stale reason of an older force
        client.delete_model_version_tag(name, version, promotion_tag(alias, "reason"))


def _audit(client, gate: Gatekeeper, record: AliasOverride, overridden) -> str:
    """One finished run in the audit experiment recording a break-glass move."""
    ref = VersionRef(record.name, record.version)
    run = client.create_run(experiment_id(client, gate.audit_experiment),
                            run_name=f"{record.kind} {ref.name}@{record.alias} -> v{ref.version}",
                            tags={"tunelens.model": ref.uri, "tunelens.audit.kind": record.kind,
                                  "tunelens.audit.alias": record.alias,
                                  "tunelens.audit.user": record.user,
                                  "tunelens.audit.previous": record.replaces or "none",
                                  "tunelens.audit.verdict_overridden": str(overridden or "none"),
                                  "tunelens.audit.reason": record.reason})
    client.log_dict(run.info.run_id, {**record.fields(), "verdict_overridden":
                                      str(overridden or "none")}, "audit.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def auto_promote(client, gate: Gatekeeper, name: str, version) -> PromotionResult | None:
    """The hook worker's step after an evaluation: promote through the gate when
    promotion.auto_promote is on; None (nothing changed) otherwise, with a refusal logged."""
    if not gate.auto_promote:
        return None
    if client.get_model_version(name, str(version)).tags.get(STATEMENT_TAG) is None:
        return None
    try:
        return promote(client, gate, name, version, gate.alias)
    except PromotionRefused as refused:  # not PROMOTE, or the holder moved during the evaluation
        log.warning("auto-promote of %s v%s refused: %s", name, version, refused)
        return None


def rollback(client, gate: Gatekeeper, name: str, alias: str | None = None) -> RollbackResult:
    """Point `name@alias` back at its last recorded earlier holder; refuse if there is none."""
    alias = alias or gate.alias
    model = _registered_model(client, name)
    current = model.aliases.get(alias)
    current = None if current is None else str(current)
    history = _history(model, alias)
    skipped = []
    while history:
        candidate = history.pop()
        if candidate != current and _version_exists(client, name, candidate):
            break
        skipped.append(candidate)
    else:
        holder = f"it stays on version {current}" if current else "it is unset"
        detail = f" (recorded holders {', '.join(skipped)} are deleted or current)" if skipped else ""
        raise PromotionRefused(f"{name}@{alias} has no earlier holder recorded by `tunelens "
                               f"promote`{detail}: nothing to roll back to, {holder}")
    record = AliasOverride.make(gate.key, "rollback", VersionRef(name, candidate), alias, current,
                                f"rollback from version {current or 'none'}", who())
    client.set_model_version_tag(name, candidate, override_tag(alias), record.tag_value())
    client.set_registered_model_alias(name, alias, candidate)
    record_approved(client, gate, name, alias, candidate)
    _write_history(client, name, alias, history)
    verdict = client.get_model_version(name, candidate).tags.get(VERDICT_TAG)
    _audit(client, gate, record, verdict)
    refresh_promotability(client, gate, name)
    return RollbackResult(name, alias, candidate, current, skipped)


def promotability_lines(gate: Gatekeeper, client, model, version, test_set) -> list[str]:
    """"may be promoted to <alias>: yes / no — because …" for each guarded alias of `version` (a
    ModelVersion of registered model `model`); `test_set`: gate.named_test_set's answer."""
    lines = ["### tunelens gate", ""]
    for alias in sorted(gate.guarded):
        holder = model.aliases.get(alias)
        if holder is not None and str(holder) == str(version.version):
            lines.append(f"- **{alias}**: this version holds it")
            continue
        answer = judge(gate.key, AliasMove(VersionRef(model.name, version.version), alias,
                                           holder_to_beat(client, model, alias), version.tags,
                                           *test_set))
        lines.append(f"- may be promoted to **{alias}**: {'yes' if answer.allowed else 'no'} — "
                     f"because {answer.why}")
    return lines


def refresh_promotability(client, gate: Gatekeeper, name: str) -> None:
    """Rewrite the gate section on every evaluated version of `name`: the holder it is judged
    against may have changed. The model and its named test set are read once for all of them."""
    model = _registered_model(client, name)
    test_set = gate.named_test_set(model.tags, getattr(client, "tracking_uri", None))
    for found in client.search_model_versions(f"name = '{_quoted(name)}'"):
        if VERDICT_TAG not in found.tags and STATEMENT_TAG not in found.tags:
            continue
        section_text = "\n".join(promotability_lines(gate, client, model, found, test_set))
        description = replace_section(found.description, PROMOTABILITY_SECTION, section_text)
        if description != (found.description or ""):
            client.update_model_version(name, found.version, description=description)


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")
