"""Evaluation on registration is a job of its own (tunelens.evaluation.*): queued when the
analysis is done, claimed once, leased, resumed after a killed worker, failed at once on a bad
test set, with the text groups of tunelens.eval_texts scored for perplexity; real `tunelens hooks`
processes against a real MLflow server, the transformers backend on the tiny llama."""
from __future__ import annotations

import json
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from support.eval_support import greedy, prompt_pool, rows_owned_by
from support.hooks_support import HooksProcess, register, wait_status
from tunelens.registry.verdicts import EVAL_RUN_TAG, REASONS_TAG, VERDICT_TAG
from tunelens.registry_hooks.service.evaluation import (EVAL_DATASET_TAG, EVAL_GUARD_TAG,
                                                       EVAL_TEXTS_TAG, evaluation_runs)
from tunelens.registry_hooks.service.state import EVALUATION, FINAL, STATUS, Lease
from tunelens.config import load_config

SECRET = "e" * 32
MAX_NEW = 2


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    data = tmp_path_factory.mktemp("eval-data") / "test.jsonl"
    data.write_text("".join(json.dumps({"inputs": f"she go to school {i}",
                                        "targets": "she goes to school"}) + "\n"
                            for i in range(2)))
    return data


def _config(path, verdict=None, evaluation=None, **hooks):
    path.write_text(yaml.safe_dump({
        # no evaluate_on_registration: the registered model's tunelens.eval_dataset is the opt-in
        "hooks": {"lease_seconds": 30, "poll_interval": 2, "models": ["*"], **hooks},
        # the cheapest real evaluation: two tokens, one metric, no served-latency sample
        "evaluation": {"backend": "transformers", "generation": {"max_new_tokens": MAX_NEW},
                       "metrics": ["exact_match"], "latency": {"sample_rows": 0},
                       "texts": {"drift_texts": 2}, **(evaluation or {})},
        "verdict": verdict or {},
        "promotion": {"auto_promote": True}}))
    return path


def _hooks(server, tmp_path, name, verdict=None, evaluation=None, **hooks) -> HooksProcess:
    return HooksProcess(server.url, _config(tmp_path / f"{name}.yaml", verdict, evaluation,
                                            **hooks),
                        tmp_path / f"{name}.log", secret=SECRET, webhook=False)


def _model(client, name, data, base, texts=None):
    """A registered model with a test set (and, given `texts`, a text group that must not get
    worse, scored for perplexity)."""
    tags = {EVAL_DATASET_TAG: str(data), "tunelens.base_model": str(base)}
    if texts is not None:
        tags |= {EVAL_TEXTS_TAG: f"general={texts}", EVAL_GUARD_TAG: "general"}
    client.create_registered_model(name, tags=tags)


def _wait_evaluation(client, name, version, hooks, timeout=300, statuses=FINAL) -> dict:
    """The version's tags once its evaluation's status is in `statuses` (and, for a final one,
    its lease is gone too: the worker deletes it right after the status)."""
    deadline = time.monotonic() + timeout
    while True:
        tags = client.get_model_version(name, version).tags
        if tags.get(EVALUATION.status) in statuses and not (
                EVALUATION.lease in tags and tags[EVALUATION.status] in FINAL):
            return tags
        assert time.monotonic() < deadline, (tags, [h.log_tail() for h in hooks])
        time.sleep(0.2)


def _assert_evaluated_once(client, name, version, tags, attempt="1"):
    """Status done, one live evaluation run (finished, made by `attempt`), the verdict on the
    version pointing at it, and no internal state left."""
    assert tags[EVALUATION.status] == "done", tags
    runs = evaluation_runs(client, load_config(), name, version)
    assert [r.info.run_id for r in runs] == [tags[EVALUATION.run_id]] == [tags[EVAL_RUN_TAG]]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[EVALUATION.attempt] == attempt
    assert runs[0].data.tags[VERDICT_TAG] == tags[VERDICT_TAG]
    assert tags[VERDICT_TAG] in {"PROMOTE", "REJECT", "INCONCLUSIVE"} and tags[REASONS_TAG]
    assert runs[0].data.metrics["finetuned/exact_match"] >= 0
    assert EVALUATION.lease not in tags and EVALUATION.error not in tags
    assert (f"### tunelens evaluation on registration\n\ndone: verdict {tags[VERDICT_TAG]}"
            in client.get_model_version(name, version).description)


