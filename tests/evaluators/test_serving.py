"""Latency and memory as served: the rules on known timings, real transformers servers on a tiny
model (memory against its parameter count), and the same verdict idle and under CPU load.

The vLLM servers run in tests/evaluators/test_serving_vllm.py (several engine starts).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from tunelens.config import ConfigError, load_config, with_changes
from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import Candidate, MemoryProfile
from tunelens.evaluators.inputs.prompts import generation_settings
from tunelens.evaluators.timing.profiles import LatencyProfile, ServingSettings
from tunelens.evaluators.timing.rules import (LatencyJudgement, compare_latency, latency_rule,
                                              memory_rules)
from tunelens.evaluators.timing.schedule import ServedTiming, sample_rows, windows_of

SENTENCES = ["she go to school every day", "they was happy", "i has a apple", "he dont like it",
             "the cat sat on the mat", "correct the grammar of this sentence"] * 7
MAX_NEW = 8
LORA_TARGETS = {"q_proj": ("hidden", "hidden"), "k_proj": ("hidden", "hidden"),
                "v_proj": ("hidden", "hidden"), "o_proj": ("hidden", "hidden"),
                "gate_proj": ("hidden", "inter"), "up_proj": ("hidden", "inter"),
                "down_proj": ("inter", "hidden")}


def profile(label, e2e, repeat=None, core_wait=None) -> LatencyProfile:
    n = len(e2e)
    return LatencyProfile(label, "test", "transformers", tuple(range(n)), tuple(e2e),
                          tuple([1.0] * n), tuple([8] * n), 0,
                          repeat_e2e_ms=None if repeat is None else tuple(repeat),
                          core_wait=None if core_wait is None else tuple(core_wait),
                          repeat_core_wait=None if repeat is None or core_wait is None
                          else tuple(core_wait))


RULE = dict(level=0.95, n_resamples=2000, seed=0)


# --- The rules on known timings -------------------------------------------------------------


def test_latency_rule_passes_fails_and_waits_on_noise():
    rng = np.random.default_rng(0)
    base, again = rng.normal(100, 2, 20), rng.normal(100, 2, 20)
    same, slow = rng.normal(100, 2, 20), rng.normal(160, 2, 20)
    assert latency_rule(profile("base", base, again), profile("c", same), 1.2, **RULE).passed
    failed = latency_rule(profile("base", base, again), profile("c", slow), 1.2, **RULE)
    assert failed.passed is False and "above the limit and the noise" in failed.detail
    # The same slow candidate on a machine whose base differs from itself by as much: not a fail.
    noisy_again = again * np.where(np.arange(20) % 2 == 0, 1.0, 2.6)
    noisy = latency_rule(profile("base", base, noisy_again), profile("c", slow), 1.2, **RULE)
    assert noisy.passed is None
    assert compare_latency(profile("base", base, noisy_again), profile("c", slow),
                           **RULE).noise_factor > 1.6


def test_latency_rule_fails_a_clear_slowdown_through_a_busy_machines_scatter():
    """Every request scattered by load (lognormal, sigma 0.4: x0.45 to x2.2), the base's median
    still about x1 against itself: the floor is that median, so a candidate x1.5 slower fails, as
    it does on a quiet machine. The far end of the A/A interval (x1.28 here) would have left it
    undecided: the ratio's own interval already carries the scatter."""
    rng = np.random.default_rng(2)
    scatter = lambda: np.exp(rng.normal(0, 0.4, 40))  # noqa: E731
    base, again, slow = 100 * scatter(), 100 * scatter(), 150 * scatter()
    compared = compare_latency(profile("base", base, again), profile("c", slow), **RULE)
    assert compared.noise_factor < 1.05 and compared.noise_bound > compared.low > 1.2
    rule = latency_rule(profile("base", base, again), profile("c", slow), 1.2, **RULE)
    assert rule.passed is False


def test_latency_rule_same_status_when_the_machine_slows_down_steadily():
    """A load that slows every request x2.5 and drifts by 10 % a pass (base, candidate, base)
    changes neither the ratio nor the status: the drift cancels between the two base passes."""
    rng = np.random.default_rng(1)
    base, again = rng.normal(100, 3, 20), rng.normal(100, 3, 20)
    for candidate, expected in ((rng.normal(105, 3, 20), True), (rng.normal(170, 3, 20), False)):
        idle = latency_rule(profile("base", base, again), profile("c", candidate), 1.2, **RULE)
        loaded = latency_rule(profile("base", base * 2.5, again * 2.5 * 1.21),
                              profile("c", candidate * 2.5 * 1.1), 1.2, **RULE)
        assert idle.passed is expected and loaded.passed is expected
        assert loaded.observed == pytest.approx(idle.observed, rel=1e-9)


