"""Full fine-tune diffs against dense torch references, on tiny Llama pairs built from configs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.factories import perturbed_copy
from tunelens.config import with_changes
from tunelens.plugin.cli import main
from tunelens.registry_hooks.engine import lora_math
from tunelens.registry_hooks.engine.full_diff import diff_models, randomized_svd, stratified_positions
from tunelens.registry_hooks.engine.result import AnalysisResult, json_safe
from support.cli_support import assert_one_line_error
from tunelens.registry_hooks.report.narrative import narrate

SCALES = {"layers.1.mlp.down_proj": 0.05, "layers.0.self_attn.q_proj": 0.01,
          "layers.1.self_attn.v_proj": 0.02}


@pytest.fixture(scope="module")
def pair(llama_base, tmp_path_factory):
    """(base bf16 single file, fine-tuned bf16 in 3 shards with an index)."""
    root = tmp_path_factory.mktemp("full-diff")
    base = perturbed_copy(llama_base, root / "base", {}, dtype=torch.bfloat16)
    tuned = perturbed_copy(base, root / "tuned", SCALES, seed=1, shards=3)
    return base, tuned


def _dense(base: Path, tuned: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    w = load_file(base / "model.safetensors")
    t = {}
    for f in tuned.glob("*.safetensors"):
        t.update(load_file(f))
    return {k: (w[k].double(), t[k].double() - w[k].double()) for k in w}


def test_exact_metrics_match_dense_reference(pair):
    base, tuned = pair
    assert (tuned / "model.safetensors.index.json").is_file()
    result = diff_models(tuned, base, progress=False)
    dense = _dense(base, tuned)
    modules = {m.name + ".weight": m for m in result.modules}
    diffs = {d["name"]: d for d in json_safe(result.full_diff)["tensors"]}
    changed = [k for k, (_, d) in dense.items() if d.abs().max() > 0]
    assert sorted(changed) == sorted(k for k in diffs if diffs[k]["fro"] > 0)
    for key in changed:
        w, delta = dense[key]
        d = diffs[key]
        # float32 reductions (cascaded sums): about 1e-6 relative
        assert d["fro"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert d["relative_fro"] == pytest.approx(float(delta.norm() / w.norm()), rel=1e-5)
        if delta.ndim != 2:
            continue
        singular = torch.linalg.svdvals(delta)
        m = modules[key]
        assert m.spectral == pytest.approx(float(singular[0]), rel=1e-6)
        assert m.singular_values == pytest.approx(singular[:16].tolist(), rel=1e-6)
        rank = int((singular > 0.01 * singular[0]).sum())
        assert d["rank"] == rank and d["relative_rank"] == pytest.approx(rank / min(delta.shape))
        assert d["energy_rank_90"] == lora_math.energy_rank(singular, 0.9)
        assert m.intruder_dimensions == lora_math.intruder_dimensions(w, w + delta, 10, 0.5)
        assert m.min == pytest.approx(float(delta.min())) and m.max == pytest.approx(float(delta.max()))
    # the grid: layer × matrix type, relative change where the noise went, 0 elsewhere
    grid = json_safe(result.full_diff)["grid"]
    assert grid["layers"] == [0, 1] and grid["matrix_types"] == ["q", "k", "v", "o", "gate", "up", "down"]
    rel = grid["metrics"]["relative_fro"]
    assert rel[1][6] == pytest.approx(diffs["model.layers.1.mlp.down_proj.weight"]["relative_fro"])
    assert rel[0][0] > 0 and rel[1][2] > 0 and rel[0][4] == 0.0
    assert result.summary.layers_modified == [0, 1]
    assert result.full_diff.tensors_unchanged == len(dense) - len(changed)
    # Per module: every weight matrix of the model; per layer: S_ℓ over a layer's matrices.
    matrix_norms = {k: float(d.norm()) for k, (_, d) in dense.items() if d.ndim == 2}
    summary = result.summary
    assert summary.mean_module_fro == pytest.approx(sum(matrix_norms.values()) / len(matrix_norms),
                                                    rel=1e-5)
    assert summary.max_module_fro == pytest.approx(max(matrix_norms.values()), rel=1e-5)
    sums = [sum(v for k, v in matrix_norms.items() if f"layers.{layer}." in k) for layer in (0, 1)]
    assert summary.mean_layer_fro_sum == pytest.approx(sum(sums) / 2, rel=1e-5)
    assert summary.max_layer_fro_sum == pytest.approx(max(sums), rel=1e-5)


def test_large_matrix_path_agrees_with_dense(pair):
    base, tuned = pair
    config = with_changes(None, {"full_diff": {"exact_max_dim": 0, "top_singular_values": 4,
                                               "lanczos_min_dim": 1}})
    result = diff_models(tuned, base, config=config, progress=False)
    dense = _dense(base, tuned)
    diffs = {d["name"]: d for d in json_safe(result.full_diff)["tensors"]}
    for m in result.modules:
        w, delta = dense[m.name + ".weight"]
        singular = torch.linalg.svdvals(delta)
        assert m.singular_values == pytest.approx(singular[:4].tolist(), rel=1e-5, abs=1e-12)
        rank = int((singular > 0.01 * singular[0]).sum()) if m.fro > 0 else 0
        assert diffs[m.name + ".weight"]["rank"] == rank, m.name
    noisy = diffs["model.layers.1.mlp.down_proj.weight"]
    # isotropic noise is high-rank: past min(m, n)/4 values every σ comes from the Gram matrix
    assert noisy["spectrum_exact"] and noisy["relative_rank"] > 0.5
    assert all(m.intruder_dimensions is None for m in result.modules)  # off for large by default
    config = with_changes(config, {"full_diff": {"intruders_randomized": True,
                                                 "intruder_reference_k": 128}})
    bounded = diff_models(tuned, base, config=config, progress=False)
    for m in bounded.modules:
        w, delta = dense[m.name + ".weight"]
        exact = lora_math.intruder_dimensions(w, w + delta, 10, 0.5)
        assert exact <= m.intruder_dimensions <= 10, m.name


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """(base, tuned) float32 Llamas 320 wide, so min(m, n) > exact_max_dim (256): layer 0's
    q_proj moved by a planted ΔW of 40 singular values from 1 down to 0.02 over a tail of 60 at
    0.004 (rank 40 at rtol 0.01); layer 1's down_proj by noise (full rank)."""
    from safetensors.torch import save_file
    from support.factories import tiny_llama

    root = tmp_path_factory.mktemp("planted")
    base = tiny_llama(root / "base", hidden=320, heads=5, kv_heads=5, intermediate=640)
    weights = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    spectrum = torch.cat([torch.logspace(0, math.log10(0.02), 40, dtype=torch.float64),
                          torch.full((60,), 0.004, dtype=torch.float64)])
    u = torch.linalg.qr(torch.randn(320, 100, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(320, 100, generator=g, dtype=torch.float64))[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    weights[q] = (weights[q].double() + (u * spectrum) @ v.T).float()
    down = "model.layers.1.mlp.down_proj.weight"
    weights[down] = weights[down] + 0.01 * torch.randn(weights[down].shape, generator=g)
    tuned = root / "tuned"
    tuned.mkdir()
    shutil.copy(base / "config.json", tuned / "config.json")
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    return base, tuned


@pytest.mark.parametrize("lanczos_min_dim", [300, 4096])
def test_rank_of_large_matrices_is_exact_at_the_threshold(planted_pair, tmp_path,
                                                          lanczos_min_dim):
    """Above exact_max_dim the rank is counted exactly, not bounded by the first 16 σ's: from
    Lanczos singular values down to the threshold (lanczos_min_dim 300) or every σ of the Gram
    matrix (the default, 4096). The planted q_proj has rank 40, the noisy down_proj its dense
    count."""
    base, tuned = planted_pair
    config = with_changes(None, {"full_diff": {"lanczos_min_dim": lanczos_min_dim}})
    result = diff_models(tuned, base, config=config, progress=False)
    dense = _dense(base, tuned)
    diffs = {d.name: d for d in result.full_diff.tensors}
    q = diffs["model.layers.0.self_attn.q_proj.weight"]
    # Lanczos stops at the first σ below the threshold; the Gram matrix gives every σ.
    assert (q.rank, q.relative_rank, q.spectrum_exact) == (40, 40 / 320, lanczos_min_dim > 320)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        singular = torch.linalg.svdvals(dense[key][1])
        assert diffs[key].rank == int((singular > 0.01 * singular[0]).sum()), key
        module = next(m for m in result.modules if m.name + ".weight" == key)
        assert module.singular_values == pytest.approx(singular[:16].tolist(), rel=1e-5)
    assert diffs["model.layers.1.mlp.down_proj.weight"].relative_rank > 0.5
    grid = result.full_diff.grid
    assert grid.rows("relative_rank")[0][grid.matrix_types.index("q")] == 40 / 320
    sentence = next(s for s in narrate(result) if s.startswith("Relative rank of ΔW"))
    assert "median" in sentence and "lower bound" not in sentence
    if lanczos_min_dim > 320:
        return
    out = tmp_path / "out"
    assert main(["analyze", str(tuned), "--base", str(base), "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "charts" / "full_diff_relative_rank.png").stat().st_size > 1000
    assert "the relative rank is the number of singular values of ΔW above 0.01·σ_1" in (
        out / "report.html").read_text()


def test_randomized_svd_with_power_iterations():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    a = low + 0.3 * torch.randn(300, 200, generator=g)
    _, top, _ = randomized_svd([a.double()], 5, 8, 2, g)
    assert top.tolist() == pytest.approx(torch.linalg.svdvals(a.double())[:5].tolist(), rel=0.01)
    # the operator form: Σ terms without materialising their sum
    _, split, _ = randomized_svd([low.double(), (a - low).double()], 5, 8, 2, g)
    assert split.tolist() == pytest.approx(top.tolist(), rel=0.01)


def test_cli_writes_full_diff_outputs_and_round_trips(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "out"
    assert main(["analyze", str(tuned), "--base", str(base), "--out", str(out), "--no-progress",
                 "--retune"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["schema"] == "tunelens.analysis/1" and data["adapter"]["peft_type"] == "FULL"
    assert data["full_diff"]["grid"]["layers"] == [0, 1]
    assert json_safe(AnalysisResult.from_dict(data).full_diff) == data["full_diff"]
    html = (out / "report.html").read_text()
    assert "Full fine-tune diff" in html and "data:image/png;base64," in html
    assert (out / "charts" / "full_diff_relative_change.png").stat().st_size > 1000
    mlp = json.loads((out / "retune" / "soloist_mlp.json").read_text())
    assert mlp["layers_to_transform"] == [1]
    assert mlp["target_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def test_bad_inputs_one_line(pair, llama_base, tmp_path, capsys):
    base, tuned = pair
    # a different architecture (config.json)
    other = shutil.copytree(tuned, tmp_path / "deeper")
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(config))
    assert_one_line_error(capsys, ["analyze", str(other), "--base", str(base)], "num_hidden_layers",
                    "architectures differ")
    # a tensor missing from the fine-tuned model: the first such name is given
    from safetensors.torch import save_file
    missing = perturbed_copy(base, tmp_path / "missing", {})
    weights = load_file(missing / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, missing / "model.safetensors")
    assert_one_line_error(capsys, ["analyze", str(missing), "--base", str(base)],
                    "model.layers.0.mlp.up_proj.weight", "only in")
    # a tensor of another shape
    wrong = perturbed_copy(base, tmp_path / "wrong", {})
    weights = load_file(wrong / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"][:-1].contiguous()
    save_file(weights, wrong / "model.safetensors")
    assert_one_line_error(capsys, ["analyze", str(wrong), "--base", str(base)], "lm_head.weight",
                    "shapes differ")
    # a full model without --base, a missing base, a truncated shard
    assert_one_line_error(capsys, ["analyze", str(tuned)], "full model directory", "--base")
    assert_one_line_error(capsys, ["analyze", str(tuned), "--base", str(tmp_path / "nope")], "does not exist")
    broken = shutil.copytree(tuned, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error(capsys, ["analyze", str(broken), "--base", str(base)], "corrupt")
    assert_one_line_error(capsys, ["analyze"], "--checkpoints")
    assert_one_line_error(capsys, ["--config", str(_config(tmp_path, "full_diff:\n  power_iterations: 1\n")),
                             "analyze", str(tuned), "--base", str(base)], "power_iterations")


def _config(tmp_path, text):
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_histogram_never_samples_more_entries_than_exist(pair):
    """A pair smaller than analysis.histogram_sample_entries: every entry once, an exact histogram
    (the old draw with replacement reported 1,999,998 samples of 783,360 entries)."""
    base, tuned = pair
    result = diff_models(tuned, base, config=with_changes(None, {"analysis": {"histogram_sample_entries": 2_000_000}}),
                         progress=False)
    dense = _dense(base, tuned)
    entries = torch.cat([d.reshape(-1) for _, d in dense.values() if d.ndim == 2])
    h = result.histogram
    assert h.total_entries == entries.numel() < 2_000_000
    assert h.exact and h.sample_size is None and h.share_within_one_std_error is None
    assert sum(h.counts) == entries.numel()
    reference = torch.histogram(entries, len(h.counts), range=(h.min, h.max))[0]
    assert h.counts == [int(c) for c in reference]
    # a quota below the population: a sample, never larger than asked for
    config = with_changes(None, {"analysis": {"histogram_sample_entries": 5000}})
    sampled = diff_models(tuned, base, config=config, progress=False).histogram
    assert not sampled.exact and sampled.share_within_one_std_error is not None
    # per-matrix quotas are rounded: within one entry per matrix of the 5000 asked for
    assert abs(sampled.sample_size - 5000) <= len(result.modules)
    assert sum(sampled.counts) == sampled.sample_size < sampled.total_entries


def test_stratified_positions_are_distinct_and_cover_small_populations():
    g = torch.Generator().manual_seed(0)
    drawn = stratified_positions(1000, 999, g)
    assert drawn.numel() == 999 == drawn.unique().numel()
    assert int(drawn.min()) >= 0 and int(drawn.max()) < 1000
    assert stratified_positions(10, 25, g).tolist() == list(range(10))
    spread = stratified_positions(10**9, 4, g)
    assert [int(i) // 250_000_000 for i in spread] == [0, 1, 2, 3]
