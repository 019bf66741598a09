"""write_analysis: analysis.json, a self-contained report.html that really renders, valid PNGs."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import ADAPTER_FIXTURES
from support.dense_result import llama_like_result
from tunelens.config import load_config
from tunelens.registry_hooks.engine.naming import role_of
from tunelens.registry_hooks.report.document import analysis_document, analysis_json
from tunelens.registry_hooks.report.narrative import glossary_for, narrate, narrate_layer
from tunelens.registry_hooks.report.outputs import write_analysis
from tunelens.registry_hooks.report.html import DATA_ELEMENT_ID, render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Scan(HTMLParser):
    """Collects URL-bearing attributes and the embedded data script's text."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.data: list[str] = []
        self._in_data = False
        self.script_srcs = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            if attrs.get(key):
                self.urls.append(attrs[key])
        if tag == "script" and "src" in attrs:
            self.script_srcs += 1
        self._in_data = tag == "script" and attrs.get("id") == DATA_ELEMENT_ID

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data.append(data)


def _scan(html: str) -> _Scan:
    scan = _Scan()
    scan.feed(html)
    return scan


FIXTURE_ADAPTERS = Path("/work/shared/fixtures/adapters")
REPO_ADAPTERS = ADAPTER_FIXTURES


def _fixture_adapter(name: str) -> Path:
    """A real third-party adapter: the repo's copy, else the shared one."""
    for root in (REPO_ADAPTERS, FIXTURE_ADAPTERS):
        if (root / name / "adapter_config.json").exists():
            return root / name
    pytest.skip(f"fixture adapter {name} not found")


@pytest.fixture(scope="module", params=["dense", "llama-engine-with-base", "gpt2-third-party",
                                        "llama-embedding-and-saved-head"])
def written(request, tmp_path_factory):
    """(result, files) for a dense reference result and for three real engine runs."""
    if request.param == "dense":
        result = llama_like_result(layer_magnitudes=(1.0, 3.0, 0.5, 2.0), base_params=10_000_000)
    else:
        from tunelens.registry_hooks.engine.analysis import analyze_adapter

        if request.param == "llama-engine-with-base":
            base = request.getfixturevalue("llama_base")
            result = analyze_adapter(request.getfixturevalue("llama_adapter"), base, progress=False)
        elif request.param == "llama-embedding-and-saved-head":
            # Embedding LoRA and a fully saved lm_head: modules outside the layer stack.
            from support.factories import make_lora_adapter

            base = request.getfixturevalue("llama_base")
            adapter = make_lora_adapter(base, tmp_path_factory.mktemp("emb-adapter"), r=4,
                                        lora_alpha=8, modules_to_save=["lm_head"],
                                        target_modules=["q_proj", "v_proj", "embed_tokens"])
            result = analyze_adapter(adapter, base, progress=False)
            assert {m.layer for m in result.modules} >= {None}
        else:
            result = analyze_adapter(_fixture_adapter("gpt2-causal-c_attn-c_proj"), progress=False)
    return result, write_analysis(result, tmp_path_factory.mktemp("analysis"), charts=True)


def test_files_land_where_the_contract_says(written):
    result, files = written
    out = files.json_path.parent
    assert files.json_path == out / "analysis.json" and files.html_path == out / "report.html"
    assert all(p.parent == out / "charts" and p.suffix == ".png" for p in files.chart_paths)
    assert files.json_path.read_text() == analysis_json(result)


def test_report_is_self_contained(written):
    _, files = written
    html = files.html_path.read_text()
    scan = _scan(html)
    assert scan.script_srcs == 0
    assert all(url.startswith("#") for url in scan.urls), scan.urls
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    for forbidden in ("@import", "url(http", "url(//", "fetch(", "XMLHttpRequest", "localStorage",
                      "sessionStorage", "indexedDB", "document.cookie", "<link", "<iframe"):
        assert forbidden not in html, forbidden


def test_embedded_json_parses_back_to_the_result(written):
    result, files = written
    scan = _scan(files.html_path.read_text())
    payload = json.loads("".join(scan.data))
    expected = analysis_document(result)
    embedded_heatmaps = payload["result"].pop("heatmaps")
    heatmaps = expected.pop("heatmaps")
    assert payload["result"] == expected
    # Heatmaps ride as base64 float32: equal to the result's values at float32 precision.
    assert [h["module"] for h in embedded_heatmaps] == [h["module"] for h in heatmaps]
    for embedded, original in zip(embedded_heatmaps, heatmaps):
        decoded = np.frombuffer(base64.b64decode(embedded["f32"]), dtype="<f4")
        assert decoded.shape == (original["rows"] * original["cols"],)
        np.testing.assert_array_equal(decoded, np.asarray(original["values"], dtype="<f4").ravel())
    assert [s for lines in payload["sections"].values() for s in lines] == narrate(result)
    roles = {m.name: payload["roles"].get(m.name) for m in result.modules}
    for name, role in roles.items():
        expected_role = {"q": "Q", "k": "K", "v": "V", "o": "O", "c": "O"}.get(
            name.rsplit(".", 1)[-1][0]) if ".mlp." not in name else None
        assert role == expected_role, (name, role)


