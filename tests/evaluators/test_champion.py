"""Champion and challenger: the verdict covers the version that holds `production`.

Three real PEFT adapters on a tiny Llama; each row's target is one model's true greedy output that
no other model gives, so exactly that model is right there: base 0 %, v1 30 %, v2 10 % (better
than the base, worse than v1), v3 60 % (better than v1), on 40 rows. v1 is evaluated and promoted; v2 then
beats its base but loses to the holder: not PROMOTE, promote refused, production unchanged; v3
beats the holder and is promoted. The CLI's --json / --fail-on and MLflow extra_metrics as the
primary metric run on the same versions. transformers+PEFT generate here (one evaluation per
version, several per test); tests/evaluators/test_eval_vllm.py covers the holder on the vLLM engine.
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

from support.eval_support import greedy, prompt_pool, rows_owned_by
from support.factories import make_lora_adapter
from tunelens.config import load_config
from tunelens.evaluators.run import evaluate_version
from tunelens.evaluators.scoring.metrics import word_count
from tunelens.evaluators.verdict import decide
from tunelens.registry import promotion
from tunelens.registry.promotion import Gatekeeper, PromotionRefused
from tunelens.registry.verdicts import HOLDER_TAG, VERDICT_TAG
from tunelens.registry_hooks.service.log_adapter import log_adapter

NAME = "champion"
MAX_NEW = 6
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OWNED_ROWS = {"v3": 24, "v1": 12, "v2": 4}  # 40 rows; the base owns none


def promote(client, name, version):
    return promotion.promote(client, Gatekeeper.from_config(None), name, version)


@pytest.fixture(scope="module")
def world(tracking, mlflow_server, llama_base, tmp_path_factory):
    """Versions 1-3 registered, the test set, a policy file (latency and memory rules off: this
    module is about quality and the holder; their rules are tested on score arrays)."""
    root = tmp_path_factory.mktemp("champion")
    adapters = {f"v{seed}": make_lora_adapter(llama_base, root / f"v{seed}", seed=seed, r=8,
                                              lora_alpha=16, target_modules=MODULES)
                for seed in (1, 2, 3)}
    client = MlflowClient(mlflow_server.url)
    for label in ("v1", "v2", "v3"):
        log_adapter(adapters[label], llama_base, registered_model_name=NAME,
                    tracking_uri=mlflow_server.url)
    prompts = prompt_pool(100)
    outputs = {"base": greedy(llama_base, None, prompts, MAX_NEW),
               **{label: greedy(llama_base, adapter, prompts, MAX_NEW)
                  for label, adapter in adapters.items()}}
    inputs, targets = rows_owned_by(outputs, OWNED_ROWS, prompts)
    data = root / "test.jsonl"
    pd.DataFrame({"inputs": inputs, "targets": targets}).to_json(data, orient="records",
                                                                  lines=True)
    settings = {"evaluation": {"backend": "transformers", "generation": {"max_new_tokens": MAX_NEW},
                               "metrics": ["exact_match", "chrf"], "latency": {"sample_rows": 0}},
                "verdict": {"bootstrap_resamples": 300, "max_latency_ratio": None,
                            "max_memory_ratio": None}}
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(settings))
    # the extra-metric test needs no more rows; it also times a few as served
    settings["evaluation"] |= {"max_rows": 16, "latency": {"sample_rows": 4, "warmup_requests": 1}}
    settings["verdict"] |= {"max_latency_ratio": 1.2, "max_memory_ratio": 1.25}
    few_rows = root / "few_rows.yaml"
    few_rows.write_text(yaml.safe_dump(settings))
    return {"client": client, "data": data, "policy": policy, "config": load_config(policy),
           "few_rows": few_rows, "prompts": prompts, "outputs": outputs,
           "url": mlflow_server.url, "root": root}


ANALYSED_DESCRIPTION = ("Trained on the March tickets.\n\n### tunelens analysis\n\n"
                        "- layers modified: **2** of 2")


def assert_comparison_on_the_version_page(client, outcome):
    """The description: user text, analysis, then the comparison (verdict, table, deciding
    rules, links); the run has the test set and the version's model as inputs."""
    description = client.get_model_version(NAME, outcome.version).description
    start, end = "[//]: # (tunelens:evaluation:start)", "[//]: # (tunelens:evaluation:end)"
    assert description.startswith(ANALYSED_DESCRIPTION + f"\n\n{start}\n### tunelens evaluation")
    # the user's text and the analysis are kept; the gate's section follows the comparison
    assert description.index(end) < description.index("[//]: # (tunelens:promotion:start)")
    assert description.rstrip().endswith("[//]: # (tunelens:promotion:end)")
    gate = description.split("[//]: # (tunelens:promotion:start)", 1)[1]
    assert "may be promoted to **production**: yes — because verdict PROMOTE and it covered " \
           "holder v1" in gate
    section = description.split("### tunelens evaluation", 1)[1]
    assert "**PROMOTE** on 40 rows (vs base **PROMOTE**; vs holder production (v1) **PROMOTE**)" \
        in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | exact_match | mean words | served latency p50 / p95")
    assert table[1].endswith("| not measured / not measured | not measured |")  # sample_rows 0
    assert [row.split(" | ")[0] for row in table[1:]] == [
        "| base", "| v3 (candidate)", "| production (v1)"]
    assert " | 0.600 | " in table[2] and " | 0.300 | " in table[3]
    assert "- vs base: `exact_match` pass: significant gain" in section
    assert "- vs holder production (v1): `exact_match` pass" in section
    run = client.get_run(outcome.run_id)
    link = f"#/experiments/{run.info.experiment_id}/runs/{outcome.run_id}"
    assert f"[side_by_side.html]({link}/artifactPath/tunelens/side_by_side.html)" in section
    assert f"[run {outcome.run_id[:8]}]({link})" in section
    dataset_inputs = run.inputs.dataset_inputs
    assert [d.dataset.name for d in dataset_inputs] == ["test.jsonl"]
    assert json.loads(dataset_inputs[0].dataset.profile)["num_rows"] == 40
    model_id = client.get_model_version(NAME, outcome.version).model_id
    if model_id:  # MLflow 3 records the logged model of a version registered from log_model
        assert [m.model_id for m in run.inputs.model_inputs] == [model_id]


