"""Adapter discovery, config rules, .bin loading, naming across architectures, the real adapters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils.other import get_pattern_key as peft_get_pattern_key
from safetensors.torch import load_file

from support import ADAPTER_FIXTURES
from tunelens.registry_hooks.engine.analysis import analyze_adapter
from tunelens.registry_hooks.engine.loading import (AnalysisInputError, find_adapter_dir, get_pattern_key,
                                             open_adapter)
from tunelens.registry_hooks.engine.naming import fused_split, parse_module_path
from tunelens.registry_hooks.report.document import analysis_json

REAL = ADAPTER_FIXTURES


def test_find_adapter_dir_direct_and_under_mlflow_peft(tmp_path, llama_adapter):
    assert find_adapter_dir(llama_adapter) == llama_adapter
    model_dir = tmp_path / "mlflow-model"
    shutil.copytree(llama_adapter, model_dir / "peft")
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    assert find_adapter_dir(model_dir) == model_dir / "peft"
    assert find_adapter_dir(tmp_path) is None
    assert open_adapter(model_dir).directory == model_dir / "peft"


@pytest.mark.parametrize("patterns,key", [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj"),
    (["q_proj", "layers.1.self_attn.q_proj"], "model.layers.1.self_attn.q_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),  # must match whole segments: no match
    ([r"layers\.[01]\.mlp\.up_proj"], "model.layers.1.mlp.up_proj"),
    (["c_proj"], "transformer.h.0.mlp.c_proj"),
])
def test_pattern_rule_is_peft_own(patterns, key):
    assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key)


@pytest.mark.parametrize("path,layer,component,group", [
    ("model.layers.3.self_attn.q_proj", 3, "self_attn.q_proj", "attention"),  # Llama/Mistral/Qwen
    ("model.layers.0.mlp.down_proj", 0, "mlp.down_proj", "mlp"),
    ("model.language_model.layers.7.self_attn.o_proj", 7, "self_attn.o_proj", "attention"),  # Gemma 3
    ("model.layers.2.self_attn.qkv_proj.k", 2, "self_attn.qkv_proj.k", "attention"),  # Phi-3 part
    ("model.layers.2.mlp.gate_up_proj.up", 2, "mlp.gate_up_proj.up", "mlp"),
    ("model.layers.4.block_sparse_moe.experts.7.w2", 4, "block_sparse_moe.experts.7.w2", "mlp"),
    ("transformer.h.11.attn.c_attn.q", 11, "attn.c_attn.q", "attention"),  # GPT-2
    ("transformer.h.11.attn.c_proj", 11, "attn.c_proj", "attention"),
    ("transformer.h.11.mlp.c_proj", 11, "mlp.c_proj", "mlp"),
    ("gpt_neox.layers.5.attention.query_key_value", 5, "attention.query_key_value", "attention"),
    ("gpt_neox.layers.5.mlp.dense_4h_to_h", 5, "mlp.dense_4h_to_h", "mlp"),
    ("transformer.h.1.self_attention.dense", 1, "self_attention.dense", "attention"),  # Falcon
    ("transformer.h.1.mlp.dense_h_to_4h", 1, "mlp.dense_h_to_4h", "mlp"),
    ("model.embed_tokens", None, "model.embed_tokens", "embedding"),
    ("lm_head", None, "lm_head", "embedding"),
    ("score", None, "score", "other"),
])
def test_parse_module_path_across_architectures(path, layer, component, group):
    where = parse_module_path(path)
    assert (where.layer, where.component, where.group) == (layer, component, group)


def test_fused_split_sizes():
    phi3 = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 3072}
    split = fused_split("model.layers.0.self_attn.qkv_proj", 3072 + 2 * 768, phi3)
    assert split.parts == [("q", range(0, 3072)), ("k", range(3072, 3840)), ("v", range(3840, 4608))]
    assert fused_split("model.layers.0.self_attn.qkv_proj", 9216, None).needs_base_config
    assert fused_split("transformer.h.0.attn.c_attn", 2304, None).parts[2] == ("v", range(1536, 2304))
    assert fused_split("model.layers.0.mlp.gate_up_proj", 16384, None).parts[0] == ("gate", range(0, 8192))
    assert fused_split("model.layers.0.self_attn.q_proj", 4096, None) is None
    with pytest.raises(ValueError, match="Q\\+K\\+V"):
        fused_split("model.layers.0.self_attn.qkv_proj", 9000, phi3)


def test_adapter_model_bin_loads_with_weights_only(llama_adapter, tmp_path):
    as_bin = tmp_path / "bin-adapter"
    as_bin.mkdir()
    shutil.copy(llama_adapter / "adapter_config.json", as_bin)
    torch.save(load_file(llama_adapter / "adapter_model.safetensors"), as_bin / "adapter_model.bin")
    from_bin = analyze_adapter(as_bin, progress=False)
    from_st = analyze_adapter(llama_adapter, progress=False)
    assert [m.fro for m in from_bin.modules] == [m.fro for m in from_st.modules]


def test_bin_holding_arbitrary_objects_is_refused(llama_adapter, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(llama_adapter / "adapter_config.json", evil)
    torch.save({"x": torch.zeros(2), "payload": Path("/etc/passwd")}, evil / "adapter_model.bin")
    with pytest.raises(AnalysisInputError, match="corrupt or not a weights file"):
        open_adapter(evil)


def test_real_gpt2_causal_adapter_without_its_base():
    """r=8, alpha=32 on c_attn + c_proj (attention's and the MLP's), fan_in_fan_out, no base."""
    adapter = REAL / "gpt2-causal-c_attn-c_proj"
    result = analyze_adapter(adapter, progress=False)
    file = load_file(adapter / "adapter_model.safetensors")
    assert result.summary.trainable_params == sum(t.numel() for t in file.values()) == 811008
    assert result.summary.layers_modified == list(range(12))
    assert len(result.modules) == 12 * (3 + 2)  # c_attn split in q/k/v, attn.c_proj, mlp.c_proj
    assert {m.component for m in result.modules if m.layer == 4} == {
        "attn.c_attn.q", "attn.c_attn.k", "attn.c_attn.v", "attn.c_proj", "mlp.c_proj"}
    assert {m.scale for m in result.modules} == {4.0}
    # Dense check of one split part and one MLP module from the raw tensors.
    a = file["base_model.model.transformer.h.4.attn.c_attn.lora_A.weight"].double()
    b = file["base_model.model.transformer.h.4.attn.c_attn.lora_B.weight"].double()
    k_part = (4.0 * b @ a)[768:1536].numpy()
    k = next(m for m in result.modules if m.name == "transformer.h.4.attn.c_attn.k")
    assert k.shape == [768, 768]
    np.testing.assert_allclose(k.singular_values, np.linalg.svd(k_part, compute_uv=False)[:8],
                               rtol=1e-9)
    assert (k.min, k.max) == (pytest.approx(k_part.min()), pytest.approx(k_part.max()))
    # 56.6M entries: the histogram is a stated sample, mean/std/min/max still exact.
    h = result.histogram
    assert not h.exact and h.sample_size == 250_000 and sum(h.counts) == 250_000
    assert h.total_entries == 12 * (2304 * 768 + 768 * 768 + 768 * 3072)
    assert 0 < h.share_within_one_std_error < 0.001
    assert any("relative change" in n for n in result.needs_base)
    assert analysis_json(result)


def test_real_gpt2_seqcls_adapter_with_saved_score_head():
    """SEQ_CLS: a full score.weight saved beside the LoRA tensors (modules_to_save by task)."""
    result = analyze_adapter(REAL / "gpt2-seqcls-c_attn", progress=False)
    assert result.summary.trainable_params == 299520  # includes score.weight 6x768
    assert all(m.name.startswith("transformer.h.") for m in result.modules)
    assert len(result.modules) == 36
    assert any("score.weight" in n for n in result.needs_base)
    # 21M entries: a stated sample (visiting every one cost more than the rest of the analysis)
    h = result.histogram
    assert not h.exact and h.total_entries == 12 * 2304 * 768
    assert sum(h.counts) == h.sample_size == 250_000


def test_adapter_config_is_reported_as_given(tmp_path, llama_adapter):
    info = analyze_adapter(llama_adapter, progress=False).adapter
    raw = json.loads((llama_adapter / "adapter_config.json").read_text())
    assert (info.peft_type, info.r, info.lora_alpha, info.use_rslora, info.use_dora) == (
        "LORA", raw["r"], raw["lora_alpha"], False, False)
    assert sorted(info.target_modules) == sorted(raw["target_modules"])


def test_safetensors_check_accepts_real_files(llama_adapter, llama_base, tmp_path):
    """No false alarms: PEFT's, transformers' and safetensors' own files (with __metadata__, every
    float dtype, a zero-size tensor) pass check_safetensors unchanged."""
    from safetensors.torch import save_file

    from tunelens.registry_hooks.engine.loading import FLOAT_DTYPES, check_safetensors

    for path in [*REAL.glob("*/adapter_model.safetensors"),
                 llama_adapter / "adapter_model.safetensors"]:
        check_safetensors(path, FLOAT_DTYPES)
    for path in llama_base.glob("*.safetensors"):
        check_safetensors(path)
    mixed = tmp_path / "mixed.safetensors"
    save_file({"a": torch.ones(3, 2, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.float16),
               "c": torch.ones(0, 4), "d": torch.ones(1, dtype=torch.float64),
               "e": torch.arange(3)}, mixed, metadata={"format": "pt"})
    check_safetensors(mixed)
    with pytest.raises(AnalysisInputError, match="dtype 'I64'"):
        check_safetensors(mixed, FLOAT_DTYPES)


def test_hugging_face_cache_snapshot_links_into_its_blobs(llama_adapter, tmp_path):
    """`~/.cache/huggingface/hub/models--org--name/snapshots/<rev>/` holds links to ../../blobs:
    allowed; a link out of the models--* folder is still refused."""
    repo = tmp_path / "models--org--adapter"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        blob = repo / "blobs" / f"sha-{name}"
        shutil.copy(llama_adapter / name, blob)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert len(open_adapter(snapshot).modules) == len(open_adapter(llama_adapter).modules)
    (snapshot / "adapter_model.safetensors").unlink()
    (snapshot / "adapter_model.safetensors").symlink_to(llama_adapter / "adapter_model.safetensors")
    with pytest.raises(AnalysisInputError, match="outside the adapter directory"):
        open_adapter(snapshot)
