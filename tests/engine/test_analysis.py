"""analyze_adapter against dense references: PEFT's own get_delta_weight / merge on tiny models.

Every config variant (alpha/r, rsLoRA, rank_pattern/alpha_pattern, fan_in_fan_out, embedding LoRA,
LoRA bias, DoRA, modules_to_save, fused splits) is built as a real PEFT adapter on a tiny model made
from a config, and every metric is compared with the same quantity computed on the dense ΔW.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.factories import make_lora_adapter, make_moe_adapter, save_tiny_model, tiny_moe
from safetensors.torch import load_file, save_file

from tunelens.config import with_changes
from tunelens.registry_hooks.engine.analysis import analyze_adapter
from tunelens.registry_hooks.engine.naming import strip_peft_prefix
from tunelens.registry_hooks.engine.result import AnalysisResult
from tunelens.registry_hooks.report.document import analysis_document
from tunelens.registry_hooks.report.narrative import fmt, narrate

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Exact histograms up to 50M entries: these tests check every count against the dense ΔW.
TINY = with_changes(None, {"analysis": {"heatmap_size": 8, "top_neurons": 15, "histogram_bins": 30,
                                       "histogram_exact_max_entries": 50_000_000}})


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """GPT-2 (Conv1D weights stored [in, out]) with fused c_attn."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=120, n_embd=48, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return save_tiny_model(config, tmp_path_factory.mktemp("gpt2-base"))


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Dense ΔW per module in Linear orientation [out, in], from PEFT itself in float64.

    LoRA and embedding modules: get_delta_weight. DoRA and modules_to_save: merge_and_unload()
    minus the base weights (the only way PEFT exposes their effective change).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, adapter_dir)
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and module.num_experts > 1:
            deltas.update(expert_deltas(name, module))
        elif isinstance(module, LoraLayer) and ("default" in module.lora_A
                                                or "default" in module.lora_embedding_A):
            delta = module.get_delta_weight("default")
            deltas[strip_peft_prefix(name)] = delta.T if module.fan_in_fan_out else delta
    config = model.peft_config["default"]
    if not (config.use_dora or config.modules_to_save):
        return deltas
    merged = model.merge_and_unload().state_dict()
    fan_in_fan_out = config.fan_in_fan_out
    for key, weight in merged.items():
        name = key[:-len(".weight")]
        if key.endswith(".weight") and weight.ndim == 2 and (
                name not in deltas or config.use_dora):
            change = weight - before[key]
            if change.abs().max() > 0:
                conv1d = fan_in_fan_out and "c_" in name
                deltas[name] = change.T if conv1d else change
    return deltas


def expert_deltas(name: str, wrapper) -> dict[str, torch.Tensor]:
    """Each expert's ΔW_e [out, in] from PEFT's own ParamWrapper.get_delta_weight (E, ...), named
    `<experts module>.<e>.<part>`; gate_up_proj cut in halves as transformers' `.chunk(2)` does."""
    delta = wrapper.get_delta_weight("default")
    if not wrapper._did_swap_in_out_features:  # stored (E, in, out)
        delta = delta.transpose(1, 2)
    module = strip_peft_prefix(name).replace(".base_layer", "")
    parts = ({"gate_proj": 0, "up_proj": 1} if wrapper.parameter_name == "gate_up_proj"
             else {wrapper.parameter_name: None})
    out = {}
    for e in range(delta.shape[0]):
        for part, half in parts.items():
            rows = delta[e] if half is None else delta[e].chunk(2, dim=0)[half]
            out[f"{module}.{e}.{part}"] = rows
    return out


def split_reference(deltas: dict[str, torch.Tensor], splits: dict[str, list[int]]):
    """Fused modules cut into their parts (suffix -> rows) the way the analysis should."""
    out = {}
    for name, delta in deltas.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in splits:
            suffixes, sizes = splits[leaf]
            for suffix, part in zip(suffixes, torch.split(delta, sizes)):
                out[f"{name}.{suffix}"] = part
        else:
            out[name] = delta
    return out


