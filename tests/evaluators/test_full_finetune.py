"""A full fine-tune evaluated like an adapter: registered as a plain model folder, run on an engine
of its own beside its base, with text groups (perplexity on the same tokens, the cumulative
per-token curve) and the activation drift per layer next to the full diff's per-layer change.

The "fine-tune" is the tiny Llama base with noise added to layer 1's MLP only, so its weights and
its residual stream both leave the base's at layer 1, never at layer 0. Each test row's target is
its true greedy output where the base says something else.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from support.cli_support import assert_one_line_error
from support.eval_support import greedy, prompt_pool
from support.factories import CORPUS, make_lora_adapter, perturbed_copy
from tunelens.config import load_config
from tunelens.evaluators.run import evaluate_version
from tunelens.registry.base_model import BASE_MODEL_TAG
from tunelens.registry_hooks.service.log_adapter import log_adapter

NAME = "full-finetune"
MAX_NEW = 6


@pytest.fixture(scope="module")
def world(mlflow_server, llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    full = perturbed_copy(llama_base, root / "full", {"layers.1.mlp": 0.05}, seed=3)
    client = MlflowClient(mlflow_server.url)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_artifacts(run.info.run_id, str(full))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    client.create_model_version(NAME, run.info.artifact_uri, run_id=run.info.run_id,
                                tags={BASE_MODEL_TAG: str(llama_base)})
    adapter = make_lora_adapter(llama_base, root / "adapter", r=4, target_modules=["q_proj"])
    log_adapter(adapter, llama_base, registered_model_name=NAME, tracking_uri=mlflow_server.url)
    prompts = prompt_pool(60, seed=5)
    tuned, base = greedy(full, None, prompts, MAX_NEW), greedy(llama_base, None, prompts, MAX_NEW)
    rows = [i for i, (a, b) in enumerate(zip(tuned, base)) if a != b][:12]
    assert len(rows) == 12, "too few prompts where the fine-tune answers otherwise"
    data = root / "test.jsonl"
    pd.DataFrame({"inputs": [prompts[i] for i in rows], "targets": [tuned[i] for i in rows]}
                 ).to_json(data, orient="records", lines=True)
    (root / "general.txt").write_text("\n\n".join(sorted(set(CORPUS))[:6]) + "\n")
    settings = {"evaluation": {"backend": "transformers",
                               "generation": {"max_new_tokens": MAX_NEW},
                               "latency": {"sample_rows": 2, "warmup_requests": 1},
                               "texts": {"drift_texts": 3}},
                "verdict": {"bootstrap_resamples": 300, "max_latency_ratio": None}}
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(settings))
    return {"client": client, "url": mlflow_server.url, "data": data, "policy": policy,
            "texts": f"general={root / 'general.txt'}", "full": full, "adapter": adapter}


def test_a_registered_full_finetune_is_evaluated_beside_its_base(world):
    client = world["client"]
    outcome = evaluate_version(f"models:/{NAME}/1", world["data"],
                               config=load_config(world["policy"]), client=client,
                               texts=[world["texts"]])
    metrics = outcome.metrics
    assert outcome.labels == ["base", "finetuned"]
    assert metrics["finetuned/exact_match"] == 1.0 and metrics["base/exact_match"] == 0.0
    assert any("finetuned on " in note and "a full fine-tune, its own engine" in note
               for note in outcome.notes)
    # the base was timed as served, the full fine-tune on its own engine was not: its memory
    # rule cannot decide and says why, instead of a figure it does not have
    assert "base/memory_total_gib" in metrics and "finetuned/memory_total_gib" not in metrics
    memory = next(r for r in outcome.verdict.rules if r.name == "memory_ratio")
    assert memory.passed is None and "finetuned ran on an engine of its own" in memory.detail
    assert outcome.verdict.decision.value == "INCONCLUSIVE"
    # perplexity on the same tokens, with the cumulative per-token curve
    assert metrics["finetuned/ppl_general"] != metrics["base/ppl_general"]
    assert "delta/log_ppl_general" in metrics
    files = {a.path for a in client.list_artifacts(outcome.run_id, "tunelens")}
    assert {"tunelens/perplexity_curves.png", "tunelens/activation_drift.json",
            "tunelens/activation_drift.png"} <= files
    # the drift per layer next to the full diff's per-layer change: both start at layer 1
    mlflow.set_tracking_uri(world["url"])
    drift = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="tunelens/activation_drift.json")).read())
    layers = {layer["layer"]: layer for layer in drift["layers"]}
    assert drift["texts"] == 3
    assert layers[0]["relative_change"] < 1e-5 and layers[1]["relative_change"] > 1e-3
    assert layers[0]["weight_delta_fro"] in (None, 0.0) and layers[1]["weight_delta_fro"] > 0
    assert metrics["drift/relative_change_last"] == pytest.approx(layers[1]["relative_change"])


def test_its_perplexity_by_domain_needs_no_test_set(world):
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", f"models:/{NAME}/1", "--texts",
                          world["texts"], "--json"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["models"] == ["base", "v1"]
    engines = {m["label"]: m["engine_model"] for m in report["model_details"]}
    assert engines["v1"] != engines["base"]  # the fine-tune is its own engine's model
    normalised = report["rows"][0]["normalised_ppl"]
    assert sorted(normalised.values()) == [0.0, 1.0]


def test_the_comparison_matrix_refuses_a_full_finetune_in_one_line(world, capsys):
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate",
                                   f"models:/{NAME}/1", f"models:/{NAME}/2", "--data",
                                   str(world["data"]), "--tracking-uri", world["url"]],
                          f"models:/{NAME}/1 (finetuned) is a full fine-tune")


def test_a_full_finetune_on_disk_is_evaluated_without_registering_it(world, llama_base):
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", "--candidate", str(world["full"]),
                          "--base", str(llama_base), "--data", str(world["data"]), "--json"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["model"] == str(world["full"]) and report["holder"] is None
    assert report["labels"] == ["base", "finetuned"]
    assert report["metrics"]["finetuned"]["exact_match"] == 1.0
    assert "memory_total_gib" not in report["metrics"]["finetuned"]
    assert any("the candidate is a local folder" in note for note in report["notes"])
    run = world["client"].get_run(report["run_id"])
    assert run.data.tags["tunelens.model"] == str(world["full"])
    assert run.data.tags["tunelens.verdict"] == report["decision"]


def test_an_adapter_on_disk_runs_on_its_base_engine(world, llama_base):
    outcome = evaluate_version("", world["data"], candidate=world["adapter"], base=llama_base,
                               config=load_config(world["policy"]), client=world["client"])
    assert outcome.model_uri == str(world["adapter"]) and outcome.labels == ["base", "finetuned"]
    # on the base's engine, so timed as served like the base
    assert "finetuned/memory_total_gib" in outcome.metrics
    assert outcome.verdict.holder is None


@pytest.mark.parametrize("argv, needle", [
    (["--candidate", "FULL", "--data", "DATA"], "--candidate DIR needs --base DIR"),
    (["--candidate", "FULL", "--base", "BASE"], "--candidate DIR is evaluated on a test set"),
    ([f"models:/{NAME}/1", "--candidate", "FULL", "--data", "DATA"], "not both"),
    (["--data", "DATA"], "nothing to evaluate"),
    (["--candidate", "BASE/missing", "--base", "BASE", "--data", "DATA"], "is not a folder"),
])
def test_a_candidate_folder_is_checked_in_one_line(world, llama_base, capsys, argv, needle):
    given = {"FULL": str(world["full"]), "DATA": str(world["data"]), "BASE": str(llama_base)}
    argv = [next((arg.replace(k, v) for k, v in given.items() if arg.startswith(k)), arg)
            for arg in argv]
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate", *argv,
                                   "--tracking-uri", world["url"]], needle)
