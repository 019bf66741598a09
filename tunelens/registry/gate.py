"""Who may point a guarded alias at a version: one rule, for every door.

`judge` is a pure function of what the registry holds at the moment of the move (the version's
tags, the alias's holder, the test set the registered model names) and the verdict key. It allows
a move when
- the version's signed verdict is PROMOTE and covered the alias's holder (a verdict made while
  another version held the alias, or none did, is stale once the holder changed), and, where the
  registered model names its test set (`tunelens.eval_dataset`), was made on that set; or
- a signed break-glass record (`tunelens promote --force --reason`, `tunelens rollback`) on the
  version names this alias, the holder it replaces, and is fresh.
`tunelens promote`, auto-promote, the registry store inside the MLflow server and the hook
service's revert of a webhook-seen move all ask it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Mapping

from tunelens.registry.signing import sign, verify
from tunelens.registry.verdicts import (REASONS_TAG, Decision, TrustedVerdict, read_verdict)
from tunelens.registry.version import VersionRef

# A break-glass record lets exactly one move through: the alias's holder must still be the one it
# names, and it must be this recent (the CLI writes it right before it moves the alias).
OVERRIDE_SECONDS = 300
# Registered-model tags: the test set a model's verdicts must be made on, and the version an
# alias pointed at before someone deleted it (still the holder to beat).
EVAL_DATASET_TAG = "tunelens.eval_dataset"
_REASONS_SHOWN = 400


def override_tag(alias: str) -> str:
    """The version tag holding the signed break-glass record for `alias`."""
    return f"tunelens.promotion.{alias}.override"


def deleted_holder_tag(alias: str) -> str:
    return f"tunelens.alias.{alias}.deleted"


@dataclass(frozen=True)
class AliasOverride:
    """A signed record that a key holder moved `alias` to a version around the verdict."""

    kind: str  # "force" (promote --force) or "rollback"
    name: str
    version: str
    alias: str
    replaces: str | None  # the holder when the record was made
    reason: str
    user: str
    made_at_ms: int
    signature: str = ""

    def fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "signature"}

    @classmethod
    def make(cls, key: bytes, kind: str, ref: VersionRef, alias: str, replaces: str | None,
             reason: str, user: str) -> "AliasOverride":
        unsigned = cls(kind, ref.name, ref.version, alias, replaces, reason, user,
                       int(time.time() * 1000))
        return cls(**{**asdict(unsigned), "signature": sign(key, unsigned.fields())})

    @classmethod
    def from_tag(cls, value: str | None) -> "AliasOverride | None":
        try:
            raw = json.loads(value or "")
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def tag_value(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def signed_by(self, key: bytes) -> bool:
        return verify(key, self.fields(), self.signature)

    def lets_through(self, key: bytes, ref: VersionRef, alias: str, holder: str | None,
                     now_ms: int) -> bool:
        """Whether this record lets `ref` take `alias` from `holder` now."""
        return (self.signed_by(key) and (self.name, self.version, self.alias) ==
                (ref.name, ref.version, alias) and self.replaces == holder
                and 0 <= now_ms - self.made_at_ms <= OVERRIDE_SECONDS * 1000)


@dataclass(frozen=True)
class AliasMove:
    """A request to point `alias` at `ref`, with what the registry holds at that moment."""

    ref: VersionRef
    alias: str
    holder: str | None  # the alias's holder now, or the one it had before it was deleted
    tags: Mapping[str, str]  # the version's tags
    test_set: str | None = None  # digest of the test set the registered model names, if any
    test_set_problem: str | None = None  # why that set could not be read


@dataclass(frozen=True)
class GateAnswer:
    allowed: bool
    why: str  # the verdict, the break-glass record, or what is missing
    verdict: TrustedVerdict
    override: AliasOverride | None = None
    refusal: str = ""  # for a refused move: one line naming the move, why, and the fixing command


def judge(key: bytes, move: AliasMove, now_ms: int | None = None) -> GateAnswer:
    """Whether `move` may happen, and why (see the module docstring for the rule)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    verdict = read_verdict(key, move.ref, move.tags)
    if move.holder == move.ref.version:
        return GateAnswer(True, f"version {move.ref.version} holds {move.alias} already", verdict)
    override = AliasOverride.from_tag(move.tags.get(override_tag(move.alias)))
    if override is not None and override.lets_through(key, move.ref, move.alias, move.holder, now_ms):
        return GateAnswer(True, f"{override.kind} by {override.user}: {override.reason}", verdict,
                          override)
    problem = _verdict_problem(move, verdict)
    if problem is None:
        held = f"it covered holder v{move.holder}" if move.holder else "no version holds it"
        return GateAnswer(True, f"verdict PROMOTE and {held}", verdict)
    fix = (f"evaluate it (`tunelens evaluate {move.ref.uri} --data FILE`) or override with "
           f"`tunelens promote {move.ref.name} {move.ref.version} --alias {move.alias} --force "
           "--reason TEXT`")
    return GateAnswer(False, problem, verdict, refusal=(
        f"{move.ref.name}@{move.alias} may not point at version {move.ref.version}: {problem}; "
        f"{fix}"))


def _verdict_problem(move: AliasMove, verdict: TrustedVerdict) -> str | None:
    """Why the version's own verdict does not let it take the alias (None: it does)."""
    if verdict.problem is not None:
        return verdict.problem
    if verdict.decision is None:
        return "it was never evaluated"
    if verdict.decision != Decision.PROMOTE:
        reasons = move.tags.get(REASONS_TAG, "")
        shown = reasons[:_REASONS_SHOWN] + ("..." if len(reasons) > _REASONS_SHOWN else "")
        return (f"its verdict is {verdict.decision.value}, not PROMOTE"
                + (f" ({shown})" if shown else ""))
    if move.holder is not None:
        covered = verdict.holder
        if covered is None or covered.alias != move.alias or covered.version != move.holder:
            then = ("no holder" if covered is None or covered.alias != move.alias
                    else f"v{covered.version}" if covered.version else "no version holding it")
            return (f"its verdict is stale: it was evaluated against {then} but v{move.holder} "
                    f"holds {move.alias} now")
    if move.test_set_problem is not None:
        return move.test_set_problem
    if move.test_set is not None and verdict.test_set != move.test_set:
        return ("its verdict was made on another test set than the one the registered model names "
                f"({EVAL_DATASET_TAG})")
    return None
