#!/usr/bin/env bash
# The GPU check: the weight analysis's CUDA path and the transformers backend's served latency and
# memory, on a machine with torch, transformers and peft (no vLLM, no MLflow needed), in one table.
#
#   benchmarks/gpu_check.sh [--cpu] [--wheels DIR] [--json]
#
# 1. Analysis: an adapter shaped like a Llama-3-8B all-linear LoRA (32 layers x q/k/v/o/gate/up/
#    down, r=16; benchmarks/bench_analyze.py builds it) analysed by analyze_adapter on the GPU and
#    on the CPU; the table gives each time and the largest relative difference of the per-module
#    Frobenius and spectral norms between the two.
# 2. Serving: a small Llama built from a config (hidden 2048, 12 layers, random weights, a local
#    tokenizer) and a random r=16 PEFT adapter on every projection, timed by tunelens's own
#    ServedTiming as an evaluation times them (base, adapter, base again; transformers in one
#    process, bfloat16 on the GPU) at 1, 4 and 16 requests in flight: p50/p95 latency, TTFT, time
#    per output token, output tokens/s, and memory as served (weights, adapter, peak KV cache,
#    torch's peak allocated).
# --cpu: a smoke run on the CPU with tiny shapes (a 2-layer Llama, its adapter analysed in place of
#    the 8B one, levels 1 and 2), to know the script works without a GPU. It proves nothing about
#    speed.
# tunelens need not be installed: the repository's folders are mapped to the `tunelens` package
# in a temporary folder. Its settings need pydantic and PyYAML: when the machine lacks them,
# --wheels DIR installs them (and anything else missing) from wheels carried there
# (`pip download pydantic pyyaml psutil tqdm -d DIR` on a machine with an index).
# Budget: meant to finish in under 8 minutes on one H100, the model build and both analyses
# included (estimated from the shapes; not yet timed on a GPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tunelens-gpu-check-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

ARGS=()
WHEELS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --cpu|--json) ARGS+=("$1"); shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --cpu, --json, --wheels DIR)" >&2; exit 2 ;;
    esac
done