def assert_matches_dense(result: AnalysisResult, reference: dict[str, torch.Tensor],
                         exact_histogram: bool = True, heatmap_size: int = 8) -> None:
    """Every metric of every module against the dense ΔW."""
    by_name = {m.name: m for m in result.modules}
    assert set(by_name) == set(reference)
    heatmaps = {h.module: h for h in result.heatmaps}
    for name, delta in reference.items():
        m = by_name[name]
        dense = delta.numpy()
        singular = np.linalg.svd(dense, compute_uv=False)
        tol = 1e-9 * max(singular[0], 1e-30)
        assert m.shape == list(dense.shape), name
        assert m.fro == pytest.approx(np.linalg.norm(dense), rel=1e-9), name
        assert m.spectral == pytest.approx(singular[0], rel=1e-9), name
        k = len(m.singular_values)
        np.testing.assert_allclose(m.singular_values, singular[:k], rtol=1e-8, atol=tol)
        assert np.all(singular[k:] <= tol * 10), f"{name}: rank above the reported values"
        assert m.mean == pytest.approx(dense.mean(), abs=1e-12 + 1e-9 * abs(dense).max())
        assert m.std == pytest.approx(dense.std(), rel=1e-7)
        assert m.min == pytest.approx(dense.min(), rel=1e-9)
        assert m.max == pytest.approx(dense.max(), rel=1e-9)
        rows = [i * dense.shape[0] // min(dense.shape[0], heatmap_size)
                for i in range(min(dense.shape[0], heatmap_size) + 1)]
        cols = [j * dense.shape[1] // min(dense.shape[1], heatmap_size)
                for j in range(min(dense.shape[1], heatmap_size) + 1)]
        blocks = [[dense[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].mean()
                   for j in range(len(cols) - 1)] for i in range(len(rows) - 1)]
        if m.expert is not None:  # experts have no heatmap of their own: the layer × expert grid
            continue
        # Heatmaps are stored to 4 significant digits (lora_math.block_means itself is exact).
        np.testing.assert_allclose(heatmaps[name].values, blocks, rtol=6e-4, atol=1e-300)
    # Top neurons: the largest row norms over every module, same order and values.
    shifts = sorted(((float(np.linalg.norm(row)), name, i) for name, d in reference.items()
                     for i, row in enumerate(d.numpy())), reverse=True)[: len(result.top_neurons)]
    assert [(t.module, t.index) for t in result.top_neurons] == [(n, i) for _, n, i in shifts]
    np.testing.assert_allclose([t.shift for t in result.top_neurons], [s for s, _, _ in shifts],
                               rtol=1e-9)
    # Histogram pooled over all modules.
    entries = np.concatenate([d.numpy().reshape(-1) for d in reference.values()])
    h = result.histogram
    assert h.total_entries == entries.size
    assert (h.mean, h.std) == (pytest.approx(entries.mean(), abs=1e-12 + 1e-9 * abs(entries).max()),
                               pytest.approx(entries.std(), rel=1e-7))
    assert (h.min, h.max) == (pytest.approx(entries.min(), rel=1e-9),
                              pytest.approx(entries.max(), rel=1e-9))
    assert h.exact == exact_histogram
    if exact_histogram:
        counts, _ = np.histogram(entries, bins=len(h.counts), range=(h.min, h.max))
        assert np.abs(np.array(h.counts) - counts).sum() <= 2  # edge rounding at most
        assert sum(h.counts) == entries.size
        within = np.mean(np.abs(entries - entries.mean()) <= entries.std())
        assert h.share_within_one_std == pytest.approx(within, abs=2 / entries.size)
        centred = entries - entries.mean()
        assert h.excess_kurtosis == pytest.approx((centred ** 4).mean() / entries.std() ** 4 - 3,
                                                  rel=1e-6)
    # Per-layer S_ℓ = Σ components' ‖ΔW‖_F.
    for layer in result.layers:
        members = [m for m in result.modules if m.layer == layer.layer]
        assert layer.fro_sum == pytest.approx(sum(m.fro for m in members), rel=1e-12)
        assert set(layer.components) == {m.component for m in members}
        for role, comps in (("Q", ("q_proj", "q")), ("O", ("o_proj", "c_proj", "dense"))):
            attention = [m.fro for m in members if m.group == "attention"
                         and m.component.rsplit(".", 1)[-1] in comps]
            assert layer.roles.get(role, 0.0) == pytest.approx(sum(attention), rel=1e-12)


