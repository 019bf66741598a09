"""Benchmark: `tunelens analyze FINETUNED --base BASE` on a synthetic Qwen2.5-1.5B-shaped pair.

Builds two bf16 models shaped like Qwen2.5-1.5B (28 layers, hidden 1536, intermediate 8960, 12 heads,
2 KV heads, vocab 151936, tied embeddings, q/k/v biases: 1.54 B parameters, 3.1 GB each) as sharded
safetensors in a temporary folder; the fine-tuned one is the base plus a rank-8 update and bf16
noise on every layer matrix. Then times the diff in a fresh child process (the one a user runs)
and reports its wall time and peak memory: peak anonymous memory (what the diff itself holds,
sampled every 20 ms) and the kernel's peak RSS (which also counts the safetensors files' mapped,
reclaimable page cache), and its CPU time (on a shared machine the wall time also measures the
other tenants; the load averages before and after are recorded). Goal on the 2-core machine: under 3
minutes and 3 GB. The diff runs with the product's default torch threads (conf.yaml's
analysis.threads: 1) unless --threads says otherwise.

    .venv/bin/python benchmarks/bench_full_diff.py [--layers 28] [--keep DIR] [--threads N]
                                                   [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1536, 8960, 12, 2, 151936
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 1 << 30


def layer_shapes(layer: int) -> dict[str, list[int]]:
    p = f"model.layers.{layer}."
    kv = KV_HEADS * HEAD_DIM
    return {p + "self_attn.q_proj.weight": [HIDDEN, HIDDEN], p + "self_attn.q_proj.bias": [HIDDEN],
            p + "self_attn.k_proj.weight": [kv, HIDDEN], p + "self_attn.k_proj.bias": [kv],
            p + "self_attn.v_proj.weight": [kv, HIDDEN], p + "self_attn.v_proj.bias": [kv],
            p + "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            p + "mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN],
            p + "mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
            p + "mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
            p + "input_layernorm.weight": [HIDDEN], p + "post_attention_layernorm.weight": [HIDDEN]}


def model_shapes(layers: int) -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "model.norm.weight": [HIDDEN]}
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    return shapes


def config(layers: int) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def write_pair(root: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
    """base/ and tuned/ with sharded bf16 safetensors and model.safetensors.index.json."""
    generator = torch.Generator().manual_seed(seed)
    dirs = root / "base", root / "tuned"
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(layers)))
    shards: list[list[str]] = [[]]
    size = 0
    shapes = model_shapes(layers)
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        if size and size + 2 * numel > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 2 * numel
    weight_maps = ({}, {})
    for index, names in enumerate(shards):
        base_part, tuned_part = {}, {}
        for name in names:
            shape = shapes[name]
            w = torch.randn(shape, generator=generator) * 0.02
            tuned = w.clone()
            if len(shape) == 2 and ".layers." in name:
                left = torch.randn(shape[0], 8, generator=generator)
                right = torch.randn(8, shape[1], generator=generator)
                tuned += 2e-4 * (left @ right) + 1e-4 * torch.randn(shape, generator=generator)
            base_part[name], tuned_part[name] = w.to(torch.bfloat16), tuned.to(torch.bfloat16)
            del w, tuned
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        for d, part, weight_map in zip(dirs, (base_part, tuned_part), weight_maps):
            save_file(part, d / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        del base_part, tuned_part
    for d, weight_map in zip(dirs, weight_maps):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dirs


CHILD = r"""
import json, sys, threading, time, resource
from pathlib import Path
peak = {"anon_kb": 0}
def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak["anon_kb"] = max(peak["anon_kb"], anon_kb())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from tunelens.registry_hooks.engine.full_diff import diff_models
from tunelens.registry_hooks.report.full_diff_page import write_full_diff
tuned, base, out, threads = sys.argv[1:5]
from tunelens.config import with_changes
config = None if threads == "default" else with_changes(None, {"analysis": {"threads": int(threads)}})
start = time.perf_counter()
result = diff_models(tuned, base, config=config, progress=True)
diffed = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
diff_cpu = usage.ru_utime + usage.ru_stime
write_full_diff(result, out)
total = time.perf_counter() - start
stop.set()
peak["anon_kb"] = max(peak["anon_kb"], anon_kb())
print(json.dumps({"diff_s": diffed, "diff_cpu_s": diff_cpu, "with_outputs_s": total, "tensors": len(result.full_diff.tensors),
                  "matrices": len(result.modules), "peak_anon_gib": peak["anon_kb"] / 2**20,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime
                           + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
                  "relative_fro_total": result.full_diff.relative_fro_total}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--keep", metavar="DIR", help="build the pair here and keep it")
    parser.add_argument("--threads", default="default",
                        help="torch CPU threads in the diff (default: the product's, 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunelens-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        start = time.perf_counter()
        if not (root / "tuned" / "model.safetensors.index.json").is_file():
            write_pair(root, args.layers)
        params = sum(torch.Size(s).numel() for s in model_shapes(args.layers).values())
        print(f"built a {params / 1e9:.2f} B-parameter bf16 pair in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "tuned"), str(root / "base"),
                               str(root / "out"), args.threads], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        figures.update(params_billion=params / 1e9, cuda=torch.cuda.is_available(),
                       torch_threads=args.threads, cores=os.cpu_count(),
                       load_average_before=load_before, load_average_after=os.getloadavg())
        print(json.dumps(figures, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
