"""A verdict on a version as tunelens states it: readable tags, and one signed statement behind them.

The evaluator writes the statement tag first (`tunelens.verdict.signed`: decision, the alias holder
it covered, the test set's content digest, the run, the reasons' digest, signed with the verdict
key over the model name and version too), then the readable tags. Every reader (promote,
auto-promote, the alias guard, the version page) trusts a verdict only through `read_verdict`:
a readable tag that disagrees with the statement, a statement copied from another version, or one
whose signature does not check is "not written by tunelens" and never makes a version promotable.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Mapping

from tunelens.registry.signing import digest, sign, verify
from tunelens.registry.version import VersionRef

# Model-version tags the evaluator writes and every promotion check reads.
VERDICT_TAG = "tunelens.verdict"
REASONS_TAG = "tunelens.verdict.reasons"
EVAL_RUN_TAG = "tunelens.eval.run_id"
# "<alias>=<version>" or "<alias>=none": the alias holder the verdict compared against.
HOLDER_TAG = "tunelens.verdict.holder"
STATEMENT_TAG = "tunelens.verdict.signed"
# The readable tags the statement vouches for, and the statement field each must equal.
VOUCHED = {VERDICT_TAG: "decision", HOLDER_TAG: "holder", EVAL_RUN_TAG: "run_id"}
NOT_WRITTEN_BY_TUNELENS = "verdict tag not written by tunelens"


class Decision(StrEnum):
    PROMOTE = "PROMOTE"
    REJECT = "REJECT"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True)
class HolderCoverage:
    """Which version held the promotion alias when the verdict was made (None: nobody)."""

    alias: str
    version: str | None

    @property
    def tag_value(self) -> str:
        return f"{self.alias}={self.version or 'none'}"

    @classmethod
    def from_tag(cls, value: str | None) -> "HolderCoverage | None":
        """None for a verdict that recorded no holder (it covered none)."""
        if not value or "=" not in value:
            return None
        alias, version = value.split("=", 1)
        return cls(alias, None if version == "none" else version)


@dataclass(frozen=True)
class VerdictStatement:
    """What the evaluator said about models:/name/version, and its signature."""

    name: str
    version: str
    decision: str
    holder: str | None  # HolderCoverage.tag_value, None when no alias was considered
    test_set: str  # content digest of the test set (EvalDataset.digest)
    run_id: str
    reasons: str  # digest of the reasons text
    made_at_ms: int
    signature: str = ""

    def fields(self) -> dict:
        """Everything the signature covers."""
        return {k: v for k, v in asdict(self).items() if k != "signature"}

    @classmethod
    def make(cls, key: bytes, ref: VersionRef, decision: str, holder: str | None, test_set: str,
             run_id: str, reasons: str) -> "VerdictStatement":
        unsigned = cls(ref.name, ref.version, decision, holder, test_set, run_id, digest(reasons),
                       int(time.time() * 1000))
        return cls(**{**asdict(unsigned), "signature": sign(key, unsigned.fields())})

    @classmethod
    def from_tag(cls, value: str) -> "VerdictStatement | None":
        """The statement a tag value holds, None when it is not one."""
        try:
            raw = json.loads(value)
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def tag_value(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class TrustedVerdict:
    """A version's verdict as far as it can be trusted: `problem` says why it cannot."""

    decision: Decision | None  # None: never evaluated, or not trusted
    holder: HolderCoverage | None
    test_set: str | None
    problem: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.decision is not None or self.problem is not None


def statement_problem(key: bytes, ref: VersionRef, statement: VerdictStatement | None) -> str | None:
    """Why `statement` is not tunelens's verdict on `ref` (None when it is)."""
    if statement is None:
        return f"{NOT_WRITTEN_BY_TUNELENS}: {STATEMENT_TAG} is not a tunelens statement"
    if not verify(key, statement.fields(), statement.signature):
        return (f"{NOT_WRITTEN_BY_TUNELENS}: its signature does not check with this verdict key "
                "(hand-edited, or signed with another key)")
    if (statement.name, statement.version) != (ref.name, ref.version):
        return (f"{NOT_WRITTEN_BY_TUNELENS} for this version: it was copied from "
                f"{VersionRef(statement.name, statement.version).uri}")
    return None


def read_verdict(key: bytes, ref: VersionRef, tags: Mapping[str, str]) -> TrustedVerdict:
    """The version's verdict from its tags, trusted only as far as the signed statement goes."""
    if STATEMENT_TAG not in tags:
        if VERDICT_TAG in tags:
            return TrustedVerdict(None, None, None, f"{NOT_WRITTEN_BY_TUNELENS}: {VERDICT_TAG} is "
                                  f"{tags[VERDICT_TAG]!r} but no signed statement stands behind it")
        return TrustedVerdict(None, None, None)
    statement = VerdictStatement.from_tag(tags[STATEMENT_TAG])
    problem = statement_problem(key, ref, statement)
    if problem is None:
        problem = _disagreement(statement, tags)
    if problem is not None:
        return TrustedVerdict(None, None, None, problem)
    return TrustedVerdict(Decision(statement.decision), HolderCoverage.from_tag(statement.holder),
                          statement.test_set)


def _disagreement(statement: VerdictStatement, tags: Mapping[str, str]) -> str | None:
    """A readable tag that says something else than the statement behind it."""
    for tag, field in VOUCHED.items():
        said = getattr(statement, field)
        if tags.get(tag) != said and not (said is None and tag not in tags):
            return (f"{NOT_WRITTEN_BY_TUNELENS}: {tag} is {tags.get(tag)!r} but the signed verdict "
                    f"says {said!r}")
    if REASONS_TAG in tags and digest(tags[REASONS_TAG]) != statement.reasons:
        return f"{NOT_WRITTEN_BY_TUNELENS}: {REASONS_TAG} was edited after the verdict"
    return None


def write_verdict(client, statement: VerdictStatement, reasons: str,
                  before_decision=lambda: None) -> None:
    """The statement first (a registry store holding the gate checks it on write), then the
    readable tags; `before_decision()` runs just before the decision tag, which goes last so a
    reader never sees a decision whose other tags are not there yet."""
    name, version = statement.name, statement.version
    client.set_model_version_tag(name, version, STATEMENT_TAG, statement.tag_value())
    client.set_model_version_tag(name, version, EVAL_RUN_TAG, statement.run_id)
    client.set_model_version_tag(name, version, REASONS_TAG, reasons)
    if statement.holder is not None:
        client.set_model_version_tag(name, version, HOLDER_TAG, statement.holder)
    else:
        _delete_tag(client, name, version, HOLDER_TAG)
    before_decision()
    client.set_model_version_tag(name, version, VERDICT_TAG, statement.decision)


def _delete_tag(client, name: str, version: str, key: str) -> None:
    if key in client.get_model_version(name, version).tags:
        client.delete_model_version_tag(name, version, key)