def test_latency_rule_leaves_out_rows_that_waited_for_a_core_and_refuses_an_oversubscribed_run():
    """Rows whose requests' threads waited for a core more than max_core_wait of their runnable
    time are left out (here the rows where the candidate looked fast only because the base
    queued); with fewer than half a round's rows left the rule does not judge at all."""
    rng = np.random.default_rng(3)
    base, again, slow = rng.normal(100, 2, 20), rng.normal(100, 2, 20), rng.normal(160, 2, 20)
    waits = np.where(np.arange(20) < 6, 0.6, 0.02)
    queued = np.where(np.arange(20) < 6, 3.0, 1.0)  # the base waited x3 in those rows
    args = (profile("base", base * queued, again * queued, waits), profile("c", slow, None, waits),
            1.2)
    judged = latency_rule(*args, **RULE, max_core_wait=0.4)
    assert judged.passed is False and "in 6 of 20 rows" in judged.detail
    assert judged.observed == pytest.approx(np.median(slow[6:] / np.sqrt(base[6:] * again[6:])))
    blind = latency_rule(*args, **RULE)  # every row counts: the queued base rows pull it down
    assert blind.observed < judged.observed
    swamped = np.where(np.arange(20) < 11, 0.6, 0.02)
    refused = latency_rule(profile("base", base, again, swamped), profile("c", slow, None, swamped),
                           1.2, **RULE, max_core_wait=0.4)
    assert refused.passed is None and refused.detail.startswith("NOT JUDGED: in 11 of 20 rows")
    # Three rounds of 20 rows on a machine busy in bursts: 11 of 60 rows clear half a round.
    rounds = [np.tile(values, 3) for values in (base, again, slow)]
    bursts = np.where(np.arange(60) < 49, 0.6, 0.02)
    three_rounds = latency_rule(replace(profile("base", *rounds[:2], bursts), round_rows=20),
                                profile("c", rounds[2], None, bursts), 1.2, **RULE,
                                max_core_wait=0.4)
    assert three_rounds.passed is False and "in 49 of 60 rows" in three_rounds.detail
    unmeasured = latency_rule(profile("base", base, again, [float("nan")] * 20),
                              profile("c", slow), 1.2, **RULE, max_core_wait=0.4)
    assert unmeasured.passed is False and "waited" not in unmeasured.detail


def test_scheduler_times_see_a_thread_wait_for_a_core_on_an_oversubscribed_machine():
    """The waiting share of a busy thread, read from Linux's schedstat: about 0 with a core to
    itself, near 1/2 or more with a busy process per core plus one competing for them."""
    import time

    from tunelens.evaluators.timing.core_wait import SchedulerTimes, waiting_share

    def spin_share() -> float:
        before = SchedulerTimes.of([os.getpid()])
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass
        return waiting_share(before, SchedulerTimes.of([os.getpid()]))

    if SchedulerTimes.of([os.getpid()]) is None:
        pytest.skip("this kernel keeps no per-thread scheduler statistics")
    quiet = spin_share()
    burners = burn_cores((os.cpu_count() or 2) + 1)
    try:
        time.sleep(0.2)
        busy = spin_share()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert quiet < 0.15 and busy > 0.3, (quiet, busy)
    assert np.isnan(waiting_share(None, None))


