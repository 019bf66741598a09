"""The gate's rule and the signed verdict, as pure functions over a version's tags."""
from __future__ import annotations

import os
import stat

import pytest

from tunelens.errors import TunelensError
from tunelens.registry.gate import (OVERRIDE_SECONDS, AliasMove, AliasOverride, judge,
                                    override_tag)
from tunelens.registry.signing import KEY_ENV, verdict_key
from tunelens.registry.verdicts import (HOLDER_TAG, REASONS_TAG, STATEMENT_TAG, VERDICT_TAG,
                                        Decision, VerdictStatement, read_verdict)
from tunelens.registry.version import VersionRef

KEY = b"k" * 32
V2 = VersionRef("grammar", "2")


class Tags(dict):
    """A version's tags as the evaluator leaves them, built through `write_verdict`'s calls."""

    def set_model_version_tag(self, name, version, key, value):
        self[key] = value

    def delete_model_version_tag(self, name, version, key):
        self.pop(key, None)

    def get_model_version(self, name, version):
        return type("MV", (), {"tags": self})()


def verdict_tags(decision="PROMOTE", holder="production=1", ref=V2, key=KEY, test_set="t" * 64,
                 reasons="PROMOTE finetuned on 40 rows") -> Tags:
    from tunelens.registry.verdicts import write_verdict

    tags = Tags()
    write_verdict(tags, VerdictStatement.make(key, ref, decision, holder, test_set, "r" * 32,
                                              reasons), reasons)
    return tags


def move(tags, holder="1", test_set=None, ref=V2) -> AliasMove:
    return AliasMove(ref, "production", holder, tags, test_set)


def test_a_signed_promote_covering_the_holder_passes():
    answer = judge(KEY, move(verdict_tags()))
    assert answer.allowed and "covered holder v1" in answer.why
    assert read_verdict(KEY, V2, verdict_tags()).decision is Decision.PROMOTE


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.update({VERDICT_TAG: "PROMOTE"}), "tunelens.verdict is 'PROMOTE' but the signed"),
    (lambda t: t.update({HOLDER_TAG: "production=1"}), "tunelens.verdict.holder is"),
    (lambda t: t.update({REASONS_TAG: "all good"}), "was edited after the verdict"),
    (lambda t: t.pop(STATEMENT_TAG), "no signed statement stands behind it"),
    (lambda t: t.update({STATEMENT_TAG: t[STATEMENT_TAG].replace("REJECT", "PROMOTE")}),
     "signature does not check"),
])
def test_a_hand_edited_verdict_is_not_tunelens_s_and_never_promotes(edit, says):
    tags = verdict_tags("REJECT", holder="production=none")
    edit(tags)
    answer = judge(KEY, move(tags))
    assert not answer.allowed
    assert "verdict tag not written by tunelens" in answer.refusal and says in answer.refusal


def test_a_verdict_copied_from_another_version_is_named_as_a_copy():
    copied = verdict_tags(ref=VersionRef("grammar", "5"))
    answer = judge(KEY, move(copied))
    assert not answer.allowed and "copied from models:/grammar/5" in answer.why


def test_a_verdict_signed_with_another_key_does_not_check():
    assert not judge(KEY, move(verdict_tags(key=b"other" * 8))).allowed


@pytest.mark.parametrize("decision, holder, alias_holder, says", [
    ("REJECT", "production=1", "1", "its verdict is REJECT, not PROMOTE"),
    ("INCONCLUSIVE", "production=1", "1", "its verdict is INCONCLUSIVE, not PROMOTE"),
    ("PROMOTE", "production=none", "1", "evaluated against no version holding it but v1"),
    ("PROMOTE", "production=1", "3", "evaluated against v1 but v3 holds production now"),
    ("PROMOTE", None, "1", "evaluated against no holder"),
])
def test_not_promote_or_stale_is_refused_with_the_command_that_fixes_it(decision, holder,
                                                                        alias_holder, says):
    answer = judge(KEY, move(verdict_tags(decision, holder), holder=alias_holder))
    assert not answer.allowed and says in answer.why
    assert "tunelens evaluate models:/grammar/2" in answer.refusal
    assert "--force --reason TEXT" in answer.refusal


def test_never_evaluated_is_refused_and_an_empty_alias_needs_only_promote():
    assert "never evaluated" in judge(KEY, move(Tags())).why
    assert judge(KEY, move(verdict_tags(holder="production=none"), holder=None)).allowed


def test_the_named_test_set_decides_which_verdicts_count():
    tags = verdict_tags(test_set="a" * 64)
    assert judge(KEY, move(tags, test_set="a" * 64)).allowed
    answer = judge(KEY, move(tags, test_set="b" * 64))
    assert not answer.allowed and "another test set" in answer.why
    unreadable = AliasMove(V2, "production", "1", tags, None, "cannot be read here")
    assert not judge(KEY, unreadable).allowed


def test_a_break_glass_record_lets_one_fresh_move_through():
    record = AliasOverride.make(KEY, "force", V2, "production", "1", "outage", "ana")
    tags = verdict_tags("REJECT")
    tags[override_tag("production")] = record.tag_value()
    now = record.made_at_ms
    answer = judge(KEY, move(tags), now_ms=now + 1000)
    assert answer.allowed and answer.override == record and "force by ana: outage" in answer.why
    assert not judge(KEY, move(tags, holder="3"), now_ms=now).allowed  # the holder moved since
    assert not judge(KEY, move(tags), now_ms=now + (OVERRIDE_SECONDS + 1) * 1000).allowed
    forged = AliasOverride.make(b"x" * 32, "force", V2, "production", "1", "outage", "eve")
    tags[override_tag("production")] = forged.tag_value()
    assert not judge(KEY, move(tags), now_ms=forged.made_at_ms).allowed


def test_the_key_comes_from_the_environment_or_a_private_file(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    path = tmp_path / "keys" / "verdict.key"
    first = verdict_key(path)
    assert len(first) == 64 and verdict_key(path) == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert verdict_key(path) == b"from-env"
    monkeypatch.delenv(KEY_ENV)
    path.write_text("")
    with pytest.raises(TunelensError, match="is empty"):
        verdict_key(path)


def test_the_named_test_set_is_read_by_content_not_by_file(tmp_path):
    """The digest is over the rows: the same rows as JSONL or CSV are one test set; a changed row
    is another; a set the gate cannot read is a refusal that says so."""
    from tunelens.registry.gate import EVAL_DATASET_TAG
    from tunelens.registry.promotion import Gatekeeper

    gate = Gatekeeper.from_config(None)
    jsonl, csv = tmp_path / "test.jsonl", tmp_path / "test.csv"
    jsonl.write_text('{"inputs": "fix: he go", "targets": "He goes."}\n'
                     '{"inputs": "fix: i has", "targets": "I have."}\n')
    csv.write_text("inputs,targets\nfix: he go,He goes.\nfix: i has,I have.\n")
    as_jsonl, problem = gate.named_test_set({EVAL_DATASET_TAG: str(jsonl)})
    assert problem is None and len(as_jsonl) == 64
    assert gate.named_test_set({EVAL_DATASET_TAG: str(csv)}) == (as_jsonl, None)
    csv.write_text("inputs,targets\nfix: he go,He goes.\nfix: i has,I has.\n")
    assert gate.named_test_set({EVAL_DATASET_TAG: str(csv)})[0] != as_jsonl
    missing, why = gate.named_test_set({EVAL_DATASET_TAG: str(tmp_path / "gone.jsonl")})
    assert missing is None and "cannot be read here" in why
    assert gate.named_test_set({}) == (None, None)