def test_llama_all_projections_adapter_only(llama_base, llama_adapter):
    result = analyze_adapter(llama_adapter, config=TINY, progress=False)
    assert_matches_dense(result, peft_deltas(llama_base, llama_adapter))
    assert result.adapter.r == 8 and result.adapter.lora_alpha == 16
    assert {m.scale for m in result.modules} == {2.0}
    assert result.summary.layers_modified == [0, 1]
    assert result.summary.base_params is None and result.summary.trainable_share is None
    assert any("relative change" in n for n in result.needs_base)
    assert all(m.relative_fro is None for m in result.modules)
    assert {m.group for m in result.modules} == {"attention", "mlp"}
    q = next(m for m in result.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert (q.layer, q.component, q.rank) == (0, "self_attn.q_proj", 8)
    assert not hasattr(result, "narrative")  # the engine writes no prose; the report words it
    # trainable params: every tensor in the adapter file.
    file = load_file(llama_adapter / "adapter_model.safetensors")
    assert result.summary.trainable_params == sum(t.numel() for t in file.values())


def test_llama_with_base_adds_relative_change_amplification_and_intruders(llama_base,
                                                                          llama_adapter):
    result = analyze_adapter(llama_adapter, llama_base, config=TINY, progress=False)
    deltas = peft_deltas(llama_base, llama_adapter)
    assert_matches_dense(result, deltas)
    base = load_file(llama_base / "model.safetensors")
    assert result.summary.base_params == sum(t.numel() for t in base.values())
    assert result.summary.num_layers == 2
    assert result.needs_base == []
    for m in result.modules:
        w = base[m.name + ".weight"].double().numpy()
        d = deltas[m.name].numpy()
        assert m.relative_fro == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w), rel=1e-9)
        u, s, vh = np.linalg.svd(d)
        r = 8
        amp = np.linalg.norm(d) / np.linalg.norm(u[:, :r].T @ w @ vh[:r].T)
        assert m.amplification == pytest.approx(amp, rel=1e-6)
        bu = np.linalg.svd(w, full_matrices=False)[0]
        tu = np.linalg.svd(w + d, full_matrices=False)[0][:, :10]
        assert m.intruder_dimensions == int((np.abs(tu.T @ bu).max(axis=1) < 0.5).sum())


def test_rslora_rank_pattern_and_alpha_pattern(llama_base, tmp_path):
    adapter = make_lora_adapter(
        llama_base, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LLAMA,
        rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
        alpha_pattern={"down_proj": 3, r"layers\.0\.mlp\.up_proj": 20})
    result = analyze_adapter(adapter, config=TINY, progress=False)
    assert_matches_dense(result, peft_deltas(llama_base, adapter))
    by_name = {m.name: m for m in result.modules}
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 2
    assert by_name["model.layers.1.self_attn.v_proj"].rank == 6
    assert by_name["model.layers.0.self_attn.v_proj"].rank == 4
    assert by_name["model.layers.1.mlp.down_proj"].scale == pytest.approx(3 / 2)
    assert by_name["model.layers.0.mlp.up_proj"].scale == pytest.approx(20 / 2)
    assert by_name["model.layers.1.mlp.up_proj"].scale == pytest.approx(8 / 2)