def _promoted_exactly_on_promote(client, name, version, verdict):
    """auto-promote ran before the job's `done`: the alias is the version exactly on PROMOTE."""
    holder = client.get_registered_model(name).aliases.get("production")
    assert (holder == version) == (verdict == "PROMOTE"), (verdict, holder)


def _logged(server, path) -> str:
    """`path` logged as a run artifact on `server`, named by its runs:/ URI."""
    client = MlflowClient(server.url)
    run = client.create_run(client.create_experiment(f"test-sets-{path.stem}"))
    client.log_artifact(run.info.run_id, str(path))
    return f"runs:/{run.info.run_id}/{path.name}"


def test_two_workers_evaluate_each_version_once_and_a_bad_test_set_fails_at_once(
        mlflow_server, tmp_path, llama_base, llama_adapter, test_set):
    client = MlflowClient(mlflow_server.url)
    general = tmp_path / "general.txt"
    general.write_text("the cat sat on the mat\n\nthey were happy\n\ni have an apple\n")
    # The test set as an MLflow artifact URI, fetched by the worker.
    _model(client, "fleet-eval", _logged(mlflow_server, test_set), llama_base, texts=general)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "she go", "answer": "she goes"}) + "\n")
    _model(client, "bad-eval", bad, llama_base)
    client.create_registered_model("no-eval")  # no test set: analysed, never evaluated
    workers = [_hooks(mlflow_server, tmp_path, f"fleet-{i}") for i in range(2)]
    try:
        versions = [register(client, "fleet-eval", llama_adapter) for _ in range(2)]
        bad_version = register(client, "bad-eval", llama_adapter)
        plain = register(client, "no-eval", llama_adapter)
        for version in versions:
            tags = _wait_evaluation(client, "fleet-eval", version, workers)
            assert tags[STATUS] == "done"
            _assert_evaluated_once(client, "fleet-eval", version, tags)
            metrics = client.get_run(tags[EVAL_RUN_TAG]).data.metrics
            assert metrics["finetuned/ppl_general"] > 1 and "drift/relative_change_max" in metrics
            assert "perplexity_general" in tags[REASONS_TAG]
        logs = "".join(w.log_tail(1_000_000) for w in workers)
        for version in versions:  # claimed once across the fleet
            assert logs.count(f"evaluating fleet-eval v{version} (attempt") == 1, logs[-3000:]

        tags = _wait_evaluation(client, "bad-eval", bad_version, workers)
        error = tags[EVALUATION.error]
        assert tags[EVALUATION.status] == "failed" and tags[STATUS] == "done"
        assert "no column" in error and "\n" not in error and "Traceback" not in error
        assert "failed: " in client.get_model_version("bad-eval", bad_version).description
        time.sleep(2.5)  # another scan each: a failed evaluation is final, never retried
        logs = "".join(w.log_tail(1_000_000) for w in workers)
        assert logs.count(f"evaluating bad-eval v{bad_version} (attempt") == 1
        assert client.get_model_version("bad-eval", bad_version).tags[EVALUATION.status] == "failed"
        assert evaluation_runs(client, load_config(), "bad-eval", bad_version) == []

        plain_tags = wait_status(client, "no-eval", plain)
        assert plain_tags[STATUS] == "done" and EVALUATION.status not in plain_tags
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0], workers[0].log_tail()