# The tunelens package from the repository's folders, as setup.cfg's package_dir maps them.
mkdir -p "$WORK/site/tunelens"
for entry in "$REPO"/tunelens/*; do ln -s "$entry" "$WORK/site/tunelens/"; done
ln -s "$REPO/registry_hooks" "$WORK/site/tunelens/registry_hooks"
ln -s "$REPO/evaluators" "$WORK/site/tunelens/evaluators"
ln -s "$REPO/plugin" "$WORK/site/tunelens/plugin"

MISSING="$("$PYTHON" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "peft", "safetensors", "tokenizers", "numpy",
                           "pydantic", "yaml", "psutil", "tqdm")
               if importlib.util.find_spec(m) is None))
EOF
)"
if [[ -n "$MISSING" ]]; then
    if [[ -z "$WHEELS" ]]; then
        echo "gpu_check.sh: missing Python modules: $MISSING (carry wheels and pass --wheels DIR)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$WORK/deps" \
        $(echo "$MISSING" | sed 's/\byaml\b/pyyaml/') >&2
fi

export PYTHONPATH="$WORK/site:$WORK/deps:$REPO/tests:$REPO/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" - "$WORK" "${ARGS[@]}" <<'EOF'
"""The check itself (see the header of benchmarks/gpu_check.sh)."""
import json
import sys
import time
from pathlib import Path

import torch

work = Path(sys.argv[1])
on_cpu, as_json = "--cpu" in sys.argv[2:], "--json" in sys.argv[2:]
if not on_cpu and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no GPU here; --cpu runs the smoke check on the CPU")
device = "cpu" if on_cpu else "cuda"
rows = []  # (section, item, figure, value)


def analysis(adapter: Path) -> None:
    """analyze_adapter on `device` and on the CPU: times and the norms' largest difference."""
    from tunelens.config import with_changes
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    results = {}
    for where in dict.fromkeys([device, "cpu"]):
        settings = with_changes(None, {"analysis": {"device": where, "threads": None}})
        analyze_adapter(adapter, config=settings, progress=False)  # warm-up: kernels, allocator
        start = time.perf_counter()
        results[where] = analyze_adapter(adapter, config=settings, progress=False)
        if where == "cuda":
            torch.cuda.synchronize()
        rows.append(("analysis", f"{len(results[where].modules)} modules", f"{where} s",
                     time.perf_counter() - start))
    if device != "cpu":
        worst = max(abs(getattr(a, f) - getattr(b, f)) / max(abs(getattr(b, f)), 1e-30)
                    for a, b in zip(results[device].modules, results["cpu"].modules)
                    for f in ("fro", "spectral"))
        rows.append(("analysis", "cuda vs cpu", "max rel. diff fro/spectral", worst))


def serving(base: Path, adapter: Path, levels: list, sample: int, max_new: int) -> None:
    """ServedTiming on the transformers backend, as an evaluation times the served models."""
    from transformers import AutoTokenizer

    from support.factories import CORPUS
    from tunelens.config import with_changes
    from tunelens.evaluators.engines.interface import Candidate
    from tunelens.evaluators.timing.schedule import ServedTiming
    from tunelens.settings import GenerationSettings

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_ids = [tokenizer(f"{CORPUS[i]} {CORPUS[i + 3]}")["input_ids"] for i in range(sample)]
    settings = GenerationSettings(max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=0,
                                  stop=[], prompt_template="{input}", chat_template=False,
                                  system_prompt=None)
    evaluation = with_changes(None, {"evaluation": {
        "served": "adapter",
        "latency": {"sample_rows": sample, "warmup_requests": 2, "max_rounds": 1,
                    "concurrency": levels},
        "transformers": {"device": device, "dtype": "float32" if on_cpu else "bfloat16"}}},
        "the GPU check's serving settings").evaluation
    candidates = [Candidate("base"), Candidate("adapter", adapter, "1")]
    figures = ServedTiming(base, candidates, prompt_ids, tokenizer, settings, evaluation,
                           "transformers", max_model_len=256, work_dir=work).after_generation()
    for profile in sorted(figures.every_level(), key=lambda p: (p.label, p.concurrency)):
        level = f"c{profile.concurrency}"
        for name, value in profile.load_metrics().items():
            rows.append(("serving", f"{profile.label} {level}", name.removesuffix(f"_{level}"),
                         value))
    for memory in figures.memory:
        for name, value in memory.metrics().items():
            rows.append(("memory", memory.label, name, value))


def main() -> None:
    from support.factories import make_lora_adapter, tiny_llama

    start = time.perf_counter()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shape = (dict(layers=2, hidden=128, heads=2, kv_heads=2, intermediate=256) if on_cpu else
             dict(layers=12, hidden=2048, heads=16, kv_heads=8, intermediate=5632))
    base = tiny_llama(work / "base", **shape)
    adapter = make_lora_adapter(base, work / "adapter", r=16, lora_alpha=32,
                                target_modules=targets)
    if on_cpu:
        analysis(adapter)
    else:
        from bench_analyze import build_adapter

        analysis(build_adapter(work / "llama-3-8b-shaped", "llama-3-8b", "trained"))
    serving(base, adapter, [1, 2] if on_cpu else [1, 4, 16], 4 if on_cpu else 16,
            8 if on_cpu else 64)
    rows.append(("total", "wall", "s", time.perf_counter() - start))
    machine = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke check)"
    if as_json:
        print(json.dumps({"device": machine, "torch": torch.__version__,
                          "rows": [dict(zip(("section", "item", "figure", "value"), r))
                                   for r in rows]}, indent=1))
        return
    print(f"tunelens GPU check on {machine}, torch {torch.__version__}")
    print(f"{'section':9} {'item':22} {'figure':30} {'value':>14}")
    for section, item, figure, value in rows:
        print(f"{section:9} {item:22} {figure:30} {value:>14.6g}")


main()
EOF