def test_hostile_names_cannot_break_out_of_the_data_script():
    result = llama_like_result(layer_magnitudes=(1.0, 2.0))
    result.adapter.base_model_name_or_path = "</script><script>alert(1)</script><!--"
    html = render_report(result)
    assert "<script>alert(1)" not in html
    payload = json.loads("".join(_scan(html).data))
    assert payload["result"]["adapter"]["base_model_name_or_path"] == "</script><script>alert(1)</script><!--"


def test_every_chart_is_a_real_image(written):
    _, files = written
    names = {p.name for p in files.chart_paths}
    assert {"layers_by_component.png", "qkvo_stacked.png", "group_shares.png", "histogram.png",
            "singular_values.png", "heatmaps.png", "top_neurons.png"} <= names
    for path in files.chart_paths:
        assert path.stat().st_size > 8_000, path
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, (path, image.size)
            pixels = np.asarray(image.convert("L"), dtype=float)
        # Not a blank canvas: a fair share of pixels carry ink.
        assert (pixels < 200).mean() > 0.01, path


def test_charts_without_data_are_left_out(tmp_path):
    result = llama_like_result(layer_magnitudes=(1.0,))
    for m in result.modules:
        m.group = "mlp"  # no attention: no Q/K/V/O chart
    result.summary.group_fro = {"mlp": sum(m.fro for m in result.modules)}
    result.heatmaps = []
    files = write_analysis(result, tmp_path, charts=True)
    names = {p.name for p in files.chart_paths}
    assert "qkvo_stacked.png" not in names and "heatmaps.png" not in names
    assert "group_shares.png" not in names  # a single group is 100%: nothing to compare
    assert "histogram.png" in names


def test_png_charts_are_opt_in(tmp_path):
    """By default (analysis.png_charts: false) only analysis.json and report.html, which draws
    every chart itself; charts=True or the setting adds the PNG copies."""
    result = llama_like_result(layer_magnitudes=(1.0, 2.0))
    files = write_analysis(result, tmp_path / "default")
    assert files.chart_paths == [] and not (tmp_path / "default" / "charts").exists()
    assert files.html_path.is_file() and files.json_path.is_file()
    conf = tmp_path / "conf.yaml"
    conf.write_text("analysis:\n  png_charts: true\n")
    files = write_analysis(result, tmp_path / "on", config=load_config(conf))
    assert "histogram.png" in {p.name for p in files.chart_paths}

