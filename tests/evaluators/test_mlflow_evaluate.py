"""Evaluations in MLflow's own terms, on a real MLflow server: the runs carry the machine and the
library versions, the metrics are linked to each version's LoggedModel and to the test set, and
`mlflow.models.evaluate(model="models:/NAME/V", evaluators=["tunelens"])` gives the verdict
`tunelens evaluate` gives on the same rows.

Two real PEFT adapters on the tiny Llama, registered with tunelens.log_adapter; 8 rows whose
targets are v1's own greedy outputs on 6 of them and v2's on 2; transformers generates.
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
from tunelens.errors import TunelensError
from tunelens.evaluators.matrix import compare_versions
from tunelens.evaluators.run import evaluate_version
from tunelens.machine import this_machine
from tunelens.registry.verdicts import VERDICT_TAG
from tunelens.registry.version import logged_model_id
from tunelens.registry.version_handle import VersionHandle, is_handle
from tunelens.registry_hooks.service.log_adapter import log_adapter

NAME = "lineage"
MAX_NEW = 6
MODULES = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tracking, mlflow_server, llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    adapters = {f"v{seed}": make_lora_adapter(llama_base, root / f"v{seed}", seed=seed + 20, r=8,
                                              lora_alpha=16, target_modules=MODULES)
                for seed in (1, 2)}
    for adapter in adapters.values():
        log_adapter(adapter, llama_base, registered_model_name=NAME, tracking_uri=mlflow_server.url)
    prompts = prompt_pool(60, seed=5)
    outputs = {"base": greedy(llama_base, None, prompts, MAX_NEW),
               **{label: greedy(llama_base, adapter, prompts, MAX_NEW)
                  for label, adapter in adapters.items()}}
    inputs, targets = rows_owned_by(outputs, {"v1": 6, "v2": 2}, prompts)
    data = root / "test.jsonl"
    pd.DataFrame({"inputs": inputs, "targets": targets}).to_json(data, orient="records",
                                                                  lines=True)
    settings = {"evaluation": {"backend": "transformers", "generation": {"max_new_tokens": MAX_NEW},
                               "metrics": ["exact_match"], "latency": {"sample_rows": 0},
                               # managed services file experiments in workspace folders
                               "experiment": "/Shared/team-a/tunelens-evaluations"},
                "verdict": {"bootstrap_resamples": 200, "max_latency_ratio": None,
                            "max_memory_ratio": None}}
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(settings))
    return {"client": MlflowClient(mlflow_server.url), "data": data, "policy": policy,
           "config": load_config(policy), "url": mlflow_server.url, "root": root,
           "adapters": adapters, "base": llama_base}


def assert_machine_tags(run):
    """The run names the machine and the library versions it ran with."""
    expected = this_machine().tags()
    tags = run.data.tags
    for key in ("tunelens.machine.cpu_model", "tunelens.machine.cpu_count",
                "tunelens.machine.gpu_count", "tunelens.library.mlflow",
                "tunelens.library.mlflow-tunelens", "tunelens.library.torch"):
        assert tags[key] == expected[key]


def linked_metrics(client, version: str) -> dict[str, list]:
    """The metrics MLflow lists on the version's LoggedModel page, by name."""
    model_id = logged_model_id(client.get_model_version(NAME, version))
    assert model_id, "log_adapter registers a LoggedModel"
    metrics: dict[str, list] = {}
    for metric in client.get_logged_model(model_id).metrics:
        metrics.setdefault(metric.key, []).append(metric)
    return metrics


def test_an_evaluation_run_carries_the_machine_and_its_metrics_are_on_the_logged_model(world):
    client = world["client"]
    outcome = evaluate_version(f"models:/{NAME}/1", world["data"], config=world["config"],
                               client=client)
    assert outcome.metrics["finetuned/exact_match"] == pytest.approx(0.75)
    run = client.get_run(outcome.run_id)
    assert client.get_experiment(run.info.experiment_id).name == \
        "/Shared/team-a/tunelens-evaluations"
    assert_machine_tags(run)
    [dataset] = [d.dataset for d in run.inputs.dataset_inputs]
    metrics = linked_metrics(client, "1")
    assert {"base/exact_match", "finetuned/exact_match", "delta/exact_match"} <= set(metrics)
    [finetuned] = metrics["finetuned/exact_match"]
    assert finetuned.value == pytest.approx(0.75) and finetuned.run_id == outcome.run_id
    assert (finetuned.dataset_name, finetuned.dataset_digest) == (dataset.name, dataset.digest)
    assert dataset.name == "test.jsonl"


