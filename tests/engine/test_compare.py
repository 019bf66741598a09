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


def test_cli_report_with_an_analysis_json(adapters, tmp_path, capsys):
    first, second = adapters
    saved = tmp_path / "a-analysis"
    write_analysis(analyze_adapter(first, progress=False), saved)
    out = tmp_path / "out"
    assert main(["compare", str(saved / "analysis.json"), str(second), "--out", str(out),
                 "--no-progress"]) == 0
    assert "subspace overlap needs" in capsys.readouterr().err
    data = json.loads((out / "compare.json").read_text())
    assert data["schema"] == "tunelens.compare/1" and data["labels"] == ["a-analysis", "domain-b"]
    assert data["overlaps"] == []
    html = (out / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained
    assert "Per-layer profiles" in html


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
