"""`tunelens analyze` as a user runs it: a subprocess, its files, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import ADAPTER_FIXTURES
from tunelens.registry_hooks.engine.result import SCHEMA, AnalysisResult

REAL = ADAPTER_FIXTURES


def tunelens(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "tunelens.plugin.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("tunelens analyze: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_analyze_writes_json_report_and_charts(tmp_path, llama_adapter, llama_base):
    out = tmp_path / "out"
    proc = tunelens("analyze", str(llama_adapter), "--base", str(llama_base), "--out", str(out),
                    "--charts")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "analysis.json").read_text())
    assert data["schema"] == SCHEMA
    assert set(data["adapter"]) >= {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                                    "target_modules", "base_model_name_or_path"}
    assert set(data["summary"]) >= {"trainable_params", "base_params", "layers_modified",
                                    "mean_module_fro", "max_module_fro", "mean_layer_fro_sum",
                                    "max_layer_fro_sum"}
    assert data["summary"]["base_params"] > data["summary"]["trainable_params"] > 0
    module = data["modules"][0]
    assert set(module) >= {"name", "layer", "component", "group", "shape", "rank", "scale", "fro",
                           "spectral", "singular_values", "effective_rank", "stable_rank",
                           "relative_fro"}
    assert not module["name"].startswith("base_model.model.")
    assert module["relative_fro"] > 0
    assert set(data["layers"][0]) >= {"layer", "fro_sum", "components"}
    shifts = [t["shift"] for t in data["top_neurons"]]
    assert shifts == sorted(shifts, reverse=True)
    assert set(data["top_neurons"][0]) >= {"layer", "component", "index", "shift"}
    assert set(data["histogram"]) >= {"mean", "std", "min", "max", "bin_edges", "counts", "exact"}
    assert data["narrative"] and all(isinstance(s, str) for s in data["narrative"])
    numbers = {k: v for k, v in data.items() if k not in ("narrative", "glossary")}
    assert AnalysisResult.from_dict(data).to_dict() == numbers  # the words are the report's
    assert (out / "report.html").stat().st_size > 1000
    assert list((out / "charts").glob("*.png"))


def test_analyze_real_adapter_without_base_and_progress_bar(tmp_path):
    proc = tunelens("analyze", str(REAL / "gpt2-seqcls-c_attn"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "tunelens analyze" in proc.stderr  # tqdm's bar, on stderr
    data = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert data["modules"][0]["name"] == "transformer.h.0.attn.c_attn.q"
    assert data["summary"]["base_params"] is None


@pytest.fixture()
def adapter_copy(tmp_path, llama_adapter) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(llama_adapter, target)
    return target


def test_missing_adapter_config(tmp_path):
    assert_one_line_error(tunelens("analyze", str(tmp_path)), "no adapter_config.json")


def test_missing_directory(tmp_path):
    assert_one_line_error(tunelens("analyze", str(tmp_path / "nope")), "does not exist")


def test_invalid_adapter_config_json(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "not valid JSON")


def test_non_lora_peft_type_is_named(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "IA3 adapter", "LoRA")


def test_truncated_safetensors(adapter_copy):
    weights = adapter_copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "truncated, corrupt")


def test_garbage_safetensors(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "truncated, corrupt")


def _rewrite(adapter: Path, change) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})


def test_a_and_b_ranks_contradicting_each_other(adapter_copy):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite(adapter_copy, lambda t: t.update({key: torch.zeros(128, 4)}))
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "contradict each other",
                          "model.layers.0.self_attn.q_proj")


def test_rank_contradicting_the_config(adapter_copy):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["r"] = 16
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "r=16")


def test_lora_a_without_b(adapter_copy):
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    _rewrite(adapter_copy, lambda t: t.pop(key))
    assert_one_line_error(tunelens("analyze", str(adapter_copy)), "no lora_B")


def test_base_with_mismatching_shapes(adapter_copy, tmp_path):
    from support.factories import tiny_llama

    other_base = tiny_llama(tmp_path / "other-base", hidden=64, heads=1, intermediate=128)
    assert_one_line_error(tunelens("analyze", str(adapter_copy), "--base", str(other_base)),
                          "has shape", "is", "the model this adapter was trained on")


def test_base_directory_without_weights(adapter_copy, tmp_path):
    (tmp_path / "empty-base").mkdir()
    assert_one_line_error(tunelens("analyze", str(adapter_copy), "--base",
                                   str(tmp_path / "empty-base")), "no *.safetensors")


def test_analyze_moe_target_parameters_adapter(tmp_path):
    """A Qwen3-MoE adapter made with target_parameters, through the CLI: every expert a module,
    the experts section in analysis.json, the report's layer × expert section and chart."""
    from support.factories import make_moe_adapter, tiny_moe

    base = tiny_moe(tmp_path / "base")
    adapter = make_moe_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    proc = tunelens("analyze", str(adapter), "--base", str(base), "--out", str(out), "--charts")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "analysis.json").read_text())
    experts = [m for m in data["modules"] if m["expert"] is not None]
    assert len(experts) == 2 * 6 * 3  # layers x experts x gate/up/down
    assert {m["component"] for m in experts} == {"mlp.experts.gate_proj", "mlp.experts.up_proj",
                                                 "mlp.experts.down_proj"}
    assert all(m["relative_fro"] > 0 for m in experts)
    summary = data["experts"]
    assert summary["num_experts"] == 6 and len(summary["layers"]) == 2
    assert len(summary["layers"][0]["fro_by_expert"]) == 6
    assert AnalysisResult.from_dict(data).experts.top_k == summary["top_k"]
    assert (out / "charts" / "experts.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert 'id="experts"' in html and "fro_by_expert" in html
    assert any("MoE layers" in s for s in data["narrative"])


def test_analyze_without_png_charts_never_loads_matplotlib(tmp_path):
    """By default, and with --no-charts over a conf.yaml that asks for them: analysis.json and
    report.html (which draws every chart itself), no PNGs, and matplotlib is never imported (it is
    most of a small adapter's output cost)."""
    conf = tmp_path / "conf.yaml"
    conf.write_text("analysis:\n  png_charts: true\n")
    runs = {"default": [], "no-charts": ["--config", str(conf)]}  # --config before the command
    for name, before in runs.items():
        out = tmp_path / name
        argv = [*before, "analyze", str(REAL / "gpt2-causal-c_attn-c_proj"), "--out", str(out),
                "--no-progress", *(["--no-charts"] if before else [])]
        code = ("import json, sys; from tunelens.plugin.cli import main; "
                "rc = main(json.loads(sys.argv[1])); print('matplotlib' in sys.modules); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "False", name
        assert "and 0 charts" in proc.stdout
        assert (out / "analysis.json").is_file() and (out / "report.html").is_file()
        assert not (out / "charts").exists()


def test_analyze_falcon_fused_query_key_value_split_with_base(tmp_path):
    """Falcon-40B's grouped query_key_value through the CLI: q/k/v parts sized by the base
    config.json (4 query heads in 2 KV groups of head_dim 16: q 64 rows, k and v 32 each)."""
    from support.factories import make_lora_adapter, save_tiny_model
    from transformers import FalconConfig

    base = save_tiny_model(FalconConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_kv_heads=2,
                                        new_decoder_architecture=True, bos_token_id=1,
                                        eos_token_id=2), tmp_path / "base")
    adapter = make_lora_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8,
                                target_modules=["query_key_value"])
    out = tmp_path / "out"
    proc = tunelens("analyze", str(adapter), "--base", str(base), "--out", str(out), "--no-charts")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "analysis.json").read_text())
    shapes = {m["component"]: m["shape"] for m in data["modules"]}
    assert shapes == {"self_attention.query_key_value.q": [64, 64],
                      "self_attention.query_key_value.k": [32, 64],
                      "self_attention.query_key_value.v": [32, 64]}
    assert {role for layer in data["layers"] for role in layer["roles"]} == {"Q", "K", "V"}
