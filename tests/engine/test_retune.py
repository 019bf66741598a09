"""Targeted re-tuning configs: ranking by S_ℓ per group, files PEFT loads and applies."""
from __future__ import annotations

import json

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from support import ADAPTER_FIXTURES
from support.factories import make_lora_adapter, tiny_llama
from tunelens.registry_hooks.engine.analysis import analyze_adapter
from tunelens.registry_hooks.engine.retune import rank_layers, retune_plans, write_retune_configs

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REAL = ADAPTER_FIXTURES


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 5-layer tiny Llama and an adapter whose layer-3 MLP and layer-1 attention were boosted."""
    root = tmp_path_factory.mktemp("retune")
    base = tiny_llama(root / "base", layers=5, hidden=64, heads=1, kv_heads=1, intermediate=96)
    adapter = make_lora_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=ALL)
    path = adapter / "adapter_model.safetensors"
    weights = load_file(path)
    for key in weights:
        if (".layers.3.mlp." in key or ".layers.1.self_attn." in key) and "lora_B" in key:
            weights[key] = weights[key] * 5
    save_file(weights, path)
    return base, adapter


def _dense_group_scores(base, adapter, group_words):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    scores = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and any(w in name for w in group_words):
            layer = int(name.split(".layers.")[1].split(".")[0])
            scores[layer] = scores.get(layer, 0.0) + float(module.get_delta_weight("default").norm())
    return sorted(scores, key=lambda layer: -scores[layer])


def test_plans_follow_dense_ranking_and_load_in_peft(deep, tmp_path):
    base, adapter = deep
    result = analyze_adapter(adapter, progress=False)
    mlp_order = _dense_group_scores(base, adapter, ["mlp."])
    attention_order = _dense_group_scores(base, adapter, ["self_attn."])
    assert [layer for layer, _ in rank_layers(result, "mlp")] == mlp_order
    assert mlp_order[0] == 3 and attention_order[0] == 1
    paths = {p.stem: p for p in write_retune_configs(result, tmp_path)}
    assert set(paths) == {"soloist_mlp", "ensemble_mlp", "soloist_attention", "ensemble_attention"}
    expected = {"soloist_mlp": mlp_order[:1], "ensemble_mlp": sorted(mlp_order[:3]),
                "soloist_attention": attention_order[:1],
                "ensemble_attention": sorted(attention_order[:3])}
    for name, path in paths.items():
        raw = json.loads(path.read_text())
        config = LoraConfig(**raw)
        assert config.layers_to_transform == expected[name]
        assert config.r == 4 and config.lora_alpha == 8
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        adapted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                   for n, _ in model.named_modules() if n.endswith(".lora_A")}
        group = "mlp" if name.endswith("mlp") else "self_attn"
        leaves = ["gate_proj", "up_proj", "down_proj"] if group == "mlp" else ALL[:4]
        assert adapted == {f"model.layers.{layer}.{group}.{leaf}" for layer in expected[name]
                           for leaf in leaves}


def test_gpt2_fused_parts_map_back_to_their_module():
    """`c_proj` in this adapter's target_modules hit both attn.c_proj and mlp.c_proj: the plans
    name each by its path, and the fused c_attn's q/k/v parts become `attn.c_attn` again."""
    result = analyze_adapter(REAL / "gpt2-causal-c_attn-c_proj", progress=False)
    plans = {p.name: p for p in retune_plans(result)}
    assert plans["soloist_attention"].target_modules == ["attn.c_attn", "attn.c_proj"]
    assert plans["soloist_mlp"].target_modules == ["mlp.c_proj"]
    assert plans["soloist_attention"].config["fan_in_fan_out"] is True
    assert len(plans["ensemble_mlp"].layers) == 3
    assert plans["ensemble_mlp"].scores == sorted(plans["ensemble_mlp"].scores, reverse=True)
