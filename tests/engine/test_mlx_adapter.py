"""mlx-lm adapters (adapters.safetensors + adapter_config.json's lora_parameters) against the
dense ΔW mlx-lm itself applies.

mlx cannot run here (its CPU backend is not on the index), so the adapters are written as mlx-lm
0.32's save code writes them (support.factories.make_mlx_lm_adapter: the same file names, keys,
factor orientation and config layout), and the reference is the formula of its LoRALinear.fuse:
W' = W + (scale·lora_bᵀ)·lora_aᵀ, with lora_a (in, r) and lora_b (r, out).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file
from support.cli_support import assert_one_line_error
from support.factories import make_mlx_lm_adapter, mlx_lm_fused_deltas

from tunelens.plugin.cli import main
from tunelens.registry_hooks.engine.analysis import analyze_adapter
from tunelens.registry_hooks.engine.loading import AnalysisInputError
from tunelens.registry_hooks.report.narrative import narrate


def test_mlx_lm_adapter_matches_the_delta_mlx_lm_fuses(llama_base, tmp_path):
    adapter = make_mlx_lm_adapter(llama_base, tmp_path / "mlx", rank=4, scale=10.0, alpha=16,
                                  num_layers=1, keys=["self_attn.q_proj", "self_attn.v_proj",
                                                      "mlp.down_proj"])
    result = analyze_adapter(adapter, llama_base, progress=False)
    deltas = mlx_lm_fused_deltas(adapter, 10.0)
    base = load_file(str(llama_base / "model.safetensors"))
    assert sorted(m.name for m in result.modules) == sorted(deltas)
    for m in result.modules:
        delta = deltas[m.name]
        singular = np.linalg.svd(delta, compute_uv=False)
        assert m.shape == list(delta.shape) and m.scale == 10.0 and m.rank == 4
        assert m.fro == pytest.approx(float(np.linalg.norm(delta)), rel=1e-9)
        assert m.singular_values == pytest.approx(singular[:4].tolist(), rel=1e-8)
        assert (m.min, m.max) == pytest.approx((delta.min(), delta.max()), rel=1e-9)
        w = base[m.name + ".weight"].astype(np.float64)
        assert m.relative_fro == pytest.approx(float(np.linalg.norm(delta) / np.linalg.norm(w)),
                                               rel=1e-9)
    # Rows of ΔW (not of ΔWᵀ, which a square q_proj could not tell apart by its norms).
    for top in result.top_neurons:
        assert top.shift == pytest.approx(float(np.linalg.norm(deltas[top.module][top.index])),
                                          rel=1e-9)
    assert result.summary.layers_modified == [1]
    assert result.summary.trainable_params == 4 * (128 + 128) + 4 * (128 + 128) + 4 * (256 + 128)
    info = result.adapter
    assert (info.format, info.scale, info.r, info.lora_alpha) == ("mlx-lm", 10.0, 4, 40.0)
    assert info.target_modules == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    assert any("alpha is not used" in w for w in result.warnings)
    assert any("mlx-lm LoRA rank 4 and scale 10" in s for s in narrate(result))


def test_mlx_lm_phi3_fused_qkv_is_split_and_counted_once(phi3_base, tmp_path):
    """The Phi-3 layout of an mlx-lm run: qkv_proj and o_proj of the last layer, rank 8,
    scale 10. qkv_proj is split into q/k/v for the per-part metrics and is one module in the
    per-module mean of ‖ΔW‖_F."""
    adapter = make_mlx_lm_adapter(phi3_base, tmp_path / "mlx", rank=8, scale=10.0, num_layers=1,
                                  keys=["self_attn.qkv_proj", "self_attn.o_proj"])
    result = analyze_adapter(adapter, phi3_base, progress=False)
    deltas = mlx_lm_fused_deltas(adapter, 10.0)
    qkv = deltas["model.layers.1.self_attn.qkv_proj"]
    parts = {"q": qkv[:64], "k": qkv[64:96], "v": qkv[96:]}
    for suffix, part in parts.items():
        m = next(m for m in result.modules
                 if m.name == f"model.layers.1.self_attn.qkv_proj.{suffix}")
        assert m.fro == pytest.approx(float(np.linalg.norm(part)), rel=1e-9)
    whole = [float(np.linalg.norm(d)) for d in deltas.values()]
    assert result.summary.mean_module_fro == pytest.approx(float(np.mean(whole)), rel=1e-9)
    assert result.summary.max_module_fro == pytest.approx(max(whole), rel=1e-9)


def test_mlx_lm_configs_it_cannot_read_are_one_line(llama_base, tmp_path, capsys):
    adapter = make_mlx_lm_adapter(llama_base, tmp_path / "mlx", rank=4, keys=["self_attn.q_proj"])
    config_path = adapter / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for change, message in (
            ({"lora_parameters": {"rank": 4, "alpha": 16, "dropout": 0.0}}, "has no scale"),
            ({"fine_tune_type": "full"}, "an mlx-lm 'full' fine-tune"),
            ({"lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0}},
             "not (in, r) and (r, out) with rank 8")):
        config_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(AnalysisInputError, match=re.escape(message)):
            analyze_adapter(adapter, progress=False)
        assert_one_line_error(capsys, ["analyze", str(adapter), "--out", str(tmp_path / "out"),
                                       "--no-progress"], message)


def test_tunelens_analyze_reads_an_mlx_lm_adapter(llama_base, tmp_path):
    adapter = make_mlx_lm_adapter(llama_base, tmp_path / "mlx", rank=4, scale=20.0,
                                  keys=["self_attn.q_proj", "self_attn.k_proj"])
    out = tmp_path / "out"
    assert main(["analyze", str(adapter), "--base", str(llama_base), "--out", str(out),
                 "--no-progress"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["adapter"]["format"] == "mlx-lm" and data["adapter"]["scale"] == 20.0
    deltas = mlx_lm_fused_deltas(adapter, 20.0)
    fros = {m["name"]: m["fro"] for m in data["modules"]}
    assert fros == pytest.approx({k: float(np.linalg.norm(d)) for k, d in deltas.items()},
                                 rel=1e-9)
    assert "mlx-lm" in (out / "report.html").read_text()
