"""`tunelens compare` over real PEFT adapters of one tiny Llama and an analysis.json, vs dense math."""
from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from support.factories import make_lora_adapter
from tunelens.plugin.cli import main
from tunelens.registry_hooks.engine.analysis import analyze_adapter
from tunelens.registry_hooks.engine.compare import compare
from tunelens.registry_hooks.report.compare_page import write_comparison
from tunelens.registry_hooks.report.outputs import write_analysis
from support.cli_support import assert_one_line_error

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    first = make_lora_adapter(llama_base, root / "domain-a", r=4, lora_alpha=8,
                              target_modules=TARGETS, seed=0)
    second = make_lora_adapter(llama_base, root / "domain-b", r=8, lora_alpha=8,
                               target_modules=TARGETS[:2], seed=1)
    return first, second


def _dense_deltas(llama_base, adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), adapter)
    return {name.removeprefix("base_model.model."): module.get_delta_weight("default").double()
            for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}


def _phi(a, b):
    ua, sa, _ = torch.linalg.svd(a, full_matrices=False)
    ub, sb, _ = torch.linalg.svd(b, full_matrices=False)
    # float32 deltas: rounding noise sits near 1e-7·σ_1, the true rank (4 or 8) far above it
    ua, ub = ua[:, sa > sa.max() * 1e-4], ub[:, sb > sb.max() * 1e-4]
    return float((ua.T @ ub).square().sum()) / min(ua.shape[1], ub.shape[1])


def test_compare_against_dense_reference(adapters, llama_base):
    first, second = adapters
    comparison = compare([first, second, first], progress=False)
    assert comparison.labels == ["domain-a#1", "domain-b", "domain-a#3"]
    dense_a, dense_b = _dense_deltas(llama_base, first), _dense_deltas(llama_base, second)
    profile = [sum(float(d.norm()) for n, d in dense_a.items() if f"layers.{layer}." in n)
               for layer in (0, 1)]
    assert comparison.layers == [0, 1]
    assert comparison.profiles["domain-a#1"] == pytest.approx(profile, rel=1e-9)
    attention = sum(float(d.norm()) for n, d in dense_b.items())
    assert comparison.group_shares["domain-b"] == pytest.approx({"attention": 1.0})
    shares = comparison.group_shares["domain-a#1"]
    assert sum(shares.values()) == pytest.approx(1.0) and 0 < shares["attention"] < 1
    assert attention > 0
    ab = next(p for p in comparison.overlaps if {p.a, p.b} == {"domain-a#1", "domain-b"})
    assert set(ab.modules) == set(dense_b)  # only modules both adapters train
    for name, phi in ab.modules.items():
        assert phi == pytest.approx(_phi(dense_a[name], dense_b[name]), rel=1e-5)
    same = next(p for p in comparison.overlaps if {p.a, p.b} == {"domain-a#1", "domain-a#3"})
    assert same.mean == pytest.approx(1.0)


def _top_rows(delta, k):
    return set(torch.linalg.vector_norm(delta, dim=1).topk(k).indices.tolist())


def test_top_shifted_neurons_shared_against_dense_reference(adapters, llama_base, tmp_path):
    """Per module: |top-k rows of ΔW_a ∩ top-k rows of ΔW_b| / k by ‖ΔW_i‖₂; overall: the same
    over each adapter's top-k neurons of all modules (k = analysis.top_neurons, 20)."""
    first, second = adapters
    comparison = compare([first, second, first], progress=False)
    dense_a, dense_b = _dense_deltas(llama_base, first), _dense_deltas(llama_base, second)
    ab = next(p for p in comparison.neuron_overlaps if (p.a, p.b) == ("domain-a#1", "domain-b"))
    assert ab.k == 20 and set(ab.modules) == set(dense_b)
    for name, share in ab.modules.items():
        assert share == len(_top_rows(dense_a[name], 20) & _top_rows(dense_b[name], 20)) / 20
    assert ab.mean == pytest.approx(sum(ab.modules.values()) / len(ab.modules))

    def overall(dense):
        rows = [(float(norm), name, i) for name, delta in dense.items()
                for i, norm in enumerate(torch.linalg.vector_norm(delta, dim=1))]
        return {(name, i) for _, name, i in sorted(rows, reverse=True)[:20]}

    shared = len(overall(dense_a) & overall(dense_b))
    assert (ab.shared, ab.share) == (shared, shared / 20)
    same = next(p for p in comparison.neuron_overlaps if (p.a, p.b) == ("domain-a#1", "domain-a#3"))
    assert (same.shared, same.share, same.mean) == (20, 1.0, 1.0)
    assert len(comparison.neuron_overlaps) == 3  # every pair, beside the subspace overlap
    _, html_path, _ = write_comparison(comparison, tmp_path)
    html = html_path.read_text()
    assert html.count("top-20 rows shared") == 3 and "φ (subspace)" in html
    assert f"Top shifted neurons: {shared} of the top 20 neurons" in html