def run_cli(world, *args):
    return subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                           str(world["policy"]), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})


def test_champion_stays_when_the_challenger_is_worse_and_a_better_one_is_promoted(world):
    client, config = world["client"], world["config"]
    first = evaluate_version(f"models:/{NAME}/1", world["data"], config=config, client=client)
    assert first.labels == ["base", "finetuned"] and first.holder_label is None
    assert first.metrics["base/exact_match"] == 0.0
    assert first.metrics["finetuned/exact_match"] == pytest.approx(0.3)
    assert first.verdict.decision.value == "PROMOTE"
    assert [p.against for p in first.verdict.parts] == ["base"]
    assert client.get_model_version(NAME, "1").tags[HOLDER_TAG] == "production=none"
    promote(client, NAME, "1")

    # v2 against base and the holder v1, through the CLI gate
    out = run_cli(world, "evaluate", f"models:/{NAME}/2", "--data", str(world["data"]), "--json",
                  "--fail-on", "reject,inconclusive")
    assert out.returncode == 1, out.stderr[-3000:]
    report = json.loads(out.stdout)  # stdout holds exactly one JSON object
    assert report["decision"] in ("REJECT", "INCONCLUSIVE")
    assert report["labels"] == ["base", "finetuned", "production"]
    assert report["holder"] == {"alias": "production", "version": "1"}
    parts = {part["against"]: part for part in report["parts"]}
    assert parts["base"]["decision"] != "REJECT"  # 10 % against 0 %: better, if not yet shown
    assert parts["holder"]["decision"] == report["decision"]  # the holder part decided
    holder_quality = next(r for r in parts["holder"]["rules"] if r["name"] == "exact_match")
    assert holder_quality["status"] != "pass"
    assert holder_quality["observed"] == pytest.approx(0.1 - 0.3)
    head = report["reasons"].split(" | ")[0]
    assert head.startswith(f"{report['decision']} finetuned on 40 rows, decided by ")
    assert "vs holder production=v1" in head
    metrics = report["metrics"]
    assert metrics["production"]["exact_match"] == pytest.approx(0.3)
    assert metrics["finetuned"]["exact_match"] == pytest.approx(0.1)
    assert 0 <= metrics["finetuned"]["chrf"] <= 1 and "chrf" in metrics["base"]
    assert report["deltas"]["production"]["exact_match"] == pytest.approx(-0.2)

    tags = client.get_model_version(NAME, "2").tags
    assert tags[VERDICT_TAG] == report["decision"] and tags[HOLDER_TAG] == "production=1"
    refused = run_cli(world, "promote", NAME, "2")
    assert refused.returncode == 1 and "not PROMOTE" in refused.stderr
    assert client.get_registered_model(NAME).aliases == {"production": "1"}

    # v3 beats the holder on its own rows: PROMOTE, and promote moves production. Its page already
    # holds the user's text and the weight analysis's section; both stay.
    client.update_model_version(NAME, "3", description=ANALYSED_DESCRIPTION)
    third = evaluate_version(f"models:/{NAME}/3", world["data"], config=config, client=client)
    assert third.holder_label == "production"
    assert third.metrics["finetuned/exact_match"] == pytest.approx(0.6)
    assert third.verdict.decision.value == "PROMOTE", third.verdict.reasons
    assert third.verdict.part("holder").rules[0].passed is True
    assert_comparison_on_the_version_page(client, third)
    assert promote(client, NAME, "3").previous == "1"
    assert client.get_registered_model(NAME).aliases == {"production": "3"}

    # v2's REJECT typed over as PROMOTE by hand is not tunelens's verdict: refused
    client.set_model_version_tag(NAME, "2", VERDICT_TAG, "PROMOTE")
    with pytest.raises(PromotionRefused, match="verdict tag not written by tunelens"):
        promote(client, NAME, "2")
    assert client.get_registered_model(NAME).aliases == {"production": "3"}