def test_embedding_lora(llama_base, tmp_path):
    adapter = make_lora_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["embed_tokens", "o_proj"])
    result = analyze_adapter(adapter, config=TINY, progress=False)
    assert_matches_dense(result, peft_deltas(llama_base, adapter))
    emb = next(m for m in result.modules if m.name == "model.embed_tokens")
    assert (emb.kind, emb.group, emb.layer, emb.shape) == ("embedding", "embedding", None,
                                                          [500, 128])
    # PEFT stores a copy of the base embedding beside an embedding LoRA: not trainable.
    file = load_file(adapter / "adapter_model.safetensors")
    copies = [k for k in file if ".base_layer." in k]
    assert copies and any("not counted" in w for w in result.warnings)
    assert result.summary.trainable_params == sum(
        t.numel() for k, t in file.items() if k not in copies)


def test_lora_bias(gpt2_base, tmp_path):
    adapter = make_lora_adapter(gpt2_base, tmp_path / "a", r=4, lora_alpha=8, lora_bias=True,
                                fan_in_fan_out=True, target_modules=["c_fc", "c_proj"])
    result = analyze_adapter(adapter, gpt2_base, config=TINY, progress=False)
    assert_matches_dense(result, peft_deltas(gpt2_base, adapter))
    file = load_file(adapter / "adapter_model.safetensors")
    for m in result.modules:
        bias = file[f"base_model.model.{m.name}.lora_B.bias"].double()
        assert bias.norm() > 0
        assert m.bias_delta_norm == pytest.approx(m.scale * float(bias.norm()), rel=1e-9)