def test_a_comparison_links_each_candidates_metrics_to_its_own_logged_model(world):
    client = world["client"]
    outcome = compare_versions([f"models:/{NAME}/1", f"models:/{NAME}/2"], world["data"],
                               config=world["config"], client=client)
    run = client.get_run(outcome.run_id)
    assert_machine_tags(run)
    [dataset] = [d.dataset for d in run.inputs.dataset_inputs]
    assert sorted(m.model_id for m in run.inputs.model_inputs) == sorted(
        logged_model_id(client.get_model_version(NAME, v)) for v in ("1", "2"))
    for version, accuracy in (("1", 0.75), ("2", 0.25)):
        metrics = linked_metrics(client, version)
        [own] = [m for m in metrics[f"v{version}/exact_match"] if m.run_id == outcome.run_id]
        assert own.value == pytest.approx(accuracy)
        assert (own.dataset_name, own.dataset_digest) == (dataset.name, dataset.digest)
        other = "2" if version == "1" else "1"
        assert f"v{other}/exact_match" not in metrics


def test_mlflow_evaluate_of_a_registered_version_gives_the_verdict_tunelens_evaluate_gives(world):
    client, uri = world["client"], f"models:/{NAME}/2"
    # MLflow's pyfunc load of a tunelens-logged version is a handle: the adapter's files, no model
    loaded = mlflow.pyfunc.load_model(uri)
    assert is_handle(loaded) and isinstance(loaded._model_impl, VersionHandle)
    assert "peft_adaptor" in loaded.metadata.flavors["transformers"]
    components = mlflow.transformers.load_model(uri, return_type="components")  # as before
    assert type(components["model"]).__name__.startswith("Peft")
    with pytest.raises(TunelensError, match="evaluators=\\['tunelens'\\]"):
        loaded.predict(pd.DataFrame({"inputs": ["x"]}))

    cli = subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", "--config",
                          str(world["policy"]), "evaluate", uri, "--data", str(world["data"]),
                          "--json"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MLFLOW_TRACKING_URI": world["url"]})
    assert cli.returncode == 0, cli.stderr[-3000:]
    report = json.loads(cli.stdout)
    frame = pd.read_json(world["data"], lines=True)
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(model=uri, data=frame, model_type="text",
                                        targets="targets", evaluators=["tunelens"],
                                        evaluator_config={"tunelens": {
                                            "config": str(world["policy"])}})
    assert client.get_run(run.info.run_id).data.tags[VERDICT_TAG] == report["decision"]
    assert result.metrics["finetuned/exact_match"] == report["metrics"]["finetuned"][
        "exact_match"] == pytest.approx(0.25)
    assert result.metrics["base/exact_match"] == report["metrics"]["base"]["exact_match"]
    assert client.get_model_version(NAME, "2").tags["tunelens.eval.run_id"] == run.info.run_id
    # the metrics are on the version's LoggedModel once, with the test set MLflow logged
    from_run = [m for m in linked_metrics(client, "2")["finetuned/exact_match"]
                if m.run_id == run.info.run_id]
    [dataset] = [d.dataset for d in client.get_run(run.info.run_id).inputs.dataset_inputs]
    assert [(m.dataset_name, m.dataset_digest) for m in from_run] == [(dataset.name,
                                                                       dataset.digest)]


def test_a_version_mlflow_would_load_whole_is_refused_with_what_to_pass(world):
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(world["base"])
    model = PeftModel.from_pretrained(base, world["adapters"]["v1"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(world["base"])
    with mlflow.start_run():
        mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name="model",
                                      task="text-generation", base_model_path=str(world["base"]),
                                      registered_model_name=f"{NAME}-plain",
                                      pip_requirements=["mlflow"])
    frame = pd.read_json(world["data"], lines=True)
    with pytest.raises(TunelensError, match="logged by mlflow.transformers.log_model.*model=None"
                                            ".*'model_uri': 'models:/NAME/VERSION'"):
        mlflow.models.evaluate(model=f"models:/{NAME}-plain/1", data=frame, model_type="text",
                               targets="targets", evaluators=["tunelens"])
