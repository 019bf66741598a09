"""The narrative names what the numbers say: checked on adapters with a known, planted answer."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from support.dense_result import dense_result, llama_like_result, lora_delta
from tunelens.config import load_config, with_changes
from tunelens.registry_hooks.engine.result import FullFinetuneInfo
from tunelens.registry_hooks.report.charts import DPI
from tunelens.registry_hooks.report.outputs import write_analysis
from tunelens.registry_hooks.report.narrative import (GLOSSARY, component_order, fmt, narrate,
                                               narrate_layer, narrate_sections)


def _sentence(sentences: list[str], needle: str) -> str:
    hits = [s for s in sentences if needle in s]
    assert hits, f"no sentence contains {needle!r}:\n" + "\n".join(sentences)
    return hits[0]


def test_most_and_least_changed_layer_and_their_ratio():
    result = llama_like_result(layer_magnitudes=(1.0, 3.0, 0.5, 2.0), base_params=10_000_000)
    per_layer = defaultdict(float)
    for m in result.modules:  # recomputed from the modules, not read from result.layers
        per_layer[m.layer] += m.fro
    ratio = per_layer[1] / per_layer[2]
    assert 4 < ratio < 9  # the planted 3.0 / 0.5, up to the random factors
    sentence = _sentence(narrate(result), "most-changed layer")
    assert re.search(r"most-changed layer is layer 1\b", sentence)
    assert re.search(r"least-changed is layer 2\b", sentence)
    assert f"{ratio:.1f}× range" in sentence
    assert "wide spread" in sentence


def test_even_layers_read_as_even_and_depth_trend_is_named():
    even = narrate(llama_like_result(layer_magnitudes=(1.0, 1.05, 1.0, 1.02)))
    assert "narrow spread" in _sentence(even, "most-changed layer")
    growing = narrate(llama_like_result(layer_magnitudes=(1.0, 2.0, 3.0, 4.0)))
    assert "grows with depth" in _sentence(growing, "depth")
    shrinking = narrate(llama_like_result(layer_magnitudes=(4.0, 3.0, 2.0, 1.0)))
    assert "shrinks with depth" in _sentence(shrinking, "depth")


def test_dominant_group_and_component():
    result = llama_like_result(role_magnitudes={"mlp.down_proj": 6.0, "mlp.up_proj": 3.0,
                                                "mlp.gate_proj": 3.0})
    sentences = narrate(result)
    group = _sentence(sentences, "By group")
    attention, mlp = result.summary.group_fro["attention"], result.summary.group_fro["mlp"]
    assert re.search(r"splits MLP \d+%, attention \d+%", group)
    assert f"{mlp / attention:.1f}× as much as attention" in group
    component = _sentence(sentences, "changed most on average")
    assert component.startswith("Per layer, mlp.down_proj changed most")


@pytest.mark.parametrize("boost, reading", [
    ({"self_attn.v_proj": 5.0, "self_attn.o_proj": 5.0}, "Value and Output together hold"),
    ({"self_attn.q_proj": 5.0, "self_attn.k_proj": 5.0}, "Query and Key together hold"),
])
def test_qkvo_balance_names_the_dominant_pair(boost, reading):
    result = llama_like_result(role_magnitudes=boost)
    sentences = narrate_sections(result)["qkvo"]
    assert reading in " ".join(sentences)
    top_role = "Value (V)" if "self_attn.v_proj" in boost else "Query (Q)"
    top_role_alt = "Output (O)" if "self_attn.v_proj" in boost else "Key (K)"
    first = sentences[0]
    assert re.search(rf"({re.escape(top_role)}|{re.escape(top_role_alt)}) absorbed the most", first)


def test_drift_is_reported_when_the_mean_sits_away_from_zero():
    rng = np.random.default_rng(1)
    deltas = [(layer, "self_attn.q_proj", lora_delta(rng, 32, 32, 4, 2.0) + 0.8)
              for layer in range(3)]
    result = dense_result(deltas, r=4, alpha=8, num_layers=3)
    text = " ".join(narrate_sections(result)["histogram"])
    drift = result.histogram.mean / result.histogram.std
    assert drift > 0.1
    assert f"{drift:.2f} standard deviations above zero" in text and "drift" in text


def test_centred_histogram_has_no_drift_and_heavy_tails_are_named():
    result = llama_like_result()
    h = result.histogram
    text = " ".join(narrate_sections(result)["histogram"])
    assert "no overall drift" in text
    assert h.excess_kurtosis > 1  # products of Gaussian factors are heavy-tailed
    assert f"{h.share_within_one_std * 100:.1f}% of the entries lie within one standard" in text
    assert "heavy tails" in text and "more than the 68.3%" in text


def test_gaussian_dense_delta_reads_as_bell_shaped():
    rng = np.random.default_rng(2)
    deltas = [(0, "self_attn.q_proj", rng.normal(size=(200, 200)))]
    result = dense_result(deltas, r=200, alpha=200, num_layers=1)
    text = " ".join(narrate_sections(result)["histogram"])
    assert abs(result.histogram.excess_kurtosis) < 0.2
    assert "bell-shaped" in text and "about the same as the 68.3%" in text


def test_rank_utilisation_low_when_one_direction_dominates():
    rng = np.random.default_rng(3)
    weights = np.array([50.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01])

    def dominated(out_dim, in_dim):
        u, _ = np.linalg.qr(rng.normal(size=(out_dim, 8)))
        v, _ = np.linalg.qr(rng.normal(size=(in_dim, 8)))
        return (u * weights) @ v.T

    result = dense_result([(l, "self_attn.q_proj", dominated(48, 48)) for l in range(2)],
                          r=8, alpha=16, num_layers=2)
    text = " ".join(narrate_sections(result)["rank"])
    util = np.mean([m.rank_utilisation for m in result.modules])
    assert util < 0.35
    assert f"uses {util * 100:.0f}% of its rank (r = 8)" in text
    assert "a smaller rank would likely" in text
    high = " ".join(narrate_sections(llama_like_result())["rank"])
    assert "nearly all available directions" in high


def test_trainable_share_and_missing_base():
    with_base = narrate_sections(llama_like_result(base_params=1_000_000))["summary"][0]
    assert "32,768 parameters: 3.277% of the base model's 1,000,000" in with_base
    result = llama_like_result()
    without = narrate_sections(result)
    assert "share of the base model is unknown" in without["summary"][0]
    skipped = without["base"][-1]
    assert "relative change; amplification factor; intruder dimensions" in skipped
    assert "--base" in skipped


def test_base_metrics_are_read_when_present():
    result = llama_like_result()
    for i, m in enumerate(result.modules):
        m.relative_fro = 0.01 * (i + 1)
        m.intruder_dimensions = 1 if i == 3 else 0
    result.needs_base = []
    text = " ".join(narrate_sections(result)["base"])
    top = result.modules[-1]
    assert f"largest relative change is {top.relative_fro * 100:.2f}% in {top.name}" in text
    assert f"1 of {len(result.modules)} modules have intruder dimensions" in text
    assert "--base" not in text


def test_nonfinite_weights_come_first_and_name_the_module():
    result = llama_like_result()
    broken = result.modules[5]
    broken.nonfinite = 7
    result.summary.nonfinite_modules = [broken.name]
    first = narrate(result)[0]
    assert first.startswith("Warning: 1 module contains NaN or Inf values (7 entries)")
    assert broken.name in first


def test_top_neuron_is_named():
    result = llama_like_result(layer_magnitudes=(1.0, 5.0, 1.0))
    top = result.top_neurons[0]
    text = " ".join(narrate_sections(result)["neurons"])
    assert f"row {top.index} of layer {top.layer} {top.component}" in text
    assert "Layer 1 holds" in text


def test_neuron_sentences_and_chart_read_to_the_settings_top_neurons(tmp_path):
    """The narrative and the top-neuron chart use analysis.top_neurons from the settings passed
    down, not fixed cuts: 15 and 6 here, on a result that keeps 20."""
    result = llama_like_result(layer_magnitudes=(1.0, 5.0, 1.0))
    assert len(result.top_neurons) == 20
    for limit in (15, 20):
        settings = with_changes(None, {"analysis": {"top_neurons": limit}}).analysis
        text = " ".join(narrate_sections(result, settings)["neurons"])
        held = Counter(t.layer for t in result.top_neurons[:limit])[1]
        assert f"Layer 1 holds {held} of the top {limit}" in text
    files = write_analysis(result, tmp_path, config=with_changes(load_config(), {
        "analysis": {"top_neurons": 6, "png_charts": True}}))
    document = json.loads(files.json_path.read_text())
    held = Counter(t.layer for t in result.top_neurons[:6])[1]
    assert any(f"Layer 1 holds {held} of the top 6" in s for s in document["narrative"])
    chart = Image.open(tmp_path / "charts" / "top_neurons.png")
    assert chart.height == int((0.26 * 6 + 1.3) * DPI)  # six bars (20 would be 715 px)


def test_every_sentence_is_finished_and_free_of_nan():
    for result in (llama_like_result(), llama_like_result(layer_magnitudes=(2.0,))):
        for sentence in narrate(result):
            assert sentence.endswith("."), sentence
            assert "nan" not in sentence.lower().replace("nan or inf", ""), sentence


def test_glossary_covers_every_term_the_report_uses():
    terms = " ".join(GLOSSARY).lower()
    for term in ("δw", "lora", "rank", "alpha", "scale", "frobenius", "spectral norm",
                 "singular values", "effective rank", "stable rank", "energy rank",
                 "rank utilisation", "relative change", "amplification", "intruder",
                 "top shifted neuron", "heatmap", "drift", "kurtosis"):
        assert term in terms, term
    assert all(len(v) > 40 and v.endswith(".") for v in GLOSSARY.values())


# ---- on the real engine: a real PEFT adapter whose layer 1 was scaled up after training ----

def _planted_adapter(llama_base, out_dir, layer_factor: float):
    """A real PEFT adapter with layer 1's lora_B multiplied by `layer_factor`."""
    from safetensors.torch import load_file, save_file
    from support.factories import make_lora_adapter

    adapter = make_lora_adapter(llama_base, out_dir, r=8, lora_alpha=16,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in tensors:
        if ".layers.1." in key and "lora_B" in key:
            tensors[key] = tensors[key] * layer_factor
    save_file(tensors, path)
    return adapter, tensors


def _dense_layer_sums(tensors, scale: float) -> dict[int, float]:
    """Σ over a layer's modules of ‖s·B·A‖_F, from materialised ΔW (the slow reference)."""
    sums: dict[int, float] = defaultdict(float)
    for key, a in tensors.items():
        if "lora_A" not in key:
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        layer = int(re.search(r"\.layers\.(\d+)\.", key).group(1))
        sums[layer] += float((scale * b.double() @ a.double()).norm())
    return sums


def test_engine_narrative_names_the_planted_layer_and_ratio(llama_base, tmp_path):
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    adapter, tensors = _planted_adapter(llama_base, tmp_path / "adapter", layer_factor=4.0)
    result = analyze_adapter(adapter, progress=False)
    sums = _dense_layer_sums(tensors, scale=16 / 8)
    ratio = sums[1] / sums[0]
    assert ratio > 3
    sentence = _sentence(narrate(result), "most-changed layer")
    assert "most-changed layer is layer 1 " in sentence and "least-changed is layer 0 " in sentence
    assert f"{ratio:.1f}× range" in sentence
    assert f"(summed ‖ΔW‖_F {fmt(sums[1])})" in sentence
    assert "wide spread" in sentence


def test_engine_narrative_with_base_reports_share_and_relative_change(llama_base, llama_adapter):
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    result = analyze_adapter(llama_adapter, llama_base, progress=False)
    sections = narrate_sections(result)
    assert result.summary.base_params and result.summary.trainable_share
    assert f"{result.summary.base_params:,}" in sections["summary"][0]
    assert "base" in sections and "--base" not in " ".join(sections["base"])
    top = max(result.modules, key=lambda m: m.relative_fro)
    assert top.name in " ".join(sections["base"])


def test_layer_story_places_the_layer_and_names_its_largest_module():
    result = llama_like_result(layer_magnitudes=(1.0, 3.0, 0.5, 2.0),
                               role_magnitudes={"mlp.down_proj": 4.0})
    top = narrate_layer(result, 1)
    assert top[0].startswith("Layer 1 is the most-changed of 4 layers")
    sums = {l.layer: l.fro_sum for l in result.layers}
    assert f"{sums[1] / sums[2]:.1f}× the least-changed layer" in top[0]
    assert top[1].startswith("Its largest change is in mlp.down_proj")
    assert narrate_layer(result, 2)[0].startswith("Layer 2 is the least-changed of 4 layers")
    assert narrate_layer(result, 3)[0].startswith("Layer 3 is number 2 by size of change")
    assert narrate_layer(result, 99) == []


def test_components_read_in_model_order():
    result = llama_like_result(layer_magnitudes=(1.0,))
    result.modules.reverse()  # engine order must not matter
    assert component_order(result) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                       "mlp.down_proj"]