def test_dora_with_base_is_the_effective_delta_and_without_it_the_direction(llama_base, tmp_path):
    adapter = make_lora_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, use_dora=True,
                                target_modules=["q_proj", "down_proj"])
    deltas = peft_deltas(llama_base, adapter)  # merge_and_unload: DoRA's effective ΔW
    with_base = analyze_adapter(adapter, llama_base, config=TINY, progress=False)
    assert {m.kind for m in with_base.modules} == {"dora"}
    assert_matches_dense(with_base, deltas)
    alone = analyze_adapter(adapter, config=TINY, progress=False)
    assert {m.kind for m in alone.modules} == {"lora"}
    assert any("DoRA" in n for n in alone.needs_base)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        llama_base, dtype=torch.float64), adapter)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    direction = q.get_delta_weight("default")
    m = next(m for m in alone.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert m.fro == pytest.approx(float(direction.norm()), rel=1e-9)


def test_modules_to_save_dense_delta_with_base_counted_without(llama_base, tmp_path):
    adapter = make_lora_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["q_proj"], modules_to_save=["lm_head"])
    # Train the saved head a little so its ΔW is not zero.
    file = load_file(adapter / "adapter_model.safetensors")
    file["base_model.model.lm_head.weight"] += 0.01 * torch.randn_like(
        file["base_model.model.lm_head.weight"], generator=torch.Generator().manual_seed(1))
    save_file(file, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with_base = analyze_adapter(adapter, llama_base, config=TINY, progress=False)
    deltas = peft_deltas(llama_base, adapter)
    assert "lm_head" in deltas
    assert_matches_dense(with_base, deltas)
    head = next(m for m in with_base.modules if m.name == "lm_head")
    assert (head.kind, head.group, head.shape) == ("dense", "embedding", [500, 128])
    alone = analyze_adapter(adapter, config=TINY, progress=False)
    assert [m.name for m in alone.modules] == ["model.layers.0.self_attn.q_proj",
                                               "model.layers.1.self_attn.q_proj"]
    assert any("lm_head.weight" in n for n in alone.needs_base)
    assert alone.summary.trainable_params == sum(t.numel() for t in file.values())


def test_phi3_fused_qkv_and_gate_up_split_with_base_config(phi3_base, tmp_path):
    adapter = make_lora_adapter(phi3_base, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    result = analyze_adapter(adapter, phi3_base, config=TINY, progress=False)
    splits = {"qkv_proj": (["q", "k", "v"], [64, 32, 32]), "gate_up_proj": (["gate", "up"], [96, 96])}
    reference = split_reference(peft_deltas(phi3_base, adapter), splits)
    assert_matches_dense(result, reference)
    names = {m.name for m in result.modules}
    assert {"model.layers.0.self_attn.qkv_proj.k", "model.layers.1.mlp.gate_up_proj.up"} <= names
    k = next(m for m in result.modules if m.name == "model.layers.0.self_attn.qkv_proj.k")
    assert (k.component, k.group, k.shape) == ("self_attn.qkv_proj.k", "attention", [32, 64])
    base = load_file(phi3_base / "model.safetensors")
    w = base["model.layers.0.self_attn.qkv_proj.weight"][64:96].double()
    assert k.relative_fro == pytest.approx(
        float(reference[k.name].norm() / w.norm()), rel=1e-9)
    # Without the base config, qkv_proj cannot be split: analysed whole, and said so.
    alone = analyze_adapter(adapter, config=TINY, progress=False)
    assert "model.layers.0.self_attn.qkv_proj" in {m.name for m in alone.modules}
    assert "model.layers.0.mlp.gate_up_proj.gate" in {m.name for m in alone.modules}
    assert any("qkv_proj" in n for n in alone.needs_base)
    assert_matches_dense(alone, split_reference(peft_deltas(phi3_base, adapter),
                                                {"gate_up_proj": splits["gate_up_proj"]}))


def test_mean_delta_per_module_and_per_layer_are_two_named_numbers(phi3_base, tmp_path):
    """Per module: mean and max of ‖ΔW‖_F over modules, a fused qkv_proj / gate_up_proj one
    module (its whole ΔW). Per layer: mean and max of S_ℓ, the sum over the layer's (split)
    matrices. Both against PEFT's dense ΔW."""
    adapter = make_lora_adapter(phi3_base, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    result = analyze_adapter(adapter, phi3_base, config=TINY, progress=False)
    deltas = peft_deltas(phi3_base, adapter)
    whole = [float(d.norm()) for d in deltas.values()]
    assert len(whole) == 8  # 2 layers × qkv, o, gate_up, down
    summary = result.summary
    assert summary.mean_module_fro == pytest.approx(float(np.mean(whole)), rel=1e-9)
    assert summary.max_module_fro == pytest.approx(max(whole), rel=1e-9)
    parts = split_reference(deltas, {"qkv_proj": (["q", "k", "v"], [64, 32, 32]),
                                     "gate_up_proj": (["gate", "up"], [96, 96])})
    sums: dict[int, float] = {}
    for name, delta in parts.items():
        layer = int(name.split(".")[2])
        sums[layer] = sums.get(layer, 0.0) + float(delta.norm())
    assert summary.mean_layer_fro_sum == pytest.approx(float(np.mean(list(sums.values()))),
                                                       rel=1e-9)
    assert summary.max_layer_fro_sum == pytest.approx(max(sums.values()), rel=1e-9)
    # The split parts averaged one by one would be a third number: the module mean is not that.
    part_mean = float(np.mean([m.fro for m in result.modules]))
    assert abs(summary.mean_module_fro - part_mean) > 0.05 * part_mean
    document = analysis_document(result)
    assert document["summary"]["mean_module_fro"] == summary.mean_module_fro
    text = " ".join(narrate(result))
    assert (f"counted once) the change averages ‖ΔW‖_F = {fmt(summary.mean_module_fro)}, the "
            f"largest {fmt(summary.max_module_fro)}") in text
    assert (f"(S_ℓ) it averages {fmt(summary.mean_layer_fro_sum)}, the largest "
            f"{fmt(summary.max_layer_fro_sum)}") in text


def test_gpt2_fan_in_fan_out_conv1d_and_c_attn_split(gpt2_base, tmp_path):
    adapter = make_lora_adapter(gpt2_base, tmp_path / "a", r=4, lora_alpha=16, fan_in_fan_out=True,
                                target_modules=["c_attn", "c_proj", "c_fc"])
    reference = split_reference(peft_deltas(gpt2_base, adapter),
                                {"c_attn": (["q", "k", "v"], [48, 48, 48])})
    result = analyze_adapter(adapter, gpt2_base, config=TINY, progress=False)
    assert_matches_dense(result, reference)
    by_name = {m.name: m for m in result.modules}
    assert by_name["transformer.h.0.attn.c_attn.v"].shape == [48, 48]
    assert by_name["transformer.h.1.mlp.c_fc"].shape == [192, 48]  # [out, in], not Conv1D's
    assert (by_name["transformer.h.1.mlp.c_proj"].group,
            by_name["transformer.h.1.attn.c_proj"].group) == ("mlp", "attention")
    assert all(m.relative_fro is not None for m in result.modules)


def test_nonfinite_weights_are_reported_not_fatal(llama_adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_adapter, broken)
    file = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    file[key][0, 0] = math.nan
    file[key][1, 1] = math.inf
    save_file(file, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    result = analyze_adapter(broken, config=TINY, progress=False)
    bad = next(m for m in result.modules if m.name == "model.layers.1.mlp.up_proj")
    assert bad.nonfinite == 2 and math.isnan(bad.fro)
    assert result.summary.nonfinite_modules == ["model.layers.1.mlp.up_proj"]
    assert any("NaN/Inf" in w for w in result.warnings)
    assert math.isfinite(result.summary.max_module_fro) and math.isfinite(result.histogram.std)
    assert math.isfinite(result.summary.max_layer_fro_sum)
    data = result.to_dict()
    assert next(m for m in data["modules"] if m["name"] == bad.name)["fro"] is None
    again = AnalysisResult.from_dict(data)
    assert math.isnan(next(m for m in again.modules if m.name == bad.name).fro)


def test_nonfinite_expert_factors_are_reported_not_fatal(tmp_path):
    """A NaN and an Inf in one experts parameter's lora_A: every expert of that parameter is
    recorded with the count and left out of the aggregates; the other parameter is analysed."""
    adapter = make_moe_adapter(tiny_moe(tmp_path / "base", "qwen3_moe"), tmp_path / "a")
    file = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in file if "experts" in k and "base_layer" not in k and "lora_A" in k)
    file[key][0, 0], file[key][-1, -1] = math.nan, -math.inf
    save_file(file, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = analyze_adapter(adapter, config=TINY, progress=False)
    layer = key.split(".layers.")[1].split(".")[0]
    bad = [m for m in result.modules if m.nonfinite]
    assert bad and all(m.nonfinite == 2 and math.isnan(m.fro) and m.expert is not None
                       and m.name.startswith(f"model.layers.{layer}.mlp.experts.")
                       and m.name.endswith(".down_proj") for m in bad)
    assert len(bad) == result.experts.num_experts
    assert any(m.expert is not None and not m.nonfinite for m in result.modules)
    assert math.isfinite(result.histogram.std)


@pytest.mark.parametrize("family", ["qwen2", "gpt_neox", "bloom", "falcon_rw", "falcon_7b",
                                    "falcon_40b"])
def test_other_families_qwen2_bias_and_fused_query_key_value(family, tmp_path):
    """Qwen2 (q/k/v carry biases: LoRA bias merges) and the fused query_key_value of GPT-NeoX,
    Bloom and Falcon, split into q/k/v by the per-head layout their config gives (Falcon: per head
    q, k, v without multi-query; all q then one k and v with it; per KV group with the new
    decoder), cut here with the same views the models' attention code applies."""
    from transformers import BloomConfig, FalconConfig, GPTNeoXConfig, Qwen2Config

    common = dict(vocab_size=120, hidden_size=64, bos_token_id=1, eos_token_id=2)
    targets, extra, view = ["query_key_value", "dense_4h_to_h"], {}, None
    if family == "qwen2":
        config = Qwen2Config(intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, **common)
        targets, extra = ["q_proj", "v_proj", "down_proj"], {"lora_bias": True}
    elif family == "gpt_neox":
        config = GPTNeoXConfig(intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, **common)
        view = (lambda d: d.view(4, 3, 16, -1), lambda v, i: v[:, i])
    elif family == "bloom":
        config = BloomConfig(n_layer=2, n_head=4, **common)
        view = (lambda d: d.view(4, 3, 16, -1), lambda v, i: v[:, i])
    else:
        config = FalconConfig(num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                              new_decoder_architecture=family == "falcon_40b",
                              multi_query=family == "falcon_7b", **common)
        if family == "falcon_rw":
            view = (lambda d: d.view(4, 3, 16, -1), lambda v, i: v[:, i])
        elif family == "falcon_7b":
            view = (lambda d: d.view(6, 16, -1), lambda v, i: v[[slice(0, 4), 4, 5][i]])
        else:
            view = (lambda d: d.view(2, 4, 16, -1), lambda v, i: v[:, [slice(0, 2), 2, 3][i]])
        targets = ["query_key_value", "dense_4h_to_h"]
    base = save_tiny_model(config, tmp_path / "base")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=targets,
                                **extra)
    reference = {}
    for name, delta in peft_deltas(base, adapter).items():
        if view is not None and name.endswith("query_key_value"):
            shaped, take = view
            for i, suffix in enumerate("qkv"):
                reference[f"{name}.{suffix}"] = take(shaped(delta), i).reshape(-1, delta.shape[1])
        else:
            reference[name] = delta
    result = analyze_adapter(adapter, base, config=TINY, progress=False)
    assert_matches_dense(result, reference)
    assert result.summary.layers_modified == [0, 1]
    groups = {m.component: m.group for m in result.modules}
    if family == "qwen2":
        assert groups["self_attn.v_proj"] == "attention" and groups["mlp.down_proj"] == "mlp"
        assert all(m.bias_delta_norm > 0 for m in result.modules)
        return
    attention = next(c for c in groups if c.endswith("query_key_value.k"))
    assert groups[attention] == "attention"
    assert {p.layer: set(p.roles) for p in result.layers} == {0: {"Q", "K", "V"}, 1: {"Q", "K", "V"}}
    # Without the base config.json the per-head layout is unknown: analysed whole, and said so.
    alone = analyze_adapter(adapter, config=TINY, progress=False)
    assert any(m.component.endswith("query_key_value") for m in alone.modules)
    assert any("query_key_value" in n or "Q/K/V" in n for n in alone.needs_base)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_target_parameters_each_expert_against_peft(family, tmp_path):
    """target_parameters on both expert parameters (PEFT nests the first under .base_layer),
    a per-parameter rank, and a plain q_proj: every expert's ΔW_e, split into gate/up, against
    PEFT's own get_delta_weight, with and without the base."""
    base = tiny_moe(tmp_path / "base", family)
    adapter = make_moe_adapter(base, tmp_path / "a", rank_pattern={"mlp.experts.down_proj": 3})
    reference = peft_deltas(base, adapter)
    experts = 4 if family == "mixtral" else 6
    assert len(reference) == 2 * (1 + 3 * experts)
    result = analyze_adapter(adapter, base, config=TINY, progress=False)
    assert_matches_dense(result, reference)
    by_name = {m.name: m for m in result.modules}
    down = by_name[f"model.layers.1.mlp.experts.{experts - 1}.down_proj"]
    gate = by_name["model.layers.0.mlp.experts.0.gate_proj"]
    assert (down.expert, down.rank, down.component, down.group) == (
        experts - 1, 3, "mlp.experts.down_proj", "mlp")
    # transformers 5 saves a Linear per expert (Mixtral: block_sparse_moe.experts.e.w1 = gate).
    weights = load_file(base / "model.safetensors")
    w = weights["model.layers.0.block_sparse_moe.experts.0.w1.weight" if family == "mixtral"
                else "model.layers.0.mlp.experts.0.gate_proj.weight"].double()
    assert (gate.rank, gate.shape) == (2, list(w.shape))
    assert gate.relative_fro == pytest.approx(float(reference[gate.name].norm() / w.norm()),
                                              rel=1e-9)
    # Aggregates: Σ‖ΔW_e‖_F per layer × expert, per parameter, per expert; the top experts.
    summary = result.experts
    assert summary.num_experts == experts and summary.top_k == 1
    assert sorted(summary.parameters) == ["down_proj", "gate_proj", "up_proj"]
    for layer in summary.layers:
        sums = [sum(float(reference[f"model.layers.{layer.layer}.mlp.experts.{e}.{p}"].norm())
                    for p in ("gate_proj", "up_proj", "down_proj")) for e in range(experts)]
        np.testing.assert_allclose(layer.fro_by_expert, sums, rtol=1e-9)
        assert layer.top_experts == [int(np.argmax(sums))]
        assert layer.top_share == pytest.approx(max(sums) / sum(sums), rel=1e-9)
    assert summary.fro_by_parameter["down_proj"] == pytest.approx(
        sum(float(d.norm()) for n, d in reference.items() if n.endswith("down_proj")), rel=1e-9)
    assert any("Which experts" in s or "experts" in s for s in narrate(result))
    assert any("MoE layers with" in s for s in narrate(result))
    assert AnalysisResult.from_dict(result.to_dict()).experts == summary
    # Without the base: the same experts, no relative change.
    alone = analyze_adapter(adapter, config=TINY, progress=False)
    assert alone.experts == summary or alone.experts.layers == summary.layers
    assert all(m.relative_fro is None for m in alone.modules)


@pytest.mark.parametrize("selection", ["all_linear_exclude", "layers_to_transform"])
def test_layers_to_transform_exclude_modules_and_all_linear(selection, llama_base, tmp_path):
    """PEFT's module selection: only the layers and modules it adapted are analysed, each against
    PEFT's own ΔW (PEFT refuses layers_to_transform with a str target_modules such as all-linear)."""
    if selection == "all_linear_exclude":
        kwargs = {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}
        layers = [0, 1]
    else:
        kwargs = {"target_modules": ALL_LLAMA[:4] + ["gate_proj", "up_proj"],
                  "layers_to_transform": [1]}
        layers = [1]
    adapter = make_lora_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8, **kwargs)
    result = analyze_adapter(adapter, llama_base, config=TINY, progress=False)
    assert_matches_dense(result, peft_deltas(llama_base, adapter))
    assert result.summary.layers_modified == layers
    assert {m.component for m in result.modules} == {f"self_attn.{p}_proj" for p in "qkvo"} | {
        "mlp.gate_proj", "mlp.up_proj"}


def test_what_peft_saves_but_tunelens_does_not_analyse_is_named(llama_base, tmp_path):
    """Trainable tokens (saved rows of the embedding), a LoRA variant's own tensor and a variant
    set in adapter_config.json are named in the warnings, never read as modules_to_save weights."""
    import json

    adapter = make_lora_adapter(llama_base, tmp_path / "a", r=2, lora_alpha=4,
                                target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    for base in (None, llama_base):
        result = analyze_adapter(adapter, base, config=TINY, progress=False)
        assert [m.component for m in result.modules] == ["self_attn.q_proj"] * 2
        assert any(w.startswith("not analysed: 1 trainable-token rows") and "384 values" in w
                   for w in result.warnings)
        assert not any("modules_to_save" in n for n in result.needs_base)
    variant = tmp_path / "variant"
    shutil.copytree(adapter, variant)
    tensors = load_file(variant / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_newvariant.weight"] = (
        torch.ones(2))
    save_file(tensors, variant / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((variant / "adapter_config.json").read_text())
    config["use_qalora"] = True
    (variant / "adapter_config.json").write_text(json.dumps(config))
    result = analyze_adapter(variant, config=TINY, progress=False)
    assert any("lora_newvariant tensors" in w and "layers.0.self_attn.q_proj" in w
               for w in result.warnings)
    assert any("use_qalora" in w and "QA-LoRA" in w for w in result.warnings)
    assert result.summary.trainable_params == sum(t.numel() for t in tensors.values())
