"""Benchmark: `analyze_adapter` + `write_analysis` on a Llama-3-8B-shaped LoRA adapter, beside the
dense approach (materialise ΔW, numpy svdvals) on ONE 4096×4096 module. Issue 2 item 8.

    .venv/bin/python benchmarks/bench_analyze.py [--factors trained|gaussian] [--keep DIR]
    .venv/bin/python benchmarks/bench_analyze.py --modules 6000   # many tiny modules (MoE experts)

The adapter (32 layers × q/k/v/o/gate/up/down, hidden 4096, intermediate 14336, 8 KV heads of 128,
r=16, alpha=32, float32) is written to a temporary directory. Each measurement runs in its own child
process, so the peak RSS reported (ru_maxrss) is that step's whole process, torch included.
Factors: "trained" (default) = A like PEFT's Kaiming-uniform init, B Gaussian with column scales
decaying 10x over the rank (a decaying spectrum, as trained adapters have); "gaussian" = i.i.d.
N(0, 1) A and B, the worst case for the min/max tile bounds.
`--modules N` instead times an adapter of N tiny modules shaped like a mixture-of-experts
all-linear LoRA (10 layers × N/30 experts × w1/w2/w3, 16×16, r=2): the cost of writing the outputs
per module, which must grow linearly in N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from scale_support import EXPERT_PROJECTIONS, expert_lora_adapter  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, KV_HEADS, HEAD_DIM, RANK, ALPHA = 4096, 14336, 32, 8, 128, 16, 32
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
DENSE_MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
EXPERT_LAYERS = 10


def build_adapter(out: Path, factors: str, seed: int = 0) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for the synthetic 8B-shaped adapter."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1, RANK)
    tensors = {}
    for layer in range(LAYERS):
        for component, (rows, cols) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{component}"
            if factors == "gaussian":
                a, b = torch.randn(RANK, cols, generator=g), torch.randn(rows, RANK, generator=g)
            else:
                a = (torch.rand(RANK, cols, generator=g) * 2 - 1) / cols ** 0.5
                b = torch.randn(rows, RANK, generator=g) * 0.02 * decay
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
              "target_modules": sorted({c.split(".")[-1] for c in SHAPES}),
              "base_model_name_or_path": "synthetic/llama-3-8b-shaped"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def child_analyze(adapter: Path, out: Path) -> dict:
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    start = time.perf_counter()
    result = analyze_adapter(adapter, progress=False)
    analysed = time.perf_counter()
    figures = {"analyze_s": analysed - start, "modules": len(result.modules),
               "histogram_exact": result.histogram.exact,
               "histogram_sample": result.histogram.sample_size}
    try:
        from tunelens.registry_hooks.report.outputs import write_analysis
    except ImportError:  # the report writer is another part of the project
        figures["write_s"] = None
    else:
        files = write_analysis(result, out)
        figures["write_s"] = time.perf_counter() - analysed
        figures["json_mb"] = files.json_path.stat().st_size / 2**20
        figures["html_mb"] = files.html_path.stat().st_size / 2**20
        figures["charts"] = len(files.chart_paths)
    return figures


def child_dense(adapter: Path) -> dict:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="np") as f:
        a = f.get_tensor(f"{DENSE_MODULE}.lora_A.weight").astype(np.float64)
        b = f.get_tensor(f"{DENSE_MODULE}.lora_B.weight").astype(np.float64)
    start = time.perf_counter()
    delta = (ALPHA / RANK) * b @ a
    singular = np.linalg.svdvals(delta)
    return {"dense_s": time.perf_counter() - start, "sigma_1": float(singular[0])}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", choices=["trained", "gaussian"], default="trained")
    parser.add_argument("--keep", metavar="DIR", help="write the adapter and outputs here")
    parser.add_argument("--modules", type=int, metavar="N",
                        help="time an adapter of about N tiny expert modules instead (no dense row)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *paths = args.child
        figures = (child_analyze(Path(paths[0]), Path(paths[1])) if kind == "analyze"
                   else child_dense(Path(paths[0])))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        figures["peak_rss_mb"] = usage.ru_maxrss / 1024
        figures["cpu_s"] = usage.ru_utime + usage.ru_stime  # whole process, imports included
        print(json.dumps(figures))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        if args.modules:
            experts = max(1, round(args.modules / (EXPERT_LAYERS * len(EXPERT_PROJECTIONS))))
            adapter = expert_lora_adapter(root / "adapter", layers=EXPERT_LAYERS, experts=experts)
        else:
            adapter = build_adapter(root / "adapter", args.factors)
        print(f"built adapter in {time.perf_counter() - start:.1f} s: {adapter}", file=sys.stderr)
        ours = run_child("analyze", str(adapter), str(root / "out"))
        dense = None if args.modules else run_child("dense", str(adapter))
    histogram = ("exact" if ours["histogram_exact"]
                 else f"sampled, {ours['histogram_sample']:,} entries")
    print(f"tunelens analyze_adapter, all {ours['modules']} modules/parts: {ours['analyze_s']:.2f} s"
          f" (histogram {histogram})")
    if ours.get("write_s") is not None:
        print(f"write_analysis (analysis.json {ours['json_mb']:.1f} MB, report.html "
              f"{ours['html_mb']:.1f} MB, {ours['charts']} charts): {ours['write_s']:.2f} s")
        print(f"total with every output: {ours['analyze_s'] + ours['write_s']:.2f} s")
    print(f"that process: peak RSS {ours['peak_rss_mb']:.0f} MB, CPU {ours['cpu_s']:.1f} s "
          "(imports included)")
    if dense:
        print(f"dense approach on ONE 4096x4096 module (materialise ΔW + numpy svdvals): "
              f"{dense['dense_s']:.2f} s; that process: peak RSS {dense['peak_rss_mb']:.0f} MB, "
              f"CPU {dense['cpu_s']:.1f} s")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
