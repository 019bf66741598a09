"""write_analysis on an adapter with many small modules (a mixture-of-experts all-linear LoRA):
every module stays in analysis.json, while report.html embeds the heatmaps of the largest
`analysis.report_max_heatmaps` only, says so, and stays bounded in size; one PNG per chart type."""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from PIL import Image

from support.scale_support import expert_lora_adapter
from test_report import CHROMIUM, _rendered_dom, _scan
from tunelens.config import load_config
from tunelens.registry_hooks.report.charts import CHARTS, MAX_COMPONENT_SERIES
from tunelens.registry_hooks.report.outputs import write_analysis

LAYERS, EXPERTS = 10, 50  # × w1/w2/w3 = 1500 modules
MODULES = LAYERS * EXPERTS * 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from tunelens.registry_hooks.engine.analysis import analyze_adapter

    root = tmp_path_factory.mktemp("experts")
    adapter = expert_lora_adapter(root / "adapter", layers=LAYERS, experts=EXPERTS)
    result = analyze_adapter(adapter, progress=False)
    return result, write_analysis(result, root / "out", charts=True)


def _payload(html: str) -> dict:
    return json.loads("".join(_scan(html).data))


def test_analysis_json_keeps_every_module_and_heatmap(written):
    result, files = written
    data = json.loads(files.json_path.read_text())
    assert len(data["modules"]) == MODULES == len(result.modules)
    assert len(data["heatmaps"]) == MODULES
    assert len({m["name"] for m in data["modules"]}) == MODULES


def test_report_embeds_the_largest_modules_heatmaps_and_says_so(written):
    result, files = written
    limit = load_config().analysis.report_max_heatmaps
    assert limit < MODULES
    html = files.html_path.read_text()
    payload = _payload(html)
    embedded = payload["result"]["heatmaps"]
    by_size = sorted(result.modules, key=lambda m: -m.fro)
    assert {h["module"] for h in embedded} == {m.name for m in by_size[:limit]}
    assert by_size[limit - 1].fro > by_size[limit].fro  # no tie decides who is in
    assert payload["heatmaps_left_out"] == MODULES - limit
    # Embedded heatmaps are still the real ones (float32 of analysis.json's values).
    stored = {h.module: h for h in result.heatmaps}
    first = embedded[0]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(first["f32"]), dtype="<f4"),
                                  np.asarray(stored[first["module"]].values, dtype="<f4").ravel())
    # The module table still has all of them.
    assert len(payload["result"]["modules"]) == MODULES
    assert (f"showing the top {limit} of {MODULES} modules by ‖ΔW‖_F" in html
            and f"All {MODULES} modules, with every heatmap, are in analysis.json" in html)


def test_report_size_is_bounded(written):
    """Measured: 3.15 MB with every heatmap embedded (2.1 KB a module), 1.5 MB with the top 256.
    The bound: 1.1 KB a module for its metrics row plus the embedded heatmaps, plus 150 KB of page."""
    result, files = written
    limit = load_config().analysis.report_max_heatmaps
    heatmap_bytes = math.ceil(16 * 16 * 4 / 3) * 4 + 200  # base64 float32 grid + its keys
    size = files.html_path.stat().st_size
    assert size < 150_000 + 1_100 * MODULES + heatmap_bytes * limit, size
    assert size < 0.6 * files.json_path.stat().st_size


def test_a_smaller_limit_from_the_users_conf(written, tmp_path):
    result, _ = written
    conf = tmp_path / "conf.yaml"
    conf.write_text("analysis:\n  report_max_heatmaps: 7\n")
    files = write_analysis(result, tmp_path / "out", config=load_config(conf))
    html = files.html_path.read_text()
    assert len(_payload(html)["result"]["heatmaps"]) == 7
    assert f"showing the top 7 of {MODULES} modules" in html


def test_one_png_per_chart_type_with_bounded_series(written):
    result, files = written
    names = [p.name for p in files.chart_paths]
    assert len(names) == len(set(names)) and set(names) <= set(CHARTS)
    # 150 components (one per expert and projection) drawn as the largest 12 plus "other":
    # the legend keeps two rows instead of fifteen.
    assert len({m.component for m in result.modules}) == EXPERTS * 3 > MAX_COMPONENT_SERIES
    with Image.open(files.json_path.parent / "charts" / "layers_by_component.png") as image:
        assert image.size[1] < 650, image.size


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_many_module_report_renders_in_a_real_browser(written):
    result, files = written
    dom = _rendered_dom(files.html_path)
    assert 'data-rendered="true"' in dom
    legend = dom.split('id="layer-legend"', 1)[1].split("</div>", 1)[0]
    assert legend.count('class="sw"') == MAX_COMPONENT_SERIES + 1
    assert f"{EXPERTS * 3 - MAX_COMPONENT_SERIES} other components (summed)" in legend
    # The picker's layer: 150 modules, 64 cards drawn, the largest; heatmaps only where embedded.
    detail = dom.split('id="layer-detail"', 1)[1].split("<details", 1)[0]
    assert detail.count('class="mod"') == 64
    assert "showing the 64 largest" in dom
    modules = dom.split('id="module-table"', 1)[1].split("</table>", 1)[0]
    assert modules.count("<tr>") == MODULES + 1