def test_request_path_is_this_process_the_workers_and_the_processes_between_them():
    """vLLM's shape: this process starts the engine core, which starts the workers; a process this
    one started beside them (a busy loop) is not on the path."""
    import time

    import psutil

    from tunelens.evaluators.engines.vllm import request_path

    engine_core = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)")])
    bystander = burn_cores(1)[0]
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(engine_core.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = psutil.Process(engine_core.pid).children()[0].pid
        assert request_path((worker,)) == tuple(sorted((os.getpid(), engine_core.pid, worker)))
        assert request_path((bystander.pid,)) == tuple(sorted((os.getpid(), bystander.pid)))
    finally:
        for process in psutil.Process(engine_core.pid).children(recursive=True):
            process.kill()
        for process in (engine_core, bystander):
            process.kill()
            process.wait()


def test_latency_comparison_needs_both_base_passes_and_the_same_rows():
    with pytest.raises(TunelensError, match="before and after"):
        compare_latency(profile("base", [1.0, 2.0]), profile("c", [1.0, 2.0]), **RULE)
    shifted = replace(profile("c", [1.0, 2.0]), rows=(5, 6))
    with pytest.raises(TunelensError, match="different rows"):
        compare_latency(profile("base", [1.0, 2.0], [1.0, 2.0]), shifted, **RULE)


def test_memory_rules_on_totals_and_unmeasured_figures():
    def memory(label, weights, adapter, kv):
        return MemoryProfile(label, "test", "transformers", weights, adapter, 0, kv, "test")

    base, candidate = memory("base", 1000, 0, 100), memory("c", 1000, 300, 100)
    ratio, gib = memory_rules(base, candidate, 1.25, 1.0)
    assert ratio.observed == pytest.approx(1400 / 1100) and ratio.passed is False
    assert gib.passed is True
    unknown = replace(candidate, kv_cache_peak_bytes=None, not_measured=("kv: no cache",))
    ratio, = memory_rules(base, unknown, 1.25, None)
    assert ratio.passed is None and "kv: no cache" in ratio.detail


def test_serving_settings_are_checked():
    config = load_config()
    assert ServingSettings.from_config(config.evaluation) == ServingSettings("adapter", 20, 3, 3,
                                                                             (1, 4, 16))
    for bad, message in (({"served": "quantized"}, "evaluation.served"),
                         ({"latency": {"sample_rows": 1, "warmup_requests": 0}}, "sample_rows"),
                         ({"latency": {"sample_rows": 4, "warmup_requests": -1}}, "warmup"),
                         ({"latency": {"sample_rows": 4, "max_rounds": 0}}, "max_rounds"),
                         ({"latency": {"sample_rows": 4, "concurrency": [0]}}, "concurrency")):
        with pytest.raises(ConfigError, match=message):
            with_changes(config, {"evaluation": bad})
    assert sample_rows(100, 5) == [0, 25, 50, 74, 99] and sample_rows(3, 5) == [0, 1, 2]
    assert ServingSettings.from_config(with_changes(config, {"evaluation": {"latency": {
        "concurrency": [4, 2]}}}).evaluation).concurrency == (1, 2, 4)


def test_windows_send_every_row_and_fill_the_last_window_from_the_first_rows():
    assert windows_of([3, 5, 7, 9], 1) == [(3,), (5,), (7,), (9,)]
    assert windows_of([3, 5, 7, 9], 2) == [(3, 5), (7, 9)]
    assert windows_of([3, 5, 7], 2) == [(3, 5), (7, 3)]
    assert windows_of([3, 5], 4) == [(3, 5, 3, 5)]


def test_the_judged_level_must_be_timed(tmp_path):
    override = tmp_path / "conf.yaml"
    override.write_text("verdict:\n  latency_at: 8\n")
    with pytest.raises(ConfigError, match="latency_at 8 is not a timed level"):
        load_config(override)


# --- Real transformers servers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(llama_base, llama_adapter, tmp_path_factory):
    """Served timing on the tiny Llama and its adapter: measure(served_as, rows). With
    transformers every model is timed after the generation model is gone, in one process."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    evaluation = load_config().evaluation
    settings = generation_settings(evaluation.generation, MAX_NEW)
    candidates = [Candidate("base"), Candidate("finetuned", llama_adapter, "1")]

    def measure(served_as: str, rows: int = 6, judgement=None, max_rounds: int = 3,
                concurrency: tuple[int, ...] = (1,)):
        setup = with_changes(None, {"evaluation": {
            "served": served_as, "latency": {"sample_rows": rows, "warmup_requests": 2,
                                             "max_rounds": max_rounds,
                                             "concurrency": list(concurrency)}}}).evaluation
        timing = ServedTiming(llama_base, candidates, ids, tokenizer, settings, setup,
                              "transformers", max_model_len=256,
                              work_dir=tmp_path_factory.mktemp("served"), judgement=judgement)
        assert not timing.uses_generation_engine
        return timing.after_generation()

    return {"measure": measure, "ids": ids, "base": llama_base}


def llama_sizes(base_dir) -> dict:
    config = AutoConfig.from_pretrained(base_dir)
    return {"hidden": config.hidden_size, "inter": config.intermediate_size,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim}


def expected_weight_elements(size: dict) -> int:
    """Embeddings + lm_head, and per layer q, k, v, o, the MLP's three and two norms; final norm."""
    h, i = size["hidden"], size["inter"]
    return 2 * size["vocab"] * h + size["layers"] * (4 * h * h + 3 * h * i + 2 * h) + h


def expected_adapter_elements(size: dict, r: int = 8) -> int:
    return size["layers"] * sum(r * (size[a] + size[b]) for a, b in LORA_TARGETS.values())


def test_transformers_memory_matches_parameters_times_dtype(served):
    figures = served["measure"]("adapter")
    size = llama_sizes(served["base"])
    base, candidate = figures.memory_of("base"), figures.memory_of("finetuned")
    assert base.weights_bytes == pytest.approx(expected_weight_elements(size) * 4, rel=0.01)
    assert candidate.weights_bytes == base.weights_bytes
    assert candidate.adapter_bytes == expected_adapter_elements(size) * 4 and base.adapter_bytes == 0
    # The KV cache of the longest request: K and V, every layer, every position but the last token.
    longest = max(len(served["ids"][row]) + tokens - 1 for row, tokens in zip(
        figures.latency_of("base").rows, figures.latency_of("base").output_tokens))
    assert base.kv_cache_peak_bytes == (2 * size["layers"] * size["kv_heads"] * size["head_dim"]
                                        * longest * 4)
    # Base and candidate differ by the adapter, up to their own KV caches.
    difference = ((candidate.total_bytes - candidate.kv_cache_peak_bytes)
                  - (base.total_bytes - base.kv_cache_peak_bytes))
    assert difference == candidate.adapter_bytes
    assert base.peak_allocated_bytes is None and "allocator" in base.not_measured[0]
    # Every figure of the profile is what the CPU run can give, in GiB for MLflow.
    assert candidate.metrics()["memory_adapter_gib"] == pytest.approx(candidate.adapter_bytes / 2**30)


def test_transformers_served_latency_profiles(served):
    figures = served["measure"]("merged")
    base, candidate = figures.latency_of("base"), figures.latency_of("finetuned")
    assert base.rows == candidate.rows == tuple(sample_rows(len(SENTENCES), 6))
    assert base.repeat_e2e_ms is not None and candidate.repeat_e2e_ms is None
    for p in (base, candidate):
        assert all(0 < t < e for t, e in zip(p.ttft_ms, p.e2e_ms))
        assert np.all(np.isfinite(p.tpot_ms[np.asarray(p.output_tokens) >= 2]))
        assert p.e2e_p50_ms <= p.e2e_p95_ms and p.load_average is not None
    assert "merged" in candidate.served_as and "no LoRA" in base.served_as
    # Merged: the candidate is the base's architecture with other weights, and no adapter.
    merged = figures.memory_of("finetuned")
    assert merged.weights_bytes == figures.memory_of("base").weights_bytes
    assert merged.adapter_bytes == 0 and merged.lora_buffers_bytes == 0
    assert "finetuned" in figures.notes[0] and "concurrency 1" in figures.notes[0]


def test_transformers_under_load_one_caller_thread_per_request(served):
    """At 2 requests in flight each model gets its own figures, on the same rows as at 1, the
    base timed before and after the candidate as at concurrency 1."""
    figures = served["measure"]("adapter", rows=4, concurrency=(1, 2))
    assert figures.levels == (1, 2)
    for label in ("base", "finetuned"):
        alone, loaded = figures.at(label, 1), figures.at(label, 2)
        assert loaded.concurrency == 2 and loaded.n_requests == 4 and len(loaded.window_s) == 2
        assert loaded.rows == alone.rows
        assert all(0 < t < e for t, e in zip(loaded.ttft_ms, loaded.e2e_ms))
        # a window lasts as long as its slowest request, at least
        assert all(wall * 1e3 >= max(loaded.e2e_ms[2 * k:2 * k + 2]) * 0.999
                   for k, wall in enumerate(loaded.window_s))
        assert loaded.output_tokens_per_s >= 0 and alone.output_tokens_per_s >= 0
        metrics = loaded.load_metrics()
        assert {"latency_p50_c2", "latency_p95_c2", "ttft_p50_c2", "tpot_p50_c2",
                "output_tokens_per_s_c2"} <= set(metrics)
        assert metrics["latency_p50_c2"] == pytest.approx(float(np.median(loaded.e2e_ms)))
    assert figures.at("base", 2).repeat_e2e_ms is not None
    latency_rule(figures.at("base", 2), figures.at("finetuned", 2), 1.2, **RULE)  # judgeable
    assert "at 1, 2 requests in flight together" in figures.notes[0]


def first_requests(profile: LatencyProfile, n: int) -> LatencyProfile:
    """The profile as it stood after its first `n` timed rows."""
    def head(values):
        return None if values is None else values[:n]

    return replace(profile, rows=profile.rows[:n], e2e_ms=profile.e2e_ms[:n],
                   ttft_ms=profile.ttft_ms[:n], output_tokens=profile.output_tokens[:n],
                   repeat_e2e_ms=head(profile.repeat_e2e_ms), core_wait=head(profile.core_wait),
                   repeat_core_wait=head(profile.repeat_core_wait))


def test_transformers_times_another_round_only_while_the_latency_rule_is_undecided(served):
    """A limit every ratio meets passes after one round; a limit of 0 can never pass, so the
    timing goes on round after round until the rule fails or max_rounds is reached."""
    n_rows = len(served["ids"])
    easy = served["measure"]("merged", rows=4, judgement=LatencyJudgement(("finetuned",), 100.0,
                                                                          **RULE))
    assert easy.latency_of("finetuned").n_requests == 4
    assert "; 1 round(s) of 4 rows (another round while the latency rule of finetuned was " \
           "undecided, at most 3)" in easy.notes[0]
    hard = served["measure"]("merged", rows=4,
                             judgement=LatencyJudgement(("finetuned",), 0.0, **RULE))
    base, candidate = hard.latency_of("base"), hard.latency_of("finetuned")
    rounds = candidate.n_requests // 4
    assert candidate.n_requests == 4 * rounds and 1 <= rounds <= 3
    assert base.rows == candidate.rows and base.rows[:4] == tuple(sample_rows(n_rows, 4))
    assert all(0 <= row < n_rows for row in base.rows)
    assert all(len(set(base.rows[k:k + 4])) == 4 for k in range(0, 4 * rounds, 4))  # drawn anew
    note = hard.notes[0]
    assert f"{4 * rounds} rows per model" in note and f"; {rounds} round(s) of 4 rows" in note
    for done in range(1, rounds):  # each round before the last left the rule undecided
        assert latency_rule(first_requests(base, 4 * done), first_requests(candidate, 4 * done),
                            0.0, **RULE).passed is None
    final = latency_rule(base, candidate, 0.0, **RULE).passed
    assert final is False or (final is None and rounds == 3)


# --- The same verdict idle and under load ------------------------------------------------------


# Spins until killed or until the process that started it is gone: a test run that is itself
# killed (a timeout) must not leave a core busy for everything after it.
_BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


def burn_cores(count: int) -> list[subprocess.Popen]:
    """Processes that keep `count` cores busy until killed (or this process ends)."""
    return [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]) for _ in range(count)]