def test_worker_killed_mid_evaluation_is_resumed_with_one_run(mlflow_server, tmp_path,
                                                              llama_base, llama_adapter, test_set):
    client = MlflowClient(mlflow_server.url)
    _model(client, "crash-eval", test_set, llama_base)
    # Analysed already (the test above goes through the analysis): only the evaluation is left.
    version = register(client, "crash-eval", llama_adapter)
    client.set_model_version_tag("crash-eval", version, STATUS, "done")
    client.set_model_version_tag("crash-eval", version, EVALUATION.status, "queued")
    first = _hooks(mlflow_server, tmp_path, "first", lease_seconds=5)
    _wait_evaluation(client, "crash-eval", version, [first], statuses={"running"})
    assert "running (attempt 1" in client.get_model_version("crash-eval", version).description
    children = psutil.Process(first.process.pid).children(recursive=True)
    first.kill()
    tags = client.get_model_version("crash-eval", version).tags
    assert tags[EVALUATION.status] == "running", "the evaluation finished before the kill"
    assert Lease.parse(tags[EVALUATION.lease]).attempt == 1
    _, alive = psutil.wait_procs(children, timeout=15)  # its child processes end with it
    assert alive == [], alive
    # The run a killed attempt leaves when it dies while logging (the kill above may land before
    # the evaluator opened its run): the next attempt deletes it.
    experiment = client.get_experiment_by_name(load_config().evaluation.experiment)
    leftover = client.create_run(
        experiment.experiment_id if experiment else client.create_experiment("tunelens-evaluations"),
        tags={"tunelens.model": f"models:/crash-eval/{version}", EVALUATION.attempt: "1"}).info.run_id

    second = _hooks(mlflow_server, tmp_path, "second", lease_seconds=5)
    try:
        tags = _wait_evaluation(client, "crash-eval", version, [second])
        _assert_evaluated_once(client, "crash-eval", version, tags, attempt="2")
        assert client.get_run(leftover).info.lifecycle_stage == "deleted"
        _promoted_exactly_on_promote(client, "crash-eval", version, tags[VERDICT_TAG])
    finally:
        assert second.stop() == 0, second.log_tail()


def test_a_promote_verdict_on_registration_moves_the_alias(mlflow_server, tmp_path, llama_base,
                                                           llama_adapter):
    """Each target is the adapter's own greedy answer and never the base's: a significant gain.
    With no served figures to judge (latency and memory limits off), the verdict is PROMOTE, and
    auto-promote moves `production` to the version before the job is done."""
    client = MlflowClient(mlflow_server.url)
    prompts = prompt_pool(40, seed=5)
    outputs = {"base": greedy(llama_base, None, prompts, MAX_NEW),
               "finetuned": greedy(llama_base, llama_adapter, prompts, MAX_NEW)}
    inputs, targets = rows_owned_by(outputs, {"finetuned": 12}, prompts)
    data = tmp_path / "owned.jsonl"
    data.write_text("".join(json.dumps({"inputs": i, "targets": t}) + "\n"
                            for i, t in zip(inputs, targets)))
    _model(client, "auto-eval", data, llama_base)
    worker = _hooks(mlflow_server, tmp_path, "auto",
                    verdict={"max_latency_ratio": None, "max_memory_ratio": None,
                             "bootstrap_resamples": 200})
    try:
        version = register(client, "auto-eval", llama_adapter)
        tags = _wait_evaluation(client, "auto-eval", version, [worker])
        _assert_evaluated_once(client, "auto-eval", version, tags)
        assert tags[VERDICT_TAG] == "PROMOTE", tags[REASONS_TAG]
        assert client.get_registered_model("auto-eval").aliases.get("production") == version
        assert tags["tunelens.verdict.holder"] == "production=none"
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_a_deployment_that_cannot_be_reached_gives_the_version_an_inconclusive_verdict(
        mlflow_server, tmp_path, llama_base, llama_adapter, test_set):
    """Evaluating on an endpoint whose server is down: the job is done, its result the verdict
    INCONCLUSIVE whose reason names the server, and auto-promote leaves the alias alone."""
    client = MlflowClient(mlflow_server.url)
    _model(client, "down-eval", test_set, llama_base)
    worker = _hooks(mlflow_server, tmp_path, "down",
                    evaluation={"backend": "openai_server",
                                "endpoint": {"url": "http://127.0.0.1:9"}})
    try:
        version = register(client, "down-eval", llama_adapter)
        tags = _wait_evaluation(client, "down-eval", version, [worker])
        assert tags[EVALUATION.status] == "done" and EVALUATION.error not in tags, tags
        assert tags[VERDICT_TAG] == "INCONCLUSIVE"
        assert "measured undecided: cannot reach the server at http://127.0.0.1:9" in \
            tags[REASONS_TAG]
        assert [r.info.run_id for r in evaluation_runs(client, load_config(), "down-eval",
                                                       version)] == [tags[EVAL_RUN_TAG]]
        assert "production" not in client.get_registered_model("down-eval").aliases
    finally:
        assert worker.stop() == 0, worker.log_tail()
