"""Perplexity of text groups and activation drift, on tiny models built from configs and real PEFT
adapters, scored with the transformers backend (vLLM's pass: tests/evaluators/test_eval_vllm.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from support.eval_support import mean_nll
from support.factories import CORPUS, make_lora_adapter, tiny_llama, train_lora_on_texts
from tunelens.config import load_config, with_changes
from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import Candidate
from tunelens.evaluators.engines.transformers import TransformersEngine
from tunelens.evaluators.texts.drift import layer_drift, weight_delta_by_layer
from tunelens.evaluators.texts.perplexity import (compare_group, cumulative_delta_curve,
                                            group_perplexity, perplexity_rule, plan_texts,
                                            summarize_texts, tokenize_texts)
from tunelens.evaluators.texts.groups import TextGroup, load_groups
from tunelens.settings import TransformersSettings

# The task group: sentences of the tiny corpus; "general" text: the same words shuffled.
TASK = sorted(set(CORPUS))[:10]
GENERAL = [" ".join(sorted(s.split(), key=lambda w: (len(w), w))[::-1]) for s in TASK]
SETTINGS = with_changes(None, {"verdict": {"confidence_level": 0.95, "bootstrap_resamples": 500,
                                          "seed": 0}}).verdict


def write_groups(root):
    (root / "task.txt").write_text("\n\n".join(TASK) + "\n")
    folder = root / "general"
    folder.mkdir()
    for i, text in enumerate(GENERAL):
        (folder / f"{i:02d}.txt").write_text(text)
    return root / "task.txt", folder


# --- text groups ---------------------------------------------------------------------------------

def test_text_groups_from_txt_jsonl_and_folder(tmp_path):
    task, general = write_groups(tmp_path)
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TASK[:3])
                                         + "\n\n")
    groups = load_groups([str(task), f"gen={general}", str(tmp_path / "more.jsonl")],
                         guard=["gen"], max_texts=8)
    assert [(g.name, g.guard) for g in groups] == [("task", False), ("gen", True),
                                                   ("more", False)]
    assert list(groups[0].texts) == TASK[:8] and list(groups[1].texts) == GENERAL[:8]
    assert list(groups[2].texts) == TASK[:3]


@pytest.mark.parametrize("case, expect", [
    ("missing", "does not exist"), ("empty", "holds no text"), ("suffix", "use a .txt file"),
    ("jsonl", 'line 1 has no string "text"'), ("twice", "two text groups are named"),
    ("guard", "--guard nope: no text group")])
def test_bad_text_groups_are_one_line_errors(tmp_path, case, expect):
    task, _ = write_groups(tmp_path)
    specs, guard = [str(task)], []
    if case == "missing":
        specs = [str(tmp_path / "nowhere.txt")]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("\n\n  \n")
        specs = [str(tmp_path / "empty.txt")]
    elif case == "suffix":
        (tmp_path / "x.csv").write_text("a\n")
        specs = [str(tmp_path / "x.csv")]
    elif case == "jsonl":
        (tmp_path / "x.jsonl").write_text('{"body": "x"}\n')
        specs = [str(tmp_path / "x.jsonl")]
    elif case == "twice":
        specs = [str(task), f"task={task}"]
    else:
        guard = ["nope"]
    with pytest.raises(TunelensError, match=expect) as error:
        load_groups(specs, guard)
    assert "\n" not in str(error.value)


def test_long_texts_are_cut_to_the_context_and_counted(llama_base, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["the cat sat on the mat"] * 60) + "\n\nthey were happy\n")
    config = load_config()
    plan = plan_texts([str(long)], [], config, [llama_base], max_model_len=64)
    ids = plan.token_ids[str(llama_base)]
    assert [len(i) for i in ids][0] == 63 and len(ids[1]) < 63
    assert ids[0][0] == AutoTokenizer.from_pretrained(llama_base).bos_token_id
    assert plan.cut == {"long": 1} and "keep their first 63" in plan.note()


# --- statistics ----------------------------------------------------------------------------------

def test_cumulative_curve_is_the_mean_running_sum_with_a_band():
    reference = [np.log(np.full(4, 0.5)), np.log(np.full(3, 0.5))]
    other = [np.log(np.full(4, 0.25)), np.log(np.full(3, 0.5))]
    curve = cumulative_delta_curve(reference, other)
    step = math.log(2)  # NLL +log 2 per token on the first text, 0 on the second
    assert curve.mean == pytest.approx([step / 2, step, 3 * step / 2])  # 2 texts reach t=3
    assert curve.texts.tolist() == [2, 2, 2]
    assert np.all(curve.low < curve.mean) and np.all(curve.high > curve.mean)


def test_group_perplexity_weighs_every_token_alike():
    logprobs = [np.log([0.5, 0.5]), np.log([0.25])]
    assert group_perplexity(logprobs) == pytest.approx(math.exp(-(2 * math.log(0.5)
                                                                  + math.log(0.25)) / 3))


def test_perplexity_rule_passes_fails_and_waits():
    group = TextGroup("general", tuple("abcdefgh"), "x", guard=True)
    rng = np.random.default_rng(0)
    reference = [np.log(rng.uniform(0.1, 0.2, 12)) for _ in range(8)]

    def rule(shift):
        other = [r - shift - rng.normal(0, 0.01, r.size) for r in reference]
        return perplexity_rule(compare_group(group, "base", "finetuned", reference, other,
                                             SETTINGS), 0.05)

    assert rule(0.0).passed is True  # unchanged: within the margin
    assert rule(0.3).passed is False  # NLL +0.3 nats/token on every text
    same = perplexity_rule(compare_group(group, "base", "finetuned", reference, reference,
                                         SETTINGS), 0.05)
    assert same.passed is True and "same amount" in same.detail and "n/a" in same.detail


# --- transformers: perplexity and drift ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(llama_base, tmp_path_factory):
    """A LoRA trained a few steps on the task group's texts (real PEFT, AdamW)."""
    return train_lora_on_texts(llama_base, tmp_path_factory.mktemp("trained"), TASK)


