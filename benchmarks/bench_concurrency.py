"""Latency and throughput under load: a base and a LoRA adapter on vLLM at 1, 4 and 16 requests in
flight together, measured the way an evaluation measures them.

    .venv/bin/python benchmarks/bench_concurrency.py [--base DIR --adapter DIR] [--levels 1 4 16]
        [--rows 20] [--max-new-tokens 32] [--quick] [--json]

Without --base/--adapter the model is tests/support/factories.py's tiny Llama (2 layers, hidden
128, head_dim 64, vocab 500) with a real r=8 PEFT adapter on every projection: it measures the
serving machinery, not a big model's arithmetic. The timing is tunelens's own (`run_group`, the
evaluation's generation stage): a plain engine times the base, the LoRA-enabled engine the adapter,
a plain engine the base again; on each engine every level in turn, each level's requests sent in
windows of that many at once on the same prompts. A request's latency runs from its submission to
its last token as the caller sees it; output tokens/s is every window's tokens over the windows'
wall time. --quick: levels 1 and 2, 4 rows, 8 new tokens (checks that the script runs).
Run it alone on a quiet machine: the figures are the machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the table (or JSON) alone on stdout
sys.path.insert(0, str(REPO / "tests"))

from bench_evaluate import build_models  # noqa: E402  (the same tiny Llama and r=8 adapter)

SENTENCES = ["she go to school every day", "they was happy", "i has a apple", "he dont like it",
             "the cat sat on the mat", "correct the grammar of this sentence", "they were happy",
             "a disadvantage is that parking is very difficult"]
COLUMNS = (("latency_p50", "p50 ms"), ("latency_p95", "p95 ms"), ("ttft_p50", "TTFT p50 ms"),
           ("tpot_p50", "TPOT p50 ms"), ("output_tokens_per_s", "out tok/s"))


def measure(base: Path, adapter: Path, levels: list[int], rows: int, max_new: int):
    """Every level's figures for base and adapter (ServingFigures), as an evaluation takes them."""
    from transformers import AutoTokenizer

    from tunelens.config import load_config, with_changes
    from tunelens.evaluators.engines.choice import BackendChoice
    from tunelens.evaluators.engines.interface import Candidate
    from tunelens.evaluators.inputs.prompts import generation_settings
    from tunelens.evaluators.stages.generate import run_group
    from tunelens.evaluators.stages.plan import EngineGroup

    config = with_changes(load_config(), {
        "evaluation": {"latency": {"sample_rows": rows, "max_rounds": 1, "concurrency": levels}},
        "verdict": {"max_latency_ratio": None}})  # no extra rounds: one timing per level
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(f"{SENTENCES[i % len(SENTENCES)]} {i}")["input_ids"] for i in range(rows)]
    group = EngineGroup(base, [Candidate("base"), Candidate("adapter", adapter, "1")], 256, ids)
    settings = generation_settings(config.evaluation.generation, max_new)
    return run_group(group, list(range(rows)), BackendChoice("vllm", "requested"), settings,
                     config, serve=True).serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if (args.base is None) != (args.adapter is None):
        parser.exit(2, "give both --base and --adapter, or neither (the tiny Llama)\n")
    if args.quick:
        args.levels, args.rows, args.max_new_tokens = [1, 2], 4, 8
    if args.rows < 2 or min(args.levels) < 1:
        parser.exit(2, "--rows must be at least 2 and every level at least 1\n")
    with tempfile.TemporaryDirectory(prefix="bench-concurrency-") as root:
        base, adapter = ((args.base, args.adapter) if args.base is not None
                         else build_models(Path(root)))
        figures = measure(base, adapter, args.levels, args.rows, args.max_new_tokens)
    table = [{"model": p.label, "in_flight": p.concurrency, "requests": p.n_requests,
              **{name: p.load_metrics().get(f"{name}_c{p.concurrency}") for name, _ in COLUMNS}}
             for p in sorted(figures.every_level(), key=lambda p: (p.label, p.concurrency))]
    if args.json:
        print(json.dumps({"levels": list(figures.levels), "rows": args.rows,
                          "max_new_tokens": args.max_new_tokens, "figures": table,
                          "notes": list(figures.notes)}, indent=2))
        return
    print(f"{'model':8} {'in flight':>9} {'requests':>8} "
          + " ".join(f"{title:>12}" for _, title in COLUMNS))
    for row in table:
        print(f"{row['model']:8} {row['in_flight']:>9} {row['requests']:>8} "
              + " ".join(f"{row[name]:>12.1f}" if row[name] is not None else f"{'n/a':>12}"
                         for name, _ in COLUMNS))


if __name__ == "__main__":
    main()
