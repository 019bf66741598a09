"""Evaluator pieces that need no engine: datasets, exact match, metrics, prompts, backend choice."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pandas as pd
import pytest

from support.factories import make_lora_adapter, tiny_llama
from tunelens.config import ConfigError, load_config, with_changes
from tunelens.errors import TunelensError
from tunelens.evaluators.engines.choice import choose_backend
from tunelens.evaluators.engines.vllm import vllm_max_lora_rank, vllm_refusal
from tunelens.evaluators.scoring.behaviour import word_edit_distance
from tunelens.evaluators.scoring.metrics import exact_match
from tunelens.evaluators.inputs.prompts import build_prompts, cut_at_stop, generation_settings
from tunelens.evaluators.pages.report import render_report
from tunelens.evaluators.adapter_fit import check_adapter_fits
from tunelens.registry.datasets import load_dataset
from tunelens.registry.version import parse_model_uri

# The examples documented with HF evaluate's exact_match metric (predictions, references, kwargs,
# documented score). `evaluate.load("exact_match")` needs the Hub, so tunelens implements the
# metric; these pin it to evaluate's semantics, and the live check below runs where it can load.
REFS = ["the cat", "theater", "YELLING", "agent007"]
PREDS = ["cat?", "theater", "yelling", "agent"]
EVALUATE_EXAMPLES = [
    (PREDS, REFS, {}, 0.25),
    (PREDS, REFS, dict(regexes_to_ignore=["the ", "yell"], ignore_case=True,
                       ignore_punctuation=True), 0.5),
    (PREDS, REFS, dict(regexes_to_ignore=["the ", "yell", "YELL"], ignore_case=True,
                       ignore_punctuation=True), 0.75),
    (PREDS, REFS, dict(regexes_to_ignore=["the ", "yell", "YELL"], ignore_case=True,
                       ignore_punctuation=True, ignore_numbers=True), 1.0),
    (["The cat sat on the mat?", "Theaters are great.", "It's like comparing apples and oranges."],
     ["The cat sat on the mat.", "Theaters are great.", "It's like comparing oranges and apples."],
     {}, 1 / 3),
]


@pytest.mark.parametrize("predictions, references, options, score", EVALUATE_EXAMPLES)
def test_exact_match_reproduces_evaluates_documented_scores(predictions, references, options,
                                                            score):
    flags = exact_match(predictions, references, strip=False, **options)
    assert flags.mean() == pytest.approx(score)


def test_exact_match_empty_after_normalisation_matches_only_if_equal_before():
    flags = exact_match(["!!", "??", ""], ["!!", "..", ""], strip=False, ignore_punctuation=True)
    assert flags.tolist() == [True, False, True]


def test_exact_match_strip_trims_whitespace_only_when_asked():
    assert exact_match([" yes \n"], ["yes"], strip=True).tolist() == [True]
    assert exact_match([" yes \n"], ["yes"], strip=False).tolist() == [False]


def test_exact_match_agrees_with_evaluate_where_it_loads():
    evaluate = pytest.importorskip("evaluate")
    try:
        metric = evaluate.load("exact_match")
    except Exception as exc:  # offline: the metric script lives on the Hub
        pytest.skip(f"evaluate.load('exact_match') needs the Hub here: {type(exc).__name__}")
    for predictions, references, options, _ in EVALUATE_EXAMPLES:
        expected = metric.compute(predictions=predictions, references=references, **options)
        assert exact_match(predictions, references, strip=False, **options).mean() == \
            pytest.approx(expected["exact_match"])


def test_word_edit_distance_counts_word_insertions_deletions_substitutions():
    assert word_edit_distance("disadvantage is parking", "a disadvantage is that parking") == 2
    assert word_edit_distance("a b c", "a x c") == 1
    assert word_edit_distance("", "a b") == 2
    assert word_edit_distance("same words", "same words") == 0


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_dataset_formats_read_the_same_rows(tmp_path, suffix):
    frame = pd.DataFrame({"inputs": ["she go", "1,5"], "targets": ["she goes", "007"]})
    path = tmp_path / f"data.{suffix}"
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()
    data = load_dataset(path)
    assert data.inputs == ["she go", "1,5"] and data.targets == ["she goes", "007"]


def test_dataset_from_mlflow_dataset_and_custom_columns():
    import mlflow

    frame = pd.DataFrame({"q": ["a"], "a": ["b"]})
    data = load_dataset(mlflow.data.from_pandas(frame), inputs_column="q", targets_column="a")
    assert (data.inputs, data.targets) == (["a"], ["b"])


def test_dataset_errors_are_one_clear_line(tmp_path):
    (tmp_path / "cols.jsonl").write_text(json.dumps({"prompt": "x", "targets": "y"}) + "\n")
    with pytest.raises(TunelensError, match=r"no column 'inputs' \(columns: prompt, targets\)"):
        load_dataset(tmp_path / "cols.jsonl")
    (tmp_path / "empty.csv").write_text("inputs,targets\n")
    with pytest.raises(TunelensError, match="is empty"):
        load_dataset(tmp_path / "empty.csv")
    with pytest.raises(TunelensError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(TunelensError, match="unknown format"):
        load_dataset(tmp_path / "data.xlsx")
    with pytest.raises(TunelensError, match="empty in 1 row"):
        load_dataset(pd.DataFrame({"inputs": ["a", None], "targets": ["b", "c"]}))


def test_generation_settings_from_conf_and_stop_cut():
    config = load_config()
    settings = generation_settings(config.evaluation.generation, 5)
    assert settings.max_new_tokens == 5 and settings.greedy
    assert cut_at_stop("answer\nmore", ("\n", "more")) == ("answer", True)
    assert cut_at_stop("answer", ("\n",)) == ("answer", False)
    with pytest.raises(ConfigError, match=r"prompt_template.*must contain \{input\}"):
        with_changes(config, {"evaluation": {"generation": {"prompt_template": "no placeholder"}}})


def test_chat_template_is_applied_identically_and_required(llama_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    settings = generation_settings(with_changes(None, {"evaluation": {"generation": {
        "prompt_template": "Fix: {input}", "chat_template": True,
        "system_prompt": "be brief"}}}).evaluation.generation)
    with pytest.raises(TunelensError, match="no chat template"):
        build_prompts(["x"], tokenizer, settings)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "{% endfor %}<assistant>")
    assert build_prompts(["she go"], tokenizer, settings) == \
        ["<system>be brief<user>Fix: she go<assistant>"]


def test_max_lora_rank_rounds_up_to_a_supported_value():
    assert vllm_max_lora_rank([4], None) == 8
    assert vllm_max_lora_rank([8, 12], None) == 16
    assert vllm_max_lora_rank([4], 40) == 64
    assert vllm_max_lora_rank([300], None) == 320
    with pytest.raises(TunelensError, match="above vLLM's largest"):
        vllm_max_lora_rank([600], None)


def test_adapters_vllm_refuses_fall_back_to_transformers_with_the_reason(llama_base, tmp_path):
    dora = make_lora_adapter(llama_base, tmp_path / "dora", r=4, target_modules=["q_proj"],
                             use_dora=True)
    saved = make_lora_adapter(llama_base, tmp_path / "mts", r=4, target_modules=["q_proj"],
                              modules_to_save=["lm_head"])
    plain = make_lora_adapter(llama_base, tmp_path / "plain", r=4, target_modules=["q_proj"])
    assert vllm_refusal(plain) is None
    assert "DoRA" in vllm_refusal(dora) and "modules_to_save" in vllm_refusal(saved)
    choice = choose_backend("auto", [plain, dora])
    assert choice.name == "transformers" and "DoRA" in choice.reason
    with pytest.raises(TunelensError, match="vLLM cannot serve .*modules_to_save"):
        choose_backend("vllm", [saved])
    assert choose_backend("auto", [plain]).name == "vllm"
    assert choose_backend("transformers", [plain]).reason == "requested"


def test_a_backend_registered_by_name_is_chosen_by_its_own_rules(llama_base, tmp_path,
                                                                   monkeypatch):
    """A new backend is one module with a BACKEND listed in engines.choice.BACKENDS: asked for by
    name it is chosen, refused with its own reason, or reported missing with its own line."""
    from tunelens.evaluators.engines import choice
    from tunelens.evaluators.engines.interface import Backend

    plain = make_lora_adapter(llama_base, tmp_path / "plain", r=4, target_modules=["q_proj"])
    picky = Backend("picky", title="Picky", available=lambda: True, missing="unused",
                    start=lambda *args, **options: None,
                    refusal=lambda adapter: "it is not picky enough")
    absent = Backend("absent", title="Absent", available=lambda: False,
                     missing="Absent is not installed here", start=lambda *args, **options: None)
    monkeypatch.setitem(choice.BACKENDS, picky.name, picky)
    monkeypatch.setitem(choice.BACKENDS, absent.name, absent)
    assert choose_backend("picky", []) == choice.BackendChoice("picky", "requested")
    with pytest.raises(TunelensError, match="Picky cannot serve .*plain: it is not picky enough"):
        choose_backend("picky", [plain])
    with pytest.raises(TunelensError, match="^Absent is not installed here$"):
        choose_backend("absent", [plain])
    with pytest.raises(TunelensError, match="use auto, vllm, transformers, openai_server, picky or absent"):
        choose_backend("nothing", [])
    assert choose_backend("auto", [plain]).name in ("vllm", "transformers")


def test_adapter_on_the_wrong_base_is_refused(llama_base, llama_adapter, tmp_path):
    check_adapter_fits(llama_base, llama_adapter)  # the right base passes
    narrow = tiny_llama(tmp_path / "narrow", hidden=64, heads=1, kv_heads=1, intermediate=128)
    with pytest.raises(TunelensError, match="does not fit base .*pass the base it was trained on"):
        check_adapter_fits(narrow, llama_adapter)


def test_model_uri_parsing():
    assert parse_model_uri("models:/grammar/3") == ("grammar", "3", None)
    assert parse_model_uri("models:/grammar@production") == ("grammar", None, "production")
    with pytest.raises(TunelensError, match="not a registered model URI"):
        parse_model_uri("runs:/abc/model")


def test_plugin_is_registered_and_only_runs_when_invited():
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry

    from mlflow.models.evaluation.base import _get_model_from_function

    evaluator = _model_evaluation_registry.get_evaluator("tunelens")
    assert evaluator.can_evaluate(model_type="text", evaluator_config={"model_uri": "models:/m/1"})
    # no config may come with a tunelens handle as the model (MLflow does not show the model
    # here); another evaluator's settings, applied to all by evaluators=None, never do
    assert evaluator.can_evaluate(model_type="text", evaluator_config={})
    assert not evaluator.can_evaluate(model_type="text",
                                      evaluator_config={"log_model_explainability": False})
    assert not evaluator.can_evaluate(model_type="classifier", evaluator_config=None)
    # then neither a version named nor a tunelens handle handed over: nothing runs, no error
    assert evaluator.evaluate(model_type="text", dataset=None, run_id="r",
                              evaluator_config={}) is None
    not_ours = _get_model_from_function(lambda frame: frame)
    assert evaluator.evaluate(model=not_ours, model_type="text", dataset=None, run_id="r",
                              evaluator_config={}) is None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _small_report() -> str:
    table = pd.DataFrame({"row": [0, 1, 2], "input": ["a", "b", "c<d"], "target": ["A", "B", "C"],
                          "base_output": ["A", "x", "C"], "finetuned_output": ["A", "B", "c<d"]})
    for label in ("base", "finetuned"):
        table[f"{label}_exact_match"] = table[f"{label}_output"] == table["target"]
        table[f"{label}_words"] = 1
    metrics = {"base/exact_match": 2 / 3, "finetuned/exact_match": 2 / 3,
               "base/mean_words": 1.0, "finetuned/mean_words": 1.0}
    return render_report(title="t", labels=["base", "finetuned"], table=table, metrics=metrics,
                         verdict_lines=["exact_match: undecided"], decision="INCONCLUSIVE",
                         notes=["n"])


def test_report_is_self_contained_and_marks_differing_rows():
    page = _small_report()
    assert "http://" not in page and "https://" not in page and "src=" not in page
    assert page.count('data-differs="1"') == 2 and page.count('data-differs="0"') == 1
    assert "c&lt;d" in page and "c<d" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_differences_only_filter_hides_equal_rows_in_a_real_browser(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(_small_report())
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", f"--user-data-dir={profile}",
             "--virtual-time-budget=3000", "--dump-dom", path.as_uri() + "#differences"],
            capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and 'id="shown">2<' in dom
    rows = dom.split('<tbody>')[-1]
    assert re.search(r'<tr data-differs="0" style="display: none;">', rows)
    assert len(re.findall(r'<tr data-differs="1"', rows)) == 2 and rows.count("none") == 1