def test_full_finetune_diff_is_not_described_as_lora():
    """full_diff.py reuses the page for a full fine-tune: no LoRA rank, 'the fine-tune' speaks."""
    result = llama_like_result(base_params=1_000_000, role_magnitudes={"self_attn.q_proj": 6.0,
                                                                       "self_attn.k_proj": 6.0})
    result.adapter = FullFinetuneInfo(result.adapter.base_model_name_or_path)
    for m in result.modules:
        m.kind = "full"
    text = " ".join(narrate(result))
    assert text.startswith(f"The fine-tune changed {result.summary.trainable_params:,} of the base "
                           f"model's 1,000,000 parameters (3.3%): {len(result.modules)} of "
                           f"{len(result.modules)} weight matrices moved.")
    assert "LoRA rank" not in text and "adapter" not in text.lower() and "trains" not in text
    assert "of its rank" not in text and "r = " not in text
    assert "the fine-tune mainly changed what the model pays attention to" in text


def test_a_component_that_did_not_move_is_said_so():
    result = llama_like_result(layer_magnitudes=(1.0, 2.0))
    for layer in result.layers:
        layer.components["self_attn.v_proj"] = 0.0
    sentence = _sentence(narrate(result), "changed most on average")
    assert "while nothing changed in self_attn.v_proj" in sentence and "inf" not in sentence