MAX_CORE_WAIT = load_config().evaluation.latency.max_core_wait


def rule_statuses(figures) -> list[tuple[str, bool | None]]:
    settings = load_config().verdict
    rules = [latency_rule(figures.latency_of("base"), figures.latency_of("finetuned"),
                          settings.max_latency_ratio, **RULE, max_core_wait=MAX_CORE_WAIT),
             *memory_rules(figures.memory_of("base"), figures.memory_of("finetuned"),
                           settings.max_memory_ratio, 0.01)]
    return [(rule.name, rule.passed) for rule in rules]


def measured_with_burners(served, served_as: str, rows: int, judgement, burners: int):
    processes = burn_cores(burners)
    try:
        return served["measure"](served_as, rows=rows, judgement=judgement)
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.mark.parametrize("served_as, rows", [("merged", 20), ("adapter", 20)])
def test_same_verdict_idle_and_under_load(served, served_as, rows):
    """Merged (as fast as the base) passes, and adapter (PEFT's extra work per layer on a tiny
    model, about x1.5 here) fails at the default limit x1.2, idle and with all cores but the one
    the timing uses kept busy by other processes: timed as an evaluation times them (another round
    while the rule is undecided, up to the default max_rounds). With a busy process on every core
    the requests also queue for a core: the rows where they waited are left out, and the rule
    either keeps its idle status or, with too few rows left, does not judge; it never turns."""
    settings = load_config().verdict
    judgement = LatencyJudgement(("finetuned",), settings.max_latency_ratio, **RULE,
                                 max_core_wait=MAX_CORE_WAIT)
    cores = os.cpu_count() or 2
    idle = served["measure"](served_as, rows=rows, judgement=judgement)
    busy = measured_with_burners(served, served_as, rows, judgement, max(1, cores - 1))
    crowded = measured_with_burners(served, served_as, rows, judgement, cores)

    def rule(figures):
        return latency_rule(figures.latency_of("base"), figures.latency_of("finetuned"), 1.2,
                            **RULE, max_core_wait=MAX_CORE_WAIT)

    report = f"idle: {rule(idle)}\nbusy: {rule(busy)}\noversubscribed: {rule(crowded)}"
    assert rule_statuses(idle)[0] == ("latency_ratio", served_as == "merged"), report
    assert rule_statuses(busy) == rule_statuses(idle), report
    assert rule_statuses(crowded)[0][1] in (rule_statuses(idle)[0][1], None), report
    assert busy.memory == idle.memory == crowded.memory
    waits = [np.mean([w for p in f.latency for w in p.core_waits]) for f in (idle, crowded)]
    assert waits[1] > waits[0], waits  # the timing saw its threads queue for a core


