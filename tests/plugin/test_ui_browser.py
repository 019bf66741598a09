"""The MLflow UI in a real browser: a registered LoRA version shows its analysis and verdict, and
the version page's alias editor shows tunelens's refusal when `production` is added to a REJECTed
version.

A real `tunelens server` (MLflow + hooks) in-process, a real PEFT adapter logged with
tunelens.log_adapter, the automatic analysis, a real evaluation (transformers backend: the vLLM
engine is covered by test_eval_vllm.py), then headless Chromium opens the pages a user would.
"""
from __future__ import annotations

import json

import pytest

from support.ui_checks import CHROMIUM, add_alias_in_ui, check_ui

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (apt-get install chromium)")


def test_version_page_report_and_evaluation_table_render(tmp_path, llama_base, llama_adapter):
    import mlflow
    from mlflow import MlflowClient

    from tunelens.config import load_config
    from tunelens.demo.story import wait_for_analysis
    from tunelens.evaluators.run import evaluate_version
    from tunelens.registry_hooks.service.embedded import EmbeddedServer
    from tunelens.registry_hooks.service.log_adapter import log_adapter
    from support.mlflow_server import free_port

    data = tmp_path / "test.jsonl"
    rows = [{"inputs": f"she go to school {i}", "targets": "she goes to school"} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config()
    server = EmbeddedServer(config, port=free_port(), data_dir=tmp_path / "server").start()
    try:
        mlflow.set_tracking_uri(server.url)
        client = MlflowClient(server.url)
        version = str(log_adapter(llama_adapter, llama_base, registered_model_name="ui").version)
        status, _ = wait_for_analysis(client, "ui", version, timeout_s=600)
        outcome = evaluate_version(f"models:/ui/{version}", str(data), base=llama_base,
                                   config=config, client=client, backend="transformers",
                                   max_new_tokens=4)
        findings = check_ui(server.url, "ui", version, tmp_path / "shots")
    finally:
        server.stop()

    assert status == "done"
    assert "tunelens.analysis.status" in findings.version_page_text
    assert outcome.verdict.decision.value in findings.version_page_text
    assert findings.report_rendered, "report.html did not finish rendering in the artifact viewer"
    assert findings.report_layer_bars > 0
    assert "finetuned_output" in findings.eval_table_text  # the per-row table, viewed as a table
    assert rows[0]["inputs"] in findings.eval_table_text
    assert findings.side_by_side_rendered, "side_by_side.html did not render in the artifact viewer"
    for shot in findings.screenshots:
        assert shot.stat().st_size > 10_000


def test_the_alias_editor_shows_the_refusal_and_nothing_is_written(tmp_path):
    """On a real `tunelens server`, a user adds `production` to a REJECTed version in its page:
    MLflow's error alert shows tunelens's message, and the alias stays where it was."""
    from mlflow import MlflowClient

    from support.mlflow_server import free_port
    from support.verdicts import CURRENT, new_versions, sign_verdict
    from tunelens.config import load_config
    from tunelens.registry.promotion import Gatekeeper, promote
    from tunelens.registry_hooks.service.embedded import EmbeddedServer

    server = EmbeddedServer(load_config(), port=free_port(), data_dir=tmp_path / "server").start()
    try:
        client = MlflowClient(server.url)
        client.create_registered_model("locked")
        champion, rejected = new_versions(client, "locked", tmp_path / "files", 2)
        sign_verdict(client, "locked", champion, "PROMOTE", holder=CURRENT)
        promote(client, Gatekeeper.from_config(None), "locked", champion)
        sign_verdict(client, "locked", rejected, "REJECT", holder=CURRENT,
                     reasons="REJECT: exact_match 0.41 vs 0.62 for the production version")
        shot = tmp_path / "alias-refused.png"
        message = add_alias_in_ui(server.url, "locked", rejected, "production", shot)
        aliases = client.get_registered_model("locked").aliases
    finally:
        server.stop()

    assert f"locked@production may not point at version {rejected}" in message, message
    assert "its verdict is REJECT, not PROMOTE" in message and "tunelens promote" in message
    assert aliases == {"production": champion}
    assert shot.stat().st_size > 10_000
