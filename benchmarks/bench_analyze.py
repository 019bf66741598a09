"""Benchmark: `analyze_adapter` + `write_analysis` in-process on adapters from 36 to 18,000 modules,
beside the dense approach (materialise ΔW, numpy svdvals) on ONE 4096×4096 module and the cost of
starting Python + torch + the CLI, all in the same run.

    .venv/bin/python benchmarks/bench_analyze.py [--adapters NAME ...] [--json] [--keep DIR]
    .venv/bin/python benchmarks/bench_analyze.py --modules 6000   # many tiny per-expert modules

Adapters (`--adapters`, default all):
  gpt2-causal, gpt2-seqcls  the real GPT-2 fixtures in tests/data/adapters (36 and 12 modules)
  llama-3-8b    32 layers × q/k/v/o/gate/up/down, hidden 4096, intermediate 14336, 8 KV heads of 128
  llama-3-70b   80 layers × the same seven, hidden 8192, intermediate 28672, 8 KV heads of 128
  qwen3-30b-a3b 48 layers, hidden 2048, q/k/v/o (32 heads, 4 KV heads of 128) plus 128 experts of
                intermediate 768 adapted through target_parameters (gate_up_proj and down_proj)
All synthetic ones are r=16, alpha=32; the 8B one float32, the 70B and MoE ones bfloat16 (as PEFT
saves an adapter trained on a bf16 model; float32 would be 0.8 and 2.5 GB). Each measurement runs in
a child process of its own, so its peak RSS (ru_maxrss) is that step's whole process, torch
included. Factors: "trained" (default) = A like PEFT's Kaiming-uniform init, B Gaussian with
column scales decaying 10x over the rank (a decaying spectrum, as trained adapters have);
"gaussian" = i.i.d. N(0, 1) A and B, the worst case for the min/max tile bounds.
`--modules N` instead times an adapter of N tiny modules shaped like an older per-expert MoE
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

from support.scale_support import EXPERT_PROJECTIONS, expert_lora_adapter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = {"gpt2-causal": REPO / "tests/data/adapters/gpt2-causal-c_attn-c_proj",
            "gpt2-seqcls": REPO / "tests/data/adapters/gpt2-seqcls-c_attn"}
RANK, ALPHA = 16, 32


def dense_shapes(hidden: int, intermediate: int, kv_heads: int, head_dim: int) -> dict:
    """Module -> (out, in) of a Llama-style all-linear LoRA."""
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
            "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate)}


SYNTHETIC = {  # name -> (layers, module shapes, experts (count, {parameter: (out, in)}), dtype)
    "llama-3-8b": (32, dense_shapes(4096, 14336, 8, 128), None, "float32"),
    "llama-3-70b": (80, dense_shapes(8192, 28672, 8, 128), None, "bfloat16"),
    "qwen3-30b-a3b": (48, {"self_attn.q_proj": (4096, 2048), "self_attn.k_proj": (512, 2048),
                           "self_attn.v_proj": (512, 2048), "self_attn.o_proj": (2048, 4096)},
                      (128, {"gate_up_proj": (2 * 768, 2048), "down_proj": (2048, 768)}),
                      "bfloat16"),
}
ORDER = ["gpt2-causal", "gpt2-seqcls", "llama-3-8b", "llama-3-70b", "qwen3-30b-a3b"]
DENSE_MODULE = "base_model.model.dense.q_proj"
EXPERT_LAYERS = 10


def _factors(rows: int, cols: int, rank: int, factors: str, g):
    import torch

    if factors == "gaussian":
        return torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g)
    decay = torch.logspace(0, -1, rank)
    return ((torch.rand(rank, cols, generator=g) * 2 - 1) / cols ** 0.5,
            torch.randn(rows, rank, generator=g) * 0.02 * decay)


def build_adapter(out: Path, name: str, factors: str, seed: int = 0) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for one synthetic adapter, layer by
    layer into safetensors shards' worth of memory (the 70B one holds 200 M values)."""
    import torch
    from safetensors.torch import save_file

    layers, shapes, experts, dtype = SYNTHETIC[name]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for component, (rows, cols) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{component}"
            a, b = _factors(rows, cols, RANK, factors, g)
            tensors[f"{prefix}.lora_A.weight"] = a.to(getattr(torch, dtype))
            tensors[f"{prefix}.lora_B.weight"] = b.to(getattr(torch, dtype))
        if experts:
            # PEFT's ParamWrapper layout: A (r·E, in), B (out, r·E); gate_up_proj, the first
            # adapted parameter, nests under .base_layer.
            count, parameters = experts
            for nesting, (rows, cols) in zip((".base_layer", ""), parameters.values()):
                prefix = f"base_model.model.model.layers.{layer}.mlp.experts{nesting}"
                a, b = _factors(rows, cols, RANK * count, factors, g)
                tensors[f"{prefix}.lora_A.weight"] = a.to(getattr(torch, dtype))
                tensors[f"{prefix}.lora_B.weight"] = b.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM",
              "target_modules": sorted({c.split(".")[-1] for c in shapes}),
              "base_model_name_or_path": f"synthetic/{name}-shaped"}
    if experts:
        config["target_parameters"] = [f"mlp.experts.{p}" for p in experts[1]]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def build_dense_module(out: Path, seed: int = 0) -> Path:
    """One 4096×4096 r=16 module (trained-like factors) for the dense comparison."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    a, b = _factors(4096, 4096, RANK, "trained", g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{DENSE_MODULE}.lora_A.weight": a, f"{DENSE_MODULE}.lora_B.weight": b},
              out / "dense.safetensors")
    return out / "dense.safetensors"


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


def child_dense(path: Path) -> dict:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
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


def build_in_child(name: str, out: Path, factors: str) -> Path:
    """Build a synthetic adapter (or the dense module) in a child process: Linux keeps a
    process's peak RSS across fork and exec, so building the 1.2 GB MoE adapter here would show
    up as every later child's peak."""
    proc = subprocess.run([sys.executable, __file__, "--factors", factors, "--child", "build",
                           name, str(out)], capture_output=True, text=True, check=True)
    return Path(json.loads(proc.stdout.strip().splitlines()[-1])["path"])