def test_cli_report_with_an_analysis_json(adapters, tmp_path, capsys):
    first, second = adapters
    saved = tmp_path / "a-analysis"
    write_analysis(analyze_adapter(first, progress=False), saved)
    out = tmp_path / "out"
    assert main(["compare", str(saved / "analysis.json"), str(second), "--out", str(out),
                 "--no-progress"]) == 0
    assert "subspace overlap and the per-module overlap of top neurons need" in (
        capsys.readouterr().err)
    data = json.loads((out / "compare.json").read_text())
    assert data["schema"] == "tunelens.compare/1" and data["labels"] == ["a-analysis", "domain-b"]
    assert data["overlaps"] == []
    # The overall top-neuron overlap needs only the two analyses' top lists.
    [neurons] = data["neuron_overlaps"]
    assert neurons["modules"] == {} and neurons["mean"] is None and neurons["share"] is not None
    html = (out / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained
    assert "Per-layer profiles" in html and "Top shifted neurons:" in html


def test_bad_compare_inputs(adapters, tmp_path, capsys):
    first, second = adapters
    assert_one_line_error(capsys, ["compare", str(first), "--no-progress"], "at least two")
    assert_one_line_error(capsys, ["compare", str(first), str(tmp_path / "nope"), "--no-progress"], "does not exist")
    assert_one_line_error(capsys, ["compare", str(first), str(tmp_path), "--no-progress"], "neither a LoRA adapter")
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"schema": "something/else"}))
    assert_one_line_error(capsys, ["compare", str(first), str(bogus), "--no-progress"], "not a tunelens analysis.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in second.iterdir():
        (elsewhere / f.name).write_bytes(f.read_bytes())
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "another/model"
    (elsewhere / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(capsys, ["compare", str(first), str(elsewhere), "--no-progress"], "not the same base model",
                    "another/model")


def test_full_fine_tunes_of_different_sizes_line_up_by_relative_depth(tmp_path, capsys):
    """Two full diffs, 2 and 4 layers (different bases): relative change per layer at depth ℓ/L
    against the dense sqrt(Σ‖ΔW‖²)/sqrt(Σ‖W‖²) over the layer's tensors, one chart."""
    from safetensors.torch import load_file
    from support.factories import perturbed_copy, tiny_llama

    outs, dense = [], {}
    for layers in (2, 4):
        base = tiny_llama(tmp_path / f"base-{layers}", layers=layers, hidden=64, heads=1,
                          kv_heads=1, intermediate=128, seed=layers)
        tuned = perturbed_copy(base, tmp_path / f"tuned-{layers}", {"mlp": 0.01 * layers})
        out = tmp_path / f"size-{layers}"
        assert main(["analyze", str(tuned), "--base", str(base), "--out", str(out),
                     "--no-progress"]) == 0
        outs.append(out / "analysis.json")
        w, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
        dense[f"size-{layers}"] = [
            (sum(float((t[k] - w[k]).double().square().sum()) for k in w
                 if f"layers.{layer}." in k)
             / sum(float(w[k].double().square().sum()) for k in w if f"layers.{layer}." in k))
            ** 0.5 for layer in range(layers)]
    out = tmp_path / "compared"
    assert main(["compare", *map(str, outs), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    profiles = {p["label"]: p for p in data["depth_profiles"]}
    assert profiles["size-2"]["depth"] == [0.0, 0.5]
    assert profiles["size-4"]["depth"] == [0.0, 0.25, 0.5, 0.75]
    for label, values in dense.items():
        assert profiles[label]["relative_change"] == pytest.approx(values, rel=1e-5)
    assert data["base_model"] is None  # two bases: compared by depth, not refused
    assert (out / "charts" / "compare_relative_depth.png").stat().st_size > 1000
    assert "Full fine-tunes by relative depth" in (out / "compare.html").read_text()


def test_full_ensemble_solo_norms_in_the_full_runs_top_layers(tmp_path):
    """compare FULL ENSEMBLE SOLO: per group, the full run's top 3 layers by S_ℓ within the group,
    and each run's mean group S_ℓ over those it adapted (the soloist: its one layer), against
    PEFT's dense ΔW."""
    from support.factories import tiny_llama
    from tunelens.registry_hooks.engine.retune import rank_layers

    base = tiny_llama(tmp_path / "base", layers=4, hidden=64, heads=1, kv_heads=1,
                      intermediate=128)
    full = make_lora_adapter(base, tmp_path / "full", r=4, lora_alpha=8, target_modules=TARGETS)
    top = [layer for layer, _ in rank_layers(analyze_adapter(full, progress=False), "mlp")[:3]]
    mlp = ["gate_proj", "down_proj"]
    ensemble = make_lora_adapter(base, tmp_path / "ensemble", r=4, lora_alpha=8, seed=1,
                                 target_modules=mlp, layers_to_transform=top)
    solo = make_lora_adapter(base, tmp_path / "solo", r=4, lora_alpha=8, seed=2,
                             target_modules=mlp, layers_to_transform=top[:1])
    comparison = compare([full, ensemble, solo], progress=False)
    norms = {n.group: n for n in comparison.top_layer_norms}

    def mlp_norm(adapter, layer):
        return sum(float(d.norm()) for name, d in _dense_deltas(base, adapter).items()
                   if f"layers.{layer}.mlp." in name)

    dense_full = {layer: mlp_norm(full, layer) for layer in range(4)}
    assert norms["mlp"].layers == sorted(dense_full, key=lambda l: -dense_full[l])[:3] == top
    expected = {"full": sum(dense_full[l] for l in top) / 3,
                "ensemble": sum(mlp_norm(ensemble, l) for l in top) / 3,
                "solo": mlp_norm(solo, top[0])}
    assert norms["mlp"].mean_norm == pytest.approx(expected, rel=1e-9)
    assert norms["mlp"].layers_adapted == {"full": 3, "ensemble": 3, "solo": 1}
    assert norms["attention"].mean_norm["solo"] is None  # the soloist trained only the MLP
    out = tmp_path / "out"
    assert main(["compare", str(full), str(ensemble), str(solo), "--out", str(out),
                 "--no-progress"]) == 0
    page = (out / "compare.html").read_text()
    assert "Norms in the first input&#39;s top layers" in page
    assert f"mlp: top 3 layers of full ({', '.join(map(str, top))})" in page
