"""An AnalysisResult computed densely from explicit ΔW = s·B·A matrices (numpy, no engine).

The report and narrative tests use it to control exactly which layer or component changed most;
every number in the result is computed from the matrices, the slow obvious way.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from tunelens.registry_hooks.engine.result import (AdapterInfo, AnalysisResult, Heatmap, Histogram,
                                            LayerProfile, ModuleMetrics, Summary, TopNeuron)

LLAMA_COMPONENTS = {"self_attn.q_proj": "attention", "self_attn.k_proj": "attention",
                    "self_attn.v_proj": "attention", "self_attn.o_proj": "attention",
                    "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp"}


def module_metrics(name, layer, component, group, delta, rank, scale) -> ModuleMetrics:
    sv = np.linalg.svd(delta, compute_uv=False)[:rank]
    energy = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    p = sv / sv.sum()
    effective = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    return ModuleMetrics(
        name=name, layer=layer, component=component, group=group, shape=list(delta.shape),
        rank=rank, scale=scale, fro=float(np.linalg.norm(delta)), spectral=float(sv[0]),
        singular_values=sv.tolist(), effective_rank=effective,
        stable_rank=float(np.sum(sv ** 2) / sv[0] ** 2),
        energy_rank_90=int(np.searchsorted(energy, 0.9) + 1),
        energy_rank_99=int(np.searchsorted(energy, 0.99) + 1),
        rank_utilisation=effective / rank, mean=float(delta.mean()), std=float(delta.std()),
        min=float(delta.min()), max=float(delta.max()))


def block_means(delta: np.ndarray, size: int) -> list[list[float]]:
    rows = np.array_split(np.arange(delta.shape[0]), min(size, delta.shape[0]))
    cols = np.array_split(np.arange(delta.shape[1]), min(size, delta.shape[1]))
    return [[float(delta[np.ix_(r, c)].mean()) for c in cols] for r in rows]


def dense_result(deltas, *, r: int, alpha: float, num_layers: int, base_params=None,
                 bins: int = 40, top_k: int = 20) -> AnalysisResult:
    """deltas: list of (layer, component, ΔW ndarray) with Llama-style component names."""
    modules, all_values, neurons, heat = [], [], [], []
    for layer, component, delta in deltas:
        name = f"model.layers.{layer}.{component}"
        m = module_metrics(name, layer, component, LLAMA_COMPONENTS[component], delta, r, alpha / r)
        modules.append(m)
        all_values.append(delta.ravel())
        for i, shift in enumerate(np.linalg.norm(delta, axis=1)):
            neurons.append(TopNeuron(layer, component, i, float(shift), name))
        heat.append(Heatmap(name, min(16, delta.shape[0]), min(16, delta.shape[1]),
                            block_means(delta, 16)))
    values = np.concatenate(all_values)
    mean, std = float(values.mean()), float(values.std())
    counts, edges = np.histogram(values, bins=bins)
    z = (values - mean) / std
    per_layer: dict[int, dict[str, float]] = defaultdict(dict)
    per_layer_group: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    group_fro: dict[str, float] = defaultdict(float)
    for m in modules:
        per_layer[m.layer][m.component] = m.fro
        per_layer_group[m.layer][m.group] += m.fro
        group_fro[m.group] += m.fro
    layers = [LayerProfile(l, sum(c.values()), c, dict(per_layer_group[l]))
              for l, c in sorted(per_layer.items())]
    trainable = sum(r * (d.shape[0] + d.shape[1]) for _, _, d in deltas)
    fros = [l.fro_sum for l in layers]  # S_ℓ per layer
    module_fros = [m.fro for m in modules]  # no fused projections here: one module each
    result = AnalysisResult(
        adapter=AdapterInfo("LORA", r, alpha, False, False, list({c.split(".")[-1]: 0 for _, c, _ in deltas}),
                            "tiny-llama"),
        summary=Summary(trainable, base_params, trainable / base_params if base_params else None,
                        sorted(per_layer), num_layers, float(np.mean(module_fros)),
                        float(np.max(module_fros)), float(np.mean(fros)), float(np.max(fros)),
                        dict(group_fro), float(np.mean([m.rank_utilisation for m in modules]))),
        modules=modules, layers=layers,
        top_neurons=sorted(neurons, key=lambda t: -t.shift)[:top_k],
        histogram=Histogram(mean, std, float(values.min()), float(values.max()), edges.tolist(),
                            counts.tolist(), True, float(np.mean(np.abs(z) < 1)),
                            skewness=float(np.mean(z ** 3)),
                            excess_kurtosis=float(np.mean(z ** 4) - 3)),
        heatmaps=heat,
        needs_base=["relative change", "amplification factor", "intruder dimensions"])
    return result


def lora_delta(rng, out_dim, in_dim, r, scale, magnitude=1.0) -> np.ndarray:
    """s·B·A with Gaussian factors, scaled by `magnitude`."""
    return magnitude * scale * rng.normal(size=(out_dim, r)) @ rng.normal(size=(r, in_dim)) / math.sqrt(in_dim)


def llama_like_result(layer_magnitudes=(1.0, 2.0, 3.0, 4.0), *, hidden=64, intermediate=128, r=8,
                      alpha=16, role_magnitudes=None, seed=0, base_params=None) -> AnalysisResult:
    """A Llama-shaped adapter on every q/k/v/o/gate/up/down with known per-layer magnitudes."""
    rng = np.random.default_rng(seed)
    role_magnitudes = role_magnitudes or {}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 2, hidden),
              "self_attn.v_proj": (hidden // 2, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    deltas = [(layer, c, lora_delta(rng, *shape, r, alpha / r, mag * role_magnitudes.get(c, 1.0)))
              for layer, mag in enumerate(layer_magnitudes) for c, shape in shapes.items()]
    return dense_result(deltas, r=r, alpha=alpha, num_layers=len(layer_magnitudes),
                        base_params=base_params)
