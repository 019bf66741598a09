"""The registry stays tidy: tunelens touches only the models in its scope, keeps the user's
description text, and leaves no internal state on a finished version."""
from __future__ import annotations

import json
import time

from mlflow import MlflowClient

from support.hooks_support import HooksProcess, register, wait_status, write_config
from tunelens.config import with_changes
from tunelens.registry.description import ANALYSIS_SECTION, escape_markdown, replace_section
from tunelens.registry_hooks.service.scope import Scope
from tunelens.registry_hooks.service.state import LEASE, STATUS


def test_scope_matches_names_patterns_and_the_opt_in_tag():
    scope = Scope.from_config(with_changes(None, {"hooks": {
        "models": ["team-a/*", "exact"], "models_tag": "tunelens.enabled=true"}}))
    assert scope.includes("team-a/chat", {}) and scope.includes("exact", {})
    assert not scope.includes("team-b/chat", {}) and not scope.includes("exactly", {})
    assert scope.includes("team-b/chat", {"tunelens.enabled": "true"})
    assert not scope.includes("team-b/chat", {"tunelens.enabled": "false"})
    assert not Scope.of(None, None).includes("x", {})
    assert Scope.of(["*"], None).everything
    # handed to the registry-store plugin inside `tunelens server`'s MLflow as JSON
    assert Scope.from_json(scope.to_json()) == scope


def test_replace_section_changes_only_its_own_part():
    user = "Trained on the March tickets.\n\n*do not* deploy before review"
    first = replace_section(user, ANALYSIS_SECTION, "analysis one")
    assert first.startswith(user) and "analysis one" in first
    edited = first + "\n\nAdded by the user after the analysis."
    second = replace_section(edited, ANALYSIS_SECTION, "analysis two")
    assert second.startswith(user) and second.endswith("Added by the user after the analysis.")
    assert "analysis one" not in second and second.count("analysis two") == 1
    both = replace_section(second, "evaluation", "eval")
    assert "analysis two" in both and "eval" in both
    assert replace_section(both, "evaluation", None) == second
    # the registry's 5000-character limit shortens tunelens's section, never the user's text
    long_user = "u" * 4900
    assert replace_section(long_user, ANALYSIS_SECTION, "x" * 500).startswith(long_user)
    assert len(replace_section("u" * 4000, ANALYSIS_SECTION, "x" * 5000)) <= 5000
    # a description written before the markers existed: its old section is replaced, not doubled
    legacy = "notes\n\n### tunelens analysis\n\n- old"
    assert replace_section(legacy, ANALYSIS_SECTION, "new").count("tunelens analysis") == 0
    assert escape_markdown("‖ΔW‖_F *x*") == "‖ΔW‖\\_F \\*x\\*"


def test_out_of_scope_versions_get_nothing_and_in_scope_ones_end_tidy(mlflow_server, tmp_path,
                                                                      llama_adapter):
    client = MlflowClient(mlflow_server.url)
    config = write_config(tmp_path / "conf.yaml", models=["scoped-*"],
                          models_tag="tunelens.enabled=true")
    not_lora = tmp_path / "not-lora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    client.create_registered_model("opted-in-by-tag", tags={"tunelens.enabled": "true"})
    notes = "Our notes: ‖ΔW‖ is *ours* to describe."
    hooks = HooksProcess(mlflow_server.url, config, tmp_path / "hooks.log", secret="s" * 32,
                         webhook=False)
    try:
        outside = [register(client, "outsider", llama_adapter, description=notes),
                   register(client, "outsider-not-lora", not_lora)]
        named = register(client, "scoped-chat", llama_adapter, description=notes)
        tagged = register(client, "opted-in-by-tag", llama_adapter)
        for name, version in (("scoped-chat", named), ("opted-in-by-tag", tagged)):
            assert wait_status(client, name, version)[STATUS] == "done", hooks.log_tail()
        time.sleep(5)  # two more scans: the out-of-scope versions are still untouched
        for name, version in (("scoped-chat", named), ("opted-in-by-tag", tagged)):
            # internal state is gone once the version is final (the lease right after the status)
            assert LEASE not in client.get_model_version(name, version).tags
        description = client.get_model_version("scoped-chat", named).description
        assert description.startswith(notes) and "‖ΔW‖\\_F" in description
        for name, version in zip(("outsider", "outsider-not-lora"), outside):
            mv = client.get_model_version(name, version)
            assert not [k for k in mv.tags if k.startswith("tunelens.")], mv.tags
            assert (mv.description or None) == (notes if name == "outsider" else None)
        assert "analysing models scoped-* or models tagged tunelens.enabled=true" in \
            hooks.log_tail(100_000)
    finally:
        assert hooks.stop() == 0, hooks.log_tail()
