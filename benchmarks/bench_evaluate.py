"""Benchmark: base + LoRA adapter on 64 prompts, three ways.

    .venv/bin/python benchmarks/bench_evaluate.py [--prompts 64] [--max-new-tokens 16] [--json OUT]

1. tunelens vLLM backend: ONE engine holding the base, the adapter through a LoRARequest, each
   model's 64 prompts submitted as one batch (the engine batches them).
2. tunelens transformers backend: the base loaded once, the adapter attached with PEFT, one prompt
   at a time (greedy, same token ids).
3. MLflow's default path: each model logged with mlflow.transformers, loaded as pyfunc
   (`mlflow.pyfunc.load_model`, what `mlflow.models.evaluate(model=uri)` does) and asked row by row.

The model is tests/support/factories.py's tiny Llama (2 layers, hidden 128, head_dim 64, vocab 500) with a
real r=8 PEFT adapter on every projection: it measures the serving machinery, not a big model's
arithmetic. Each path runs in its own child process (engine start and model loading included in
"total"; "generate" is the two models' generation only).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

SENTENCES = ["she go to school every day", "they was happy", "i has a apple", "he dont like it",
             "the cat sat on the mat", "correct the grammar of this sentence", "they were happy",
             "a disadvantage is that parking is very difficult"]


def build_models(root: Path) -> tuple[Path, Path]:
    from support.factories import make_lora_adapter, tiny_llama

    base = tiny_llama(root / "base")
    adapter = make_lora_adapter(base, root / "adapter", r=8, lora_alpha=16,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"])
    return base, adapter


def prompts(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(n)]


def run_backend(kind: str, base: Path, adapter: Path, n: int, max_new: int) -> dict:
    """One tunelens backend: start, then base and adapter phases on identical token ids."""
    from transformers import AutoTokenizer

    from tunelens.config import load_config
    from tunelens.evaluators.engines.interface import Candidate
    from tunelens.evaluators.engines.transformers import TransformersEngine
    from tunelens.evaluators.engines.vllm import VllmEngine
    from tunelens.evaluators.inputs.prompts import generation_settings

    evaluation = load_config().evaluation
    settings = generation_settings(evaluation.generation, max_new)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(p)["input_ids"] for p in prompts(n)]
    start = time.perf_counter()
    backend = (VllmEngine(base, [adapter], evaluation.vllm, max_model_len=256)
               if kind == "vllm" else TransformersEngine(base, evaluation.transformers))
    loaded = time.perf_counter()
    phases = [backend.generate(c, ids, tokenizer, settings)
              for c in (Candidate("base"), Candidate("finetuned", adapter))]
    done = time.perf_counter()
    backend.close()
    return {"load_s": loaded - start, "generate_s": done - loaded, "total_s": done - start,
            "tokens": sum(len(g.token_ids) for p in phases for g in p.generations)}


def run_pyfunc(base: Path, adapter: Path, n: int, max_new: int, root: Path) -> dict:
    """MLflow's path: log each model with mlflow.transformers, load as pyfunc, predict per row."""
    import mlflow
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    tokenizer = AutoTokenizer.from_pretrained(base)
    uris = {}
    # model_config: generation settings applied at predict time (the default signature takes no
    # params), the same greedy / max-new-tokens budget as the tunelens backends.
    generation = {"max_new_tokens": max_new, "do_sample": False}
    with mlflow.start_run():
        uris["base"] = mlflow.transformers.log_model(
            {"model": AutoModelForCausalLM.from_pretrained(base), "tokenizer": tokenizer},
            name="base", task="text-generation", model_config=generation,
            pip_requirements=["transformers"]).model_uri
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        uris["finetuned"] = mlflow.transformers.log_model(
            {"model": peft_model, "tokenizer": tokenizer}, name="finetuned",
            task="text-generation", base_model_path=str(base), model_config=generation,
            pip_requirements=["transformers", "peft"]).model_uri
    load_s = generate_s = 0.0
    for uri in uris.values():
        start = time.perf_counter()
        model = mlflow.pyfunc.load_model(uri)
        loaded = time.perf_counter()
        for text in prompts(n):
            model.predict(pd.DataFrame({"inputs": [text]}))
        generate_s += time.perf_counter() - loaded
        load_s += loaded - start
    return {"load_s": load_s, "generate_s": generate_s, "total_s": load_s + generate_s}


def child(args) -> None:
    base, adapter = Path(args.base), Path(args.adapter)
    if args.child == "pyfunc":
        result = run_pyfunc(base, adapter, args.prompts, args.max_new_tokens, Path(args.root))
    else:
        result = run_backend(args.child, base, adapter, args.prompts, args.max_new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", metavar="OUT", help="also write the figures here")
    parser.add_argument("--child", choices=["vllm", "transformers", "pyfunc"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="tunelens-bench-eval-") as tmp:
        root = Path(tmp)
        base, adapter = build_models(root)
        results = {}
        for kind in ("vllm", "transformers", "pyfunc"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--base", str(base),
                                  "--adapter", str(adapter), "--root", str(root),
                                  "--prompts", str(args.prompts),
                                  "--max-new-tokens", str(args.max_new_tokens)],
                                 capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
            results[kind] = json.loads(line[-1][len("RESULT "):])
            print(f"{kind:>12}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[kind].items()),
                  flush=True)
    v = results["vllm"]
    for kind in ("transformers", "pyfunc"):
        r = results[kind]
        print(f"{kind} / vllm: generate {r['generate_s'] / v['generate_s']:.1f}x, "
              f"total {r['total_s'] / v['total_s']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
