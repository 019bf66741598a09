"""The latency rule idle and on an oversubscribed machine (a busy loop on every core).

Times a tiny Llama and a real PEFT adapter on it (served as an adapter: PEFT's extra work per layer)
as an evaluation does (transformers backend, 20 rows, more rounds while undecided at the default
limit), idle and then with `--burners` busy-looping processes (default: one per core), N times.
Prints per measurement the median paired ratio, its interval's low end, the noise floor the rule
uses (the A/A median), the share of their runnable time the requests' threads waited for a core
(median), the rows left out for waiting more than evaluation.latency.max_core_wait, and the rule's
status as an evaluation decides it and with every row counted.
Run alone: .venv/bin/python benchmarks/bench_latency_load.py [--pairs 8] [--burners N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "evaluators")]

LIMIT = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from support.factories import make_lora_adapter, tiny_llama
    from test_serving import LORA_TARGETS, MAX_NEW, RULE, SENTENCES
    from tunelens.config import load_config
    from tunelens.evaluators.backends import Candidate
    from tunelens.evaluators.prompts import GenerationSettings
    from tunelens.evaluators.serving import LatencyJudgement, ServedTiming, compare_latency

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-latency-load-"))
    base = tiny_llama(root / "base")
    adapter = make_lora_adapter(base, root / "adapter", r=8, lora_alpha=16,
                                target_modules=list(LORA_TARGETS))
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    config = load_config()
    max_core_wait = config["evaluation"]["latency"]["max_core_wait"]
    evaluation = {**config["evaluation"], "served": "adapter",
                  "latency": {"sample_rows": 20, "warmup_requests": 2, "max_rounds": 3}}
    candidates = [Candidate("base"), Candidate("finetuned", adapter, "1")]

    def status(compared):
        if compared.oversubscribed:
            return "not judged"
        if compared.estimate <= LIMIT:
            return "pass"
        return "fail" if compared.low > max(LIMIT, compared.noise_factor) else "undecided"

    def measure(where: str) -> None:
        timing = ServedTiming(base, candidates, ids, tokenizer,
                              GenerationSettings(max_new_tokens=MAX_NEW), evaluation,
                              "transformers", max_model_len=256, work_dir=root,
                              judgement=LatencyJudgement(("finetuned",), LIMIT, **RULE,
                                                         max_core_wait=max_core_wait))
        figures = timing.after_generation()
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
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(args.burners)]
        try:
            measure("loaded")
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()


if __name__ == "__main__":
    main()