def cpu_engine(base_dir):
    """A transformers engine of `base_dir` on the CPU, closed after; each adapter is a PEFT
    adapter of its own label on it."""
    backend = TransformersEngine(base_dir, TransformersSettings(device="cpu", dtype="float32"))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def engine(llama_base):
    yield from cpu_engine(llama_base)


def test_perplexity_is_exp_of_the_mean_nll_transformers_computes(llama_base, trained, engine):
    ids, _ = tokenize_texts(llama_base, TASK[:4], 255)
    for label, adapter in (("base", None), ("finetuned", trained)):
        scored = engine.token_logprobs(Candidate(label, adapter), ids)
        assert [s.size for s in scored] == [len(i) - 1 for i in ids]
        expected = mean_nll(llama_base, adapter, ids)
        assert [-one.mean() for one in scored] == pytest.approx(expected, abs=1e-5)
        total = sum(len(i) - 1 for i in ids)
        weighted = sum(nll * (len(i) - 1) for nll, i in zip(expected, ids)) / total
        assert group_perplexity(scored) == pytest.approx(math.exp(weighted), rel=1e-5)


def test_training_on_a_group_lowers_its_perplexity_and_the_paired_test_says_so(
        llama_base, trained, engine):
    groups = [TextGroup("task", tuple(TASK), "t"), TextGroup("general", tuple(GENERAL), "g", True)]
    result = {}
    for group in groups:
        ids, _ = tokenize_texts(llama_base, list(group.texts), 255)
        base = engine.token_logprobs(Candidate("base"), ids)
        tuned = engine.token_logprobs(Candidate("finetuned", trained), ids)
        result[group.name] = compare_group(group, "base", "finetuned", base, tuned, SETTINGS)
    task = result["task"]
    assert task.ppl_other < task.ppl_reference
    assert task.delta.high < 0  # the whole BCa interval below 0: significantly lower
    assert task.wilcoxon_p < 0.05
    assert task.curve.mean[-1] < 0 and len(task.curve.mean) > 3
    rule = perplexity_rule(task, 0.05)
    assert rule.passed is True and rule.observed == pytest.approx(task.delta.estimate)


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("deep-base"), layers=4)