def _rendered_dom(html_path: Path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
             html_path.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(written):
    result, files = written
    dom = _rendered_dom(files.html_path)
    assert 'data-rendered="true"' in dom  # the script ran to its last line without an error
    layer_chart = dom.split('id="layer-chart"', 1)[1].split("</svg>", 1)[0]
    bars = sum(len(layer.components) for layer in result.layers)
    assert layer_chart.count('class="bar"') == bars
    qkvo_chart = dom.split('id="qkvo-chart"', 1)[1].split("</svg>", 1)[0]
    roles = {(m.layer, role_of(m)) for m in result.modules if role_of(m)}
    assert qkvo_chart.count('class="bar"') == len(roles)
    picker = dom.split('id="layer-picker"', 1)[1].split("</select>", 1)[0]
    assert picker.count("<option") == len({m.layer for m in result.modules})
    # The picker opens on the most-changed layer, with a heatmap canvas per module.
    most = max(result.layers, key=lambda l: l.fro_sum)
    detail = dom.split('id="layer-detail"', 1)[1].split("<details", 1)[0]
    in_layer = [m.name for m in result.modules if m.layer == most.layer]
    for name in in_layer:
        assert f'data-module="{name}"' in detail
    assert detail.count('<canvas class="heat"') == len(in_layer)
    story = dom.split('id="layer-story"', 1)[1].split("</div>", 1)[0]
    for sentence in narrate_layer(result, most.layer):
        assert html.escape(sentence, quote=False) in story, sentence
    neurons = dom.split('id="neuron-table"', 1)[1].split("</table>", 1)[0]
    assert neurons.count("<tr>") == len(result.top_neurons) + 1
    modules = dom.split('id="module-table"', 1)[1].split("</table>", 1)[0]
    assert modules.count("<tr>") == len(result.modules) + 1
    glossary = dom.split('id="glossary-list"', 1)[1].split("</dl>", 1)[0]
    assert glossary.count("<dt>") == len(glossary_for(result))
    for sentence in narrate(result):
        assert html.escape(sentence, quote=False) in dom, sentence
    cards = dom.split('id="cards"', 1)[1].split('id="findings', 1)[0]
    assert "Mean ΔW per module" in cards and "Mean ΔW per layer" in cards
    assert "a fused qkv counted once" in cards and "S_ℓ = Σ‖ΔW‖_F over a layer" in cards


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_mlx_lm_report_shows_its_scale_in_a_real_browser(llama_base, tmp_path):
    from support.factories import make_mlx_lm_adapter
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    adapter = make_mlx_lm_adapter(llama_base, tmp_path / "mlx", rank=4, scale=10.0,
                                  keys=["self_attn.q_proj"])
    files = write_analysis(analyze_adapter(adapter, progress=False), tmp_path / "out")
    dom = _rendered_dom(files.html_path)
    assert 'data-rendered="true"' in dom
    cards = dom.split('id="cards"', 1)[1].split('id="findings', 1)[0]
    assert "LoRA config (mlx-lm)" in cards and "scale 10 · ΔW = scale·B·A" in cards


def test_nan_weights_are_reported_not_a_crash(llama_base, tmp_path):
    """A real adapter with NaN in one lora_B: strict JSON, charts, and a page that names it."""
    from safetensors.torch import load_file, save_file
    from support.factories import make_lora_adapter
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    adapter = make_lora_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if ".layers.1." in k and "v_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    result = analyze_adapter(adapter, progress=False)
    files = write_analysis(result, tmp_path / "out", charts=True)
    json.loads(files.json_path.read_text())  # strict JSON: NaN became null
    broken = [m.name for m in result.modules if m.nonfinite]
    assert broken and broken[0].endswith("layers.1.self_attn.v_proj")
    assert broken[0] in narrate(result)[0] and narrate(result)[0].startswith("Warning")
    assert files.chart_paths
    if CHROMIUM:
        dom = _rendered_dom(files.html_path)
        assert 'data-rendered="true"' in dom
        assert "NaN/Inf weights found" in dom.split('id="alerts"', 1)[1].split("</div>", 1)[0]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_hostile_module_names_stay_text_in_the_rendered_page(tmp_path):
    result = llama_like_result(layer_magnitudes=(1.0, 2.0))
    hostile = '<img src=x onerror="document.title=1">'
    for m in result.modules:
        if m.component == "mlp.up_proj":
            m.component = "mlp." + hostile
            m.name = f"model.layers.{m.layer}.mlp.{hostile}"
    for layer in result.layers:
        layer.components["mlp." + hostile] = layer.components.pop("mlp.up_proj")
    for t in result.top_neurons:
        if t.component == "mlp.up_proj":
            t.component = "mlp." + hostile
    files = write_analysis(result, tmp_path)
    dom = _rendered_dom(files.html_path)
    assert 'data-rendered="true"' in dom
    assert "<img" not in dom
    assert "&lt;img src=x" in dom  # shown as text in legends, tables and the picker's cards


def _screenshot_in_sandboxed_iframe(page: Path, shot: Path) -> np.ndarray:
    """RGB pixels of `page` shown as MLflow's viewer shows it: <iframe sandbox="allow-scripts">."""
    wrapper = page.with_name(page.stem + "-viewer.html")
    wrapper.write_text('<!DOCTYPE html><html><body style="margin:0">'
                       f'<iframe sandbox="allow-scripts" src="{page.name}" '
                       'style="width:1280px;height:2400px;border:0"></iframe></body></html>')
    with tempfile.TemporaryDirectory() as profile:
        # No --virtual-time-budget (it leaves the iframe blank) and no out-of-process iframe (the
        # screenshot can come before a separate frame process paints): keep the frame in-process.
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--disable-site-isolation-trials", "--disable-features=site-per-process,IsolateOrigins",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1300,2400",
             wrapper.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB"), dtype=int)


def _count(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int(np.all(np.abs(pixels - rgb) <= 2, axis=-1).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_charts_draw_inside_a_sandboxed_iframe_like_mlflows_viewer(tmp_path):
    """MLflow shows report.html in <iframe sandbox="allow-scripts"> (no same-origin): the page's
    script must still draw. Orange (#E69F00: K, the second component) only appears in JS-drawn
    bars; the header's navy (#14213D) is static HTML."""
    result = llama_like_result(layer_magnitudes=(1.0, 3.0, 0.5, 2.0))
    files = write_analysis(result, tmp_path)
    pixels = _screenshot_in_sandboxed_iframe(files.html_path, tmp_path / "shot.png")
    assert _count(pixels, (20, 33, 61)) > 10_000  # the page loaded in the frame
    assert _count(pixels, (230, 159, 0)) > 2_000  # and its script drew the charts
    # Control: the same page without its script shows the header but none of the bars.
    page = files.html_path.read_text()
    script = page.rindex("<script>")
    control = tmp_path / "no-script.html"
    control.write_text(page[:script] + page[page.rindex("</script>") + len("</script>"):])
    pixels = _screenshot_in_sandboxed_iframe(control, tmp_path / "control.png")
    assert _count(pixels, (20, 33, 61)) > 10_000
    assert _count(pixels, (230, 159, 0)) < 50


def test_full_finetune_report_speaks_of_the_fine_tune_not_an_adapter(llama_base, tmp_path):
    """report.html of `tunelens analyze FINETUNED --base BASE`: no adapter, rank r or trainable
    parameters anywhere in its text; the parameters changed, the relative change and the layer and
    matrix type that moved most, as the numbers say."""
    from support.factories import perturbed_copy
    from tunelens.registry_hooks.engine.full_diff import diff_models
    from tunelens.registry_hooks.report.full_diff_page import write_full_diff

    base = perturbed_copy(llama_base, tmp_path / "base", {})
    tuned = perturbed_copy(base, tmp_path / "tuned", {"layers.1.mlp.up_proj": 0.05,
                                                      "layers.0.self_attn.k_proj": 0.001}, seed=3)
    result = diff_models(tuned, base, progress=False)
    page = write_full_diff(result, tmp_path / "out").html_path.read_text(encoding="utf-8")
    data = json.loads("".join(_scan(page).data))
    sentences = [s for lines in data["sections"].values() for s in lines]
    shown = re.sub(r"<script\b.*?</script>|<style\b.*?</style>|<[^>]+>", " ", page, flags=re.S)
    text = html.unescape(shown) + " " + " ".join(sentences) + " " + " ".join(data["glossary"].values())
    for lora_wording in ("adapter", "Adapter", "rank r", "<i>r</i>", "trainable", "Trainable",
                         "LoRA rank", "r = "):
        assert lora_wording not in text, lora_wording
    # the figures, checked against the tensors themselves
    up, k = (next(m for m in result.modules if m.name == f"model.layers.{name}")
             for name in ("1.mlp.up_proj", "0.self_attn.k_proj"))
    changed = up.shape[0] * up.shape[1] + k.shape[0] * k.shape[1]
    assert result.summary.trainable_params == changed
    assert (f"The fine-tune changed {changed:,} of the base model's {result.summary.base_params:,} "
            f"parameters") in sentences[0 if not data["sections"].get("health") else 1]
    assert "2 of " in sentences[0] and "weight matrices moved" in sentences[0]
    total = result.full_diff.relative_fro_total
    assert f"Overall the weights moved by {100 * total:.3f}% of their norm" in text
    assert f"The largest relative change is layer 1's up matrix ({100 * up.relative_fro:.3f}%)" in text
    assert "the up matrices moved most" in text and "largest in layer 1" in text
    assert "How fine-tuning changed the model" in shown and "<title>tunelens · full fine-tune of" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_moe_report_draws_the_layer_by_expert_grid_in_a_real_browser(tmp_path):
    """A Qwen3-MoE target_parameters adapter: the page's script draws one cell per layer and
    expert and a row per layer of top experts, and the rest of the page still renders."""
    from support.factories import make_moe_adapter, tiny_moe

    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    base = tiny_moe(tmp_path / "base")
    result = analyze_adapter(make_moe_adapter(base, tmp_path / "adapter"), progress=False)
    files = write_analysis(result, tmp_path / "out", charts=False)
    dom = _rendered_dom(files.html_path)
    assert 'data-rendered="true"' in dom
    grid = dom.split('id="expert-chart"', 1)[1].split("</svg>", 1)[0]
    assert grid.count('class="cell"') == 2 * 6  # 2 layers x 6 experts
    table = dom.split('id="expert-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 2  # header + one row per layer
