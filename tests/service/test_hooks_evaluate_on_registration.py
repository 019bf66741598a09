"""With hooks.evaluate_on_registration and promotion.auto_promote on, registering a
version of a model tagged tunelens.eval_dataset gets it analysed, evaluated (with the text groups of
tunelens.eval_texts for perplexity) and (on PROMOTE) promoted by the hook worker alone."""
from __future__ import annotations

import json
import time

import yaml
from mlflow import MlflowClient

from support.hooks_support import HooksProcess, register, wait_status
from tunelens.evaluators.verdict import EVAL_RUN_TAG, VERDICT_TAG
from tunelens.registry_hooks.service.worker import EVAL_DATASET_TAG, EVAL_GUARD_TAG, EVAL_TEXTS_TAG


def test_worker_evaluates_and_promotes_after_the_analysis(tmp_path, mlflow_server, llama_base,
                                                          llama_adapter):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"inputs": f"she go to school {i}",
                                        "targets": "she goes to school"}) + "\n" for i in range(4)))
    config = tmp_path / "conf.yaml"
    config.write_text(yaml.safe_dump({
        "hooks": {"lease_seconds": 30, "poll_interval": 2, "evaluate_on_registration": True,
                  "models": ["*"]},
        "evaluation": {"backend": "transformers", "generation": {"max_new_tokens": 4},
                       "texts": {"drift_texts": 2}},
        "promotion": {"auto_promote": True}}))
    general = tmp_path / "general.txt"
    general.write_text("the cat sat on the mat\n\nthey were happy\n\ni have an apple\n")
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model("auto-eval", tags={EVAL_DATASET_TAG: str(data),
                                                      "tunelens.base_model": str(llama_base),
                                                      EVAL_TEXTS_TAG: str(general),
                                                      EVAL_GUARD_TAG: "general"})
    hooks = HooksProcess(mlflow_server.url, config, tmp_path / "hooks.log", secret="s" * 32,
                         webhook=False)
    try:
        version = register(client, "auto-eval", llama_adapter)
        assert wait_status(client, "auto-eval", version, timeout=600)["tunelens.analysis.status"] \
            == "done", hooks.log_tail()
        deadline = time.monotonic() + 600
        while VERDICT_TAG not in (tags := client.get_model_version("auto-eval", version).tags):
            assert "tunelens.eval.error" not in tags, tags["tunelens.eval.error"]
            assert time.monotonic() < deadline, hooks.log_tail()
            time.sleep(1)
        metrics = client.get_run(tags[EVAL_RUN_TAG]).data.metrics
        assert metrics["finetuned/exact_match"] >= 0
        assert metrics["finetuned/ppl_general"] > 1 and "drift/relative_change_max" in metrics
        assert "perplexity_general" in tags["tunelens.verdict.reasons"]
        # auto_promote runs right after the verdict tag: the alias appears exactly on PROMOTE.
        promoted = tags[VERDICT_TAG] == "PROMOTE"
        deadline = time.monotonic() + (120 if promoted else 3)
        while time.monotonic() < deadline:
            aliases = client.get_registered_model("auto-eval").aliases
            if promoted and aliases.get("production") == version:
                break
            time.sleep(0.5)
        assert (aliases.get("production") == version) == promoted, (tags[VERDICT_TAG], aliases)
    finally:
        hooks.stop()
