"""Training evolution over real PEFT checkpoints (a few AdamW steps on a tiny Llama) vs dense math."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support.factories import make_lora_adapter, train_lora_checkpoints
from tunelens.plugin.cli import main
from tunelens.registry_hooks.report.checkpoints_page import profile_frame
from tunelens.registry_hooks.engine.checkpoints import (analyze_checkpoints, checkpoint_evolution,
                                                        find_checkpoints)
from tunelens.registry_hooks.engine.result import CheckpointEvolution, json_safe
from support.cli_support import assert_one_line_error

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def run_dir(llama_base, tmp_path_factory):
    """checkpoint-0 (PEFT init: B = 0), checkpoint-2, checkpoint-4."""
    return train_lora_checkpoints(llama_base, tmp_path_factory.mktemp("ckpt") / "run", steps=4,
                                  save_every=2, r=4, lora_alpha=8, target_modules=TARGETS)


def _factors(path):
    weights = load_file(path / "adapter_model.safetensors")
    out = {}
    for key, tensor in weights.items():
        module, kind = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        out.setdefault(module, {})[kind[0]] = tensor.double()
    return out


def _column_space(delta):
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    return u[:, s > s.max() * 1e-10] if s.max() > 0 else u[:, :0]


def test_evolution_matches_dense_reference(run_dir):
    evolution = checkpoint_evolution([run_dir], progress=False)
    assert isinstance(evolution, CheckpointEvolution)
    section = json_safe(evolution)  # as analysis.json holds it
    labels = [c["label"] for c in section["checkpoints"]]
    assert labels == ["checkpoint-0", "checkpoint-2", "checkpoint-4"]
    assert [c["step"] for c in section["checkpoints"]] == [0, 2, 4]
    states = [_factors(run_dir / label) for label in labels]
    modules = {m["name"]: m for m in section["modules"]}
    assert len(modules) == 2 * len(TARGETS)
    for name, record in modules.items():
        a0, b0 = states[0][name]["A"], states[0][name]["B"]
        assert b0.abs().max() == 0  # PEFT's init: the evolution starts from ΔW = 0
        deltas = [2.0 * s[name]["B"] @ s[name]["A"] for s in states]  # s = alpha / r = 2
        for i, state in enumerate(states):
            change = state[name]["B"] - b0
            assert record["B"][i]["abs_mean"] == pytest.approx(float(change.abs().mean()), abs=1e-12)
            assert record["B"][i]["var"] == pytest.approx(float(change.var(correction=0)), abs=1e-12)
            change = state[name]["A"] - a0
            assert record["A"][i]["mean"] == pytest.approx(float(change.mean()), abs=1e-12)
            assert record["A"][i]["abs_var"] == pytest.approx(
                float(change.abs().var(correction=0)), abs=1e-12)
            assert record["delta_fro"][i] == pytest.approx(float(deltas[i].norm()), rel=1e-9, abs=1e-12)
        assert record["delta_fro"][2] > record["delta_fro"][1] > 0
        u1, u2 = _column_space(deltas[1]), _column_space(deltas[2])
        expected = float((u1.T @ u2).square().sum()) / min(u1.shape[1], u2.shape[1])
        assert record["subspace_similarity"][1] == pytest.approx(expected, rel=1e-6)
        assert record["subspace_similarity"][0] is None  # NaN (ΔW₀ = 0), null in analysis.json
    # per layer: A/B stats averaged over the layer's matrices, S_ℓ summed
    layer0 = section["layers"][0]
    members = [m for m in modules.values() if m["layer"] == 0]
    assert layer0["B"]["abs_mean"][2] == pytest.approx(
        sum(m["B"][2]["abs_mean"] for m in members) / len(members))
    assert layer0["delta_fro"][1] == pytest.approx(sum(m["delta_fro"][1] for m in members))
    assert section["subspace_similarity"][0]["mean"] is None
    assert 0 < section["subspace_similarity"][1]["mean"] <= 1 + 1e-9


def test_checkpoint_order_is_numeric(run_dir, tmp_path):
    for step in (2, 10, 9):
        shutil.copytree(run_dir / "checkpoint-2", tmp_path / f"checkpoint-{step}")
    (tmp_path / "logs").mkdir()
    assert [c.step for c in find_checkpoints([tmp_path])] == [2, 9, 10]


def test_cli_writes_gif_frames_and_section(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "--checkpoints", str(run_dir), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert [c["label"] for c in data["checkpoints"]["checkpoints"]][-1] == "checkpoint-4"
    assert data["summary"]["layers_modified"] == [0, 1]  # the final checkpoint's analysis
    gif = Image.open(out / "charts" / "checkpoints_profile.gif")
    assert gif.n_frames == 3
    assert len(list((out / "charts" / "checkpoints").glob("frame_*.png"))) == 3
    assert "Training evolution" in (out / "report.html").read_text()
    # an explicit initial + final pair
    out2 = tmp_path / "pair"
    assert main(["analyze", "--checkpoints", str(run_dir / "checkpoint-0"),
                 str(run_dir / "checkpoint-4"), "--out", str(out2), "--no-progress"]) == 0
    pair = json.loads((out2 / "analysis.json").read_text())["checkpoints"]
    assert [c["label"] for c in pair["checkpoints"]] == ["checkpoint-0", "checkpoint-4"]


def test_each_frame_shows_the_four_statistics_of_a_and_b_per_layer(run_dir):
    """Every frame has a panel per statistic (mean Δ, variance of Δ, mean |Δ|, variance of |Δ|)
    whose lora_A and lora_B bars are the layer's values at that checkpoint, and S_ℓ."""
    section = analyze_checkpoints([run_dir], progress=False).checkpoints
    last = len(section.checkpoints) - 1
    fig = profile_frame(section, last)
    labels = [ax.get_ylabel() for ax in fig.axes]
    reference = section.reference
    assert labels == [f"{label} since {reference}" for label in
                      ("mean Δ", "variance of Δ", "mean |Δ|", "variance of |Δ|")] + ["S_ℓ = Σ ‖ΔW‖_F"]
    for ax, stat in zip(fig.axes, ("mean", "var", "abs_mean", "abs_var")):
        heights = [bar.get_height() for bar in ax.patches]
        expected = ([r.A[stat][last] for r in section.layers]
                    + [r.B[stat][last] for r in section.layers])
        assert heights == pytest.approx(expected, rel=1e-12)
    assert [bar.get_height() for bar in fig.axes[4].patches] == pytest.approx(
        [r.delta_fro[last] for r in section.layers])
    assert any(v != 0 for r in section.layers for v in r.B["var"])  # the run moved B