@pytest.fixture(scope="module")
def deep_engine(deep_base):
    yield from cpu_engine(deep_base)


def test_drift_is_zero_for_an_untrained_adapter(deep_base, deep_engine, tmp_path):
    untrained = make_lora_adapter(deep_base, tmp_path / "b0", r=4, target_modules=["q_proj",
                                                                                   "down_proj"],
                                  init_lora_weights=True)  # PEFT's init: B = 0
    ids, _ = tokenize_texts(deep_base, TASK[:3], 255)
    drift = layer_drift(deep_engine, Candidate("base"), Candidate("untrained", untrained), ids, {})
    assert drift.relative_change == [0.0] * 4
    assert drift.cosine == pytest.approx([1.0] * 4, abs=1e-6)
    assert drift.tokens == sum(len(i) for i in ids)


def test_drift_starts_at_the_only_adapted_layer(deep_base, deep_engine, tmp_path):
    adapter = make_lora_adapter(deep_base, tmp_path / "layer2", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "down_proj"],
                                layers_to_transform=[2])
    weights = weight_delta_by_layer(adapter, load_config())
    assert set(weights) == {2} and weights[2] > 0
    ids, _ = tokenize_texts(deep_base, TASK[:3], 255)
    drift = layer_drift(deep_engine, Candidate("base"), Candidate("layer2", adapter), ids, weights)
    assert drift.relative_change[:2] == [0.0, 0.0]  # before the adapted layer: the base's states
    assert drift.relative_change[2] > 1e-4 and drift.relative_change[3] > 1e-4
    assert drift.cosine[2] < 1 - 1e-7
    assert drift.to_dict()["layers"][2]["weight_delta_fro"] == weights[2]


def test_version_page_shows_each_groups_perplexity():
    from tunelens.evaluators.verdict import Decision, VerdictPart, combine
    from tunelens.evaluators.pages.version_page import comparison_section

    rule = perplexity_rule(compare_group(
        TextGroup("general", tuple("ab"), "x", True), "base", "finetuned",
        [np.log([0.5, 0.5]), np.log([0.5])], [np.log([0.25, 0.25]), np.log([0.25])], SETTINGS),
        0.05)
    verdict = combine("finetuned", 4, [VerdictPart("base", "base", Decision.REJECT, [rule])])
    metrics = {"base/ppl_general": 2.0, "finetuned/ppl_general": 4.0, "base/ppl_task": 9.0,
               "finetuned/ppl_task": 3.0}
    page = comparison_section(verdict=verdict, labels=["base", "finetuned"],
                              names={"finetuned": "v2"}, metrics=metrics, primary="exact_match",
                              test="exact McNemar", rows=4, experiment_id="1", run_id="r" * 32,
                              report_file="tunelens/side_by_side.html")
    assert "| perplexity general | perplexity task |" in page
    assert "| v2 | not measured | not measured | not measured / not measured | not measured | 4 | 3 |" in page
    assert rule.passed is False and "`perplexity_general` FAIL" in page


def test_a_holder_on_another_tokenizer_leaves_its_guard_rule_undecided(llama_base, tmp_path):
    task, general = write_groups(tmp_path)
    plan = plan_texts([str(task), f"general={general}"], ["general"], load_config(), [llama_base],
                      max_model_len=256)
    rng = np.random.default_rng(1)
    logprobs = {label: [np.log(rng.uniform(0.1, 0.9, len(ids) - 1))
                        for ids in plan.token_ids[str(llama_base)]]
                for label in ("base", "finetuned", "production")}
    results = summarize_texts(plan, logprobs, ["base", "finetuned", "production"], "finetuned",
                              ["base", "production"], {"base", "finetuned"}, SETTINGS)
    assert [r.name for r in results.rules("base")] == ["perplexity_general"]
    held = results.rules("production")
    assert held[0].passed is None and "another base's tokenizer" in held[0].detail
    assert "delta/log_ppl_task" in results.metrics
    assert not any(k.startswith("delta_vs_production/") for k in results.metrics)
    assert results.metrics["production/ppl_task"] > 1  # still measured on its own
    assert any("no per-text comparison" in note for note in results.notes)
