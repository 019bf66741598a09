"""Move a registry alias to a version only on a PROMOTE verdict that covered the alias's holder.

A PROMOTE verdict says the version beat its base and held its own against the version that held
the promotion alias when it was evaluated (tag `tunelens.verdict.holder`, "<alias>=<version>" or
"<alias>=none"). If the alias has moved since, or the verdict compared against nobody and a
version holds the alias now, the verdict does not speak to the current holder: promote refuses
and says to re-evaluate.

The alias's earlier holders are kept, oldest first, in the registered-model tag
`tunelens.alias.<alias>.previous` (e.g. "3,5"); `rollback` moves the alias back to the last of
them and drops it from the list, so repeated rollbacks walk back through the promotions. With no
earlier holder recorded, rollback refuses and changes nothing: the alias is never deleted by tunelens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from tunelens.errors import TunelensError
from tunelens.evaluators.verdict import (HOLDER_TAG, REASONS_TAG, VERDICT_TAG, Decision,
                                         HolderCoverage)

log = logging.getLogger(__name__)

# Shown in the refusal so the user sees why without opening the UI; the full text is in the tag.
_REASONS_SHOWN = 400


class PromotionRefused(TunelensError):
    """The verdict (or the recorded history) does not allow the move; nothing was changed."""

    exit_code = 1


def history_tag(alias: str) -> str:
    return f"tunelens.alias.{alias}.previous"


def promotion_tag(alias: str, field: str) -> str:
    """Version tags describing the promotion to `alias`: replaced, forced, reason."""
    return f"tunelens.promotion.{alias}.{field}"


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


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _registered_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            raise TunelensError(f"registered model {name!r} not found at {client.tracking_uri}: "
                                f"check the name and --tracking-uri") from None
        raise


def _version_exists(client, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
        return True
    except MlflowException as exc:
        if _missing(exc):
            return False
        raise


def _history(model, alias: str) -> list[str]:
    value = model.tags.get(history_tag(alias), "")
    return [v for v in value.split(",") if v.strip()]


def _write_history(client, name: str, alias: str, history: list[str]) -> None:
    if history:
        client.set_registered_model_tag(name, history_tag(alias), ",".join(history))
    else:
        client.delete_registered_model_tag(name, history_tag(alias))


def _check_holder_covered(name: str, version: str, alias: str, holder: str | None,
                          covered: HolderCoverage | None) -> None:
    """Refuse when the verdict did not compare against the version holding `alias` now."""
    if holder is None:
        return  # nobody to beat: a verdict against the base alone suffices
    if covered is not None and covered.alias == alias and covered.version == holder:
        return
    then = ("no holder recorded" if covered is None else
            f"{covered.alias} held by v{covered.version}" if covered.version else
            f"{covered.alias} held by no version")
    raise PromotionRefused(
        f"{name} version {version}'s verdict was made with {then}, but {name}@{alias} is now "
        f"version {holder}: the verdict does not cover the current holder, so {name}@{alias} is "
        f"unchanged. Re-evaluate with promotion.alias {alias!r} (`tunelens evaluate "
        f"models:/{name}/{version} --data FILE`), or override with --force --reason TEXT")


def promote(client, name: str, version, alias: str = "production", *, force: bool = False,
            reason: str | None = None) -> PromotionResult:
    """Point `name@alias` at `version` if its tag tunelens.verdict is PROMOTE (or force + reason)."""
    version = str(version)
    reason = (reason or "").strip() or None
    if force and not reason:
        raise TunelensError("--force needs --reason TEXT: say why the verdict is overridden (the "
                            "reason is recorded on the version)")
    model = _registered_model(client, name)
    try:
        model_version = client.get_model_version(name, version)
    except MlflowException as exc:
        if _missing(exc):
            raise TunelensError(f"{name} has no version {version}: check the version number "
                                f"(`tunelens promote NAME VERSION`)") from None
        raise
    verdict = model_version.tags.get(VERDICT_TAG)
    if verdict != Decision.PROMOTE and not force:
        reasons = model_version.tags.get(REASONS_TAG, "")
        shown = reasons[:_REASONS_SHOWN] + ("..." if len(reasons) > _REASONS_SHOWN else "")
        raise PromotionRefused(
            f"{name} version {version} has verdict {verdict or 'none (never evaluated)'}, not "
            f"PROMOTE, so {name}@{alias} is unchanged"
            + (f" (reasons: {shown})" if shown else "")
            + f". Evaluate it with `tunelens evaluate models:/{name}/{version} --data FILE`, or "
              f"override with --force --reason TEXT")
    previous = model.aliases.get(alias)
    previous = None if previous is None else str(previous)
    if previous == version:
        return PromotionResult(name, alias, version, previous, changed=False, forced=force,
                               verdict=verdict)
    if not force:
        _check_holder_covered(name, version, alias, previous,
                              HolderCoverage.from_tag(model_version.tags.get(HOLDER_TAG)))
    history = _history(model, alias)
    if previous is not None:
        # recorded before the alias moves: a failure in between must not lose the way back
        _write_history(client, name, alias, history + [previous])
    try:
        client.set_registered_model_alias(name, alias, version)
    except Exception:
        if previous is not None:
            _write_history(client, name, alias, history)
        raise
    client.set_model_version_tag(name, version, promotion_tag(alias, "replaced"), previous or "none")
    client.set_model_version_tag(name, version, promotion_tag(alias, "forced"), str(force).lower())
    if reason:
        client.set_model_version_tag(name, version, promotion_tag(alias, "reason"), reason)
    elif promotion_tag(alias, "reason") in model_version.tags:  # a stale reason of an older force
        client.delete_model_version_tag(name, version, promotion_tag(alias, "reason"))
    return PromotionResult(name, alias, version, previous, changed=True, forced=force,
                           verdict=verdict)


def auto_promote(client, name: str, version, config: dict) -> PromotionResult | None:
    """The hook worker's step after an evaluation: promote when promotion.auto_promote is on and
    the version's verdict is PROMOTE and covered the alias's current holder (the same rule as
    `tunelens promote`); None (nothing changed) otherwise, with the refusal logged."""
    settings = config["promotion"]
    if not settings["auto_promote"]:
        return None
    if client.get_model_version(name, str(version)).tags.get(VERDICT_TAG) != Decision.PROMOTE:
        return None
    try:
        return promote(client, name, version, settings["alias"])
    except PromotionRefused as refused:  # the holder moved while this version was evaluated
        log.warning("auto-promote of %s v%s refused: %s", name, version, refused)
        return None


def rollback(client, name: str, alias: str = "production") -> RollbackResult:
    """Point `name@alias` back at its last recorded earlier holder; refuse if there is none."""
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
    client.set_registered_model_alias(name, alias, candidate)
    _write_history(client, name, alias, history)
    return RollbackResult(name, alias, candidate, current, skipped)