def test_an_extra_metric_is_logged_and_as_primary_decides_the_quality_rule(world):
    """A make_metric metric with per-row scores: logged for every model; named primary, the
    quality rule judges it (continuous: paired BCa bootstrap) instead of exact match."""
    from mlflow.metrics import MetricValue, make_metric

    def shared_first_word(predictions, targets):
        scores = [float(bool(p.split()) and bool(t.split()) and p.split()[0] == t.split()[0])
                  * 0.5 + 0.5 * (len(p) == len(t)) for p, t in zip(predictions, targets)]
        return MetricValue(scores=scores)

    metric = make_metric(eval_fn=shared_first_word, greater_is_better=True,
                         name="shared_first_word")
    frame = pd.read_json(world["data"], lines=True)
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            model=None, data=frame, model_type="text", targets="targets",
            evaluators=["tunelens"], extra_metrics=[metric],
            evaluator_config={"tunelens": {"model_uri": f"models:/{NAME}/1",
                                           "config": str(world["few_rows"]),
                                           "primary_metric": "shared_first_word"}})
    logged = world["client"].get_run(run.info.run_id).data.metrics
    for label in ("base", "finetuned"):
        assert f"{label}/shared_first_word" in logged
        assert f"{label}/shared_first_word" in result.metrics
    verdict = json.loads(mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/tunelens/verdict.json"))
    quality = verdict["parts"][0]["rules"][0]
    assert quality["name"] == "shared_first_word"
    assert quality["observed"] == pytest.approx(logged["finetuned/shared_first_word"]
                                                - logged["base/shared_first_word"])
    assert "BCa" in quality["detail"]  # scores 0, 0.5 and 1: continuous, so the bootstrap
    assert "delta/shared_first_word_ci_low" in logged
    # latency and memory as served decide their rules against the base
    rules = {rule["name"]: rule for rule in verdict["parts"][0]["rules"]}
    latency = [rule for name, rule in rules.items() if name.startswith("latency")]
    assert len(latency) == 1 and "served" in latency[0]["detail"]  # no batch latency rule
    assert "memory as served" in rules["memory_ratio"]["detail"]
    if len(verdict["parts"]) == 2:  # after the first test v3 holds production: served beside
        holder_rules = {rule["name"]: rule for rule in verdict["parts"][1]["rules"]}
        assert "latency_ratio" in holder_rules
        assert "memory as served" in holder_rules["memory_ratio"]["detail"]
    for label in ("base", "finetuned"):
        # 4 rows a round; another (3 at most) while the latency rule was undecided (transformers)
        assert logged[f"{label}/served_latency_requests"] in (4, 8, 12)
        assert logged[f"{label}/memory_weights_gib"] > 0
    # under load: every model at each default level, and the chart on the side-by-side page
    for label in ("base", "finetuned"):
        for level in (1, 4, 16):
            assert logged[f"{label}/latency_p50_c{level}"] > 0
            assert logged[f"{label}/output_tokens_per_s_c{level}"] >= 0
    page = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/tunelens/side_by_side.html")
    assert "Latency and throughput under load" in page and "<polyline" in page
    # the figures the served rules judged are logged under their names, for metric_thresholds
    assert logged["delta/latency_ratio"] == pytest.approx(rules["latency_ratio"]["observed"])
    assert logged["delta/memory_ratio"] == pytest.approx(rules["memory_ratio"]["observed"])


def test_a_holder_on_another_base_gets_an_engine_of_its_own(world, llama_base, tmp_path):
    """The holder was trained on another base: base and candidate share the first engine, the
    holder runs after it on its own base, and its outputs are its true greedy outputs there."""
    from support.factories import tiny_llama

    other_base = tiny_llama(tmp_path / "other-base", seed=7)
    holder_adapter = make_lora_adapter(other_base, tmp_path / "holder", seed=5, r=4,
                                       target_modules=["q_proj", "v_proj"])
    candidate_adapter = make_lora_adapter(llama_base, tmp_path / "candidate", seed=6, r=4,
                                          target_modules=["q_proj", "v_proj"])
    name, client = "two-bases", world["client"]
    holder = log_adapter(holder_adapter, other_base, registered_model_name=name,
                         tracking_uri=world["url"]).version
    candidate = log_adapter(candidate_adapter, llama_base, registered_model_name=name,
                            tracking_uri=world["url"]).version
    client.set_registered_model_alias(name, "production", str(holder))
    prompts = prompt_pool(6, seed=3)
    data = tmp_path / "rows.jsonl"
    pd.DataFrame({"inputs": prompts, "targets": prompts}).to_json(data, orient="records",
                                                                  lines=True)
    outcome = evaluate_version(f"models:/{name}/{candidate}", data, config=world["config"],
                               client=client, set_version_tags=False)
    assert outcome.labels == ["base", "finetuned", "production"]
    assert any("production on" in note and "its own engine, after" in note
               for note in outcome.notes)
    table = outcome.table
    assert table["production_output"].tolist() == greedy(other_base, holder_adapter, prompts,
                                                         MAX_NEW)
    assert table["finetuned_output"].tolist() == greedy(llama_base, candidate_adapter, prompts,
                                                        MAX_NEW)
    assert [part.against for part in outcome.verdict.parts] == ["base", "holder"]


def test_a_better_fine_tune_that_answers_at_more_length_is_not_held_back(world):
    """The default policy has no conciseness rule: v3 is right exactly on rows where it says more
    than the base, and is promoted; the grammar profile's "no longer answers" rule rejects it."""
    outputs, prompts = world["outputs"], world["prompts"]
    longer = [i for i in range(len(prompts))
              if word_count(outputs["v3"][i]) > word_count(outputs["base"][i])][:16]
    assert len(longer) >= 10, "too few prompts where v3 answers at more length: enlarge the pool"
    data = world["root"] / "longer.jsonl"
    pd.DataFrame({"inputs": [prompts[i] for i in longer],
                  "targets": [outputs["v3"][i] for i in longer]}).to_json(data, orient="records",
                                                                           lines=True)
    settings = {
        "evaluation": {"backend": "transformers", "generation": {"max_new_tokens": MAX_NEW},
                       "latency": {"sample_rows": 0}},
        "verdict": {"max_latency_ratio": None, "max_memory_ratio": None},
        "promotion": {"alias": "longer-answers"}}  # held by no version: a verdict vs base only
    policy = world["root"] / "defaults.yaml"  # the packaged defaults but for the above
    policy.write_text(yaml.safe_dump(settings))
    outcome = evaluate_version(f"models:/{NAME}/3", data, config=load_config(policy),
                               client=world["client"], set_version_tags=False)
    assert outcome.metrics["finetuned/mean_words"] > outcome.metrics["base/mean_words"]
    assert outcome.metrics["finetuned/exact_match"] == 1.0
    assert {rule.name for rule in outcome.verdict.rules} == {"exact_match"}
    assert outcome.verdict.decision.value == "PROMOTE"
    settings["evaluation"]["task_profile"] = "grammar"
    grammar = world["root"] / "grammar.yaml"
    grammar.write_text(yaml.safe_dump(settings))
    strict = decide(outcome.comparison, load_config(grammar))
    assert strict.decision.value == "REJECT"
    assert next(r for r in strict.rules if r.name == "mean_words_ratio").passed is False