def startup_costs() -> dict:
    """Wall seconds to start Python alone, Python + `import torch`, and `tunelens --help`."""
    def wall(*argv: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], capture_output=True, check=True)
        return time.perf_counter() - start

    return {"python_s": wall("-c", "pass"), "torch_s": wall("-c", "import torch"),
            "cli_help_s": wall("-m", "tunelens.plugin.cli", "analyze", "--help")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", choices=ORDER, default=ORDER, metavar="NAME",
                        help=f"which adapters (default all: {', '.join(ORDER)})")
    parser.add_argument("--factors", choices=["trained", "gaussian"], default="trained")
    parser.add_argument("--keep", metavar="DIR", help="write the adapters and outputs here")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--modules", type=int, metavar="N",
                        help="time an adapter of about N tiny expert modules instead")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *paths = args.child
        if kind == "build":  # a child of its own: see build_in_child
            name, out = paths[0], Path(paths[1])
            path = (build_dense_module(out) if name == "dense"
                    else build_adapter(out, name, args.factors))
            print(json.dumps({"path": str(path)}))
            return 0
        figures = (child_analyze(Path(paths[0]), Path(paths[1])) if kind == "analyze"
                   else child_dense(Path(paths[0])))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        figures["peak_rss_mb"] = usage.ru_maxrss / 1024
        figures["cpu_s"] = usage.ru_utime + usage.ru_stime  # whole process, imports included
        print(json.dumps(figures))
        return 0
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        if args.modules:
            experts = max(1, round(args.modules / (EXPERT_LAYERS * len(EXPERT_PROJECTIONS))))
            names = {f"{args.modules}-tiny-modules": expert_lora_adapter(
                root / "tiny-modules", layers=EXPERT_LAYERS, experts=experts)}
        else:
            names = {}
            for name in args.adapters:
                if name in FIXTURES:
                    names[name] = FIXTURES[name]
                else:
                    start = time.perf_counter()
                    names[name] = build_in_child(name, root / name, args.factors)
                    print(f"built {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        dense = run_child("dense", str(build_in_child("dense", root / "dense", args.factors)))
        startup = startup_costs()
        for name, adapter in names.items():
            print(f"analysing {name} ...", file=sys.stderr)
            rows[name] = run_child("analyze", str(adapter), str(root / "out" / name))
            rows[name]["size_mb"] = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"adapters": rows, "dense_4096": dense, "startup": startup,
                          "load_average": load, "cores": os.cpu_count(),
                          "factors": args.factors}))
        return 0
    header = (f"{'adapter':<16}{'modules':>8}{'file MB':>9}{'analyse s':>11}{'write s':>9}"
              f"{'total s':>9}{'peak MB':>9}{'dense 4096² s':>15}")
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        write = r.get("write_s") or 0.0
        print(f"{name:<16}{r['modules']:>8}{r['size_mb']:>9.1f}{r['analyze_s']:>11.2f}"
              f"{write:>9.2f}{r['analyze_s'] + write:>9.2f}{r['peak_rss_mb']:>9.0f}"
              f"{dense['dense_s']:>15.2f}")
    print(f"\nin-process figures (analyze_adapter + write_analysis); through the CLI add the start-up:"
          f" python {startup['python_s']:.2f} s, python + import torch {startup['torch_s']:.2f} s, "
          f"`tunelens analyze --help` {startup['cli_help_s']:.2f} s")
    print(f"dense approach: ONE 4096×4096 module, materialise ΔW + numpy svdvals "
          f"({dense['dense_s']:.2f} s, peak RSS {dense['peak_rss_mb']:.0f} MB)")
    print(f"load average during the run: {load:.1f} on {os.cpu_count()} cores; factors {args.factors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