def test_merge_adapter_folds_the_adapter_into_a_plain_model(llama_base, llama_adapter, tmp_path):
    """The merged folder vLLM serves for `served: merged` computes what base + adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelens.evaluators.engines.transformers import merge_adapter

    merged_dir = merge_adapter(llama_base, llama_adapter, tmp_path / "merged")
    ids = AutoTokenizer.from_pretrained(merged_dir)(SENTENCES[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base),
                                            llama_adapter)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(llama_base)(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4) and not torch.allclose(merged, base, atol=1e-2)
    assert not (merged_dir / "adapter_config.json").exists()


def test_latency_rule_against_a_reference_timed_in_the_same_rows():
    """Against the alias's holder: c_i / h_i per row, the base's A/A still the noise floor."""
    rng = np.random.default_rng(2)
    base, again = rng.normal(100, 2, 20), rng.normal(100, 2, 20)
    holder, candidate = rng.normal(150, 2, 20), rng.normal(155, 2, 20)
    against_holder = latency_rule(profile("base", base, again), profile("c", candidate), 1.2,
                                  reference=profile("v1", holder), **RULE)
    assert against_holder.passed and against_holder.observed == pytest.approx(155 / 150, abs=0.03)
    assert "c/v1" in against_holder.detail
    assert latency_rule(profile("base", base, again), profile("c", candidate), 1.2,
                        **RULE).passed is False


def test_adapter_server_shares_the_base_weights_and_leaves_the_base_plain(llama_base,
                                                                          llama_adapter):
    """One copy of the weights for base and adapter; the base itself gets no LoRA layers."""
    from tunelens.evaluators.engines.transformers import TransformersServer

    options = load_config().evaluation.transformers
    server = TransformersServer(llama_base, [Candidate("base"), Candidate("ft", llama_adapter)],
                                 options, "adapter")
    try:
        base, adapted = server.models["base"], server.models["ft"]
        assert not any("lora" in name for name, _ in base.named_parameters())
        shared = {id(p) for p in base.parameters()}
        frozen = [p for name, p in adapted.named_parameters() if "lora_" not in name]
        assert frozen and all(id(p) in shared for p in frozen)
    finally:
        server.close()


def test_figures_not_measured_as_served_leave_the_rules_undecided_not_a_batch_proxy():
    """Without a served measurement (sample_rows 0, or a holder on another base's engine) the
    latency and memory rules say so and cannot pass: no queue time or RSS stands in for them."""
    from tunelens.evaluators.stages.score import _served_rules

    config = with_changes(load_config(), {"verdict": {"max_latency_ratio": 1.2,
                                                      "max_memory_ratio": 1.25,
                                                      "max_memory_gib": 8.0}})
    rules = {rule.name: rule for rule in _served_rules(None, "base", config)}
    assert set(rules) == {"latency_ratio", "memory_ratio", "memory_gib"}
    assert all(rule.passed is None and "not measured" in rule.detail for rule in rules.values())
    assert "sample_rows is 0" in rules["latency_ratio"].detail
    config = with_changes(config, {"verdict": {"max_latency_ratio": None, "max_memory_gib": None}})
    assert [rule.name for rule in _served_rules(None, "base", config)] == ["memory_ratio"]