def test_several_runs_are_overlaid_and_labelled(run_dir, llama_base, tmp_path, capsys):
    """Two runs (learning rates 1e-2 and 5e-2, three and two checkpoints): runs.json holds each
    run's S_ℓ = Σ ‖s·B·A‖_F per layer at every checkpoint, runs.html one animated chart and one
    table, both labelled by run."""
    fast = train_lora_checkpoints(llama_base, tmp_path / "fast", steps=2, save_every=2, lr=5e-2,
                                  r=4, lora_alpha=8, target_modules=TARGETS)
    out = tmp_path / "out"
    assert main(["analyze", "--checkpoints", str(run_dir), str(fast), "--label", "lr=1e-2",
                 "--label", "lr=5e-2", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "runs.json").read_text())
    assert data["schema"] == "tunelens.runs/1" and data["layers"] == [0, 1]
    assert [run["label"] for run in data["runs"]] == ["lr=1e-2", "lr=5e-2"]
    for run, folder in zip(data["runs"], (run_dir, fast)):
        steps = sorted(int(d.name.split("-")[1]) for d in folder.glob("checkpoint-*"))
        assert [c["step"] for c in run["checkpoints"]] == steps
        for checkpoint, values in zip(run["checkpoints"], run["layer_fro"]):
            factors = _factors(folder / checkpoint["label"])
            dense = [sum(float((2.0 * f["B"] @ f["A"]).norm()) for name, f in factors.items()
                         if f"layers.{layer}." in name) for layer in (0, 1)]
            assert values == pytest.approx(dense, rel=1e-9, abs=1e-12)
    gif = Image.open(out / "charts" / "runs_profile.gif")
    assert gif.n_frames == 3  # the longer run's checkpoints; the shorter holds its last
    html = (out / "runs.html").read_text()
    assert "lr=1e-2 · lr=5e-2" in html and html.count("<tr>") == 1 + 3 + 2
    capsys.readouterr()  # the training's own output
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(run_dir), str(fast), "--label",
                                   "one", "--out", str(out)], "1 --label values for 2 runs")


def test_bad_checkpoint_inputs(run_dir, llama_base, tmp_path, capsys):
    lonely = tmp_path / "lonely"
    shutil.copytree(run_dir / "checkpoint-2", lonely / "checkpoint-2")
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(lonely)], "1 checkpoint-*")
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(run_dir / "checkpoint-2")],
                    "at least two")
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(tmp_path / "nope"), str(run_dir)],
                    "does not exist")
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(run_dir / "checkpoint-2"), str(tmp_path)],
                    "not a PEFT checkpoint")
    other = make_lora_adapter(llama_base, tmp_path / "other", r=4, lora_alpha=8,
                              target_modules=["q_proj", "k_proj"])
    capsys.readouterr()  # the factory's loading bar
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(run_dir / "checkpoint-2"), str(other)],
                    "checkpoints differ", "model.layers.0.mlp.down_proj")
    wider = make_lora_adapter(llama_base, tmp_path / "wider", r=8, lora_alpha=8,
                              target_modules=TARGETS)
    capsys.readouterr()
    assert_one_line_error(capsys, ["analyze", "--checkpoints", str(run_dir / "checkpoint-2"), str(wider)],
                    "checkpoints differ", "rank 4", "rank 8")
