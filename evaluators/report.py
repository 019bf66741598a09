"""The side-by-side HTML report: one self-contained page, inline CSS and JS, no external URL."""
from __future__ import annotations

import html

import pandas as pd

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}
td.ok{background:#e8f6e8} td.bad{background:#fbeaea} td.num{text-align:right}
.verdict{font-size:1.3em;font-weight:bold;padding:.4em .8em;display:inline-block;border-radius:4px}
.PROMOTE{background:#d4f0d4} .REJECT{background:#f6d0d0} .INCONCLUSIVE{background:#f6ecc8}
pre{white-space:pre-wrap;margin:0;font-family:inherit} .note{color:#666}
.bars{display:flex;gap:2em;flex-wrap:wrap} .bars div.chart{min-width:260px}
.bar{background:#5b8def;height:14px;display:inline-block;vertical-align:middle}
"""

CHARTS = [("mean_words", "words per output (lower is more concise)", "{:.1f}"),
          ("latency_ms_p95", "p95 latency, ms", "{:.0f}"),
          ("over_correction_rate", "over-corrections", "{:.0%}")]

SCRIPT = """
function start(){  // report.html#differences opens with the filter on
  if(location.hash==='#differences')document.getElementById('diffonly').checked=true;
  applyFilter();
}
function applyFilter(){
  var only=document.getElementById('diffonly').checked, shown=0;
  document.querySelectorAll('#rows tbody tr').forEach(function(tr){
    var hide=only && tr.dataset.differs==='0'; tr.style.display=hide?'none':''; if(!hide)shown++;});
  document.getElementById('shown').textContent=shown;
}
"""


def _cell(value, css: str = "") -> str:
    text = html.escape(str(value))
    return f'<td class="{css}"><pre>{text}</pre></td>' if not css else f'<td class="{css}">{text}</td>'


def _charts(labels: list[str], metrics: dict[str, float], primary: str) -> str:
    """Bar charts, one per metric (the primary quality metric first), drawn with plain CSS widths;
    a metric no model has (the grammar profile's, without it) gets no chart."""
    charts = []
    for metric, title, fmt in [(primary, f"{primary} (primary quality metric)", "{:.3g}"),
                               *CHARTS]:
        values = {label: metrics.get(f"{label}/{metric}") for label in labels}
        top = max((v for v in values.values() if v is not None), default=0) or 1
        lines = "".join(
            f"<tr><td>{html.escape(label)}</td><td><span class=\"bar\" style=\"width:"
            f"{180 * v / top:.0f}px\"></span> {fmt.format(v)}</td></tr>"
            for label, v in values.items() if v is not None)
        if not lines:
            continue
        charts.append(f'<div class="chart"><b>{html.escape(title)}</b><table>{lines}</table></div>')
    return '<div class="bars">' + "".join(charts) + "</div>"


def render_report(*, title: str, labels: list[str], table: pd.DataFrame,
                  metrics: dict[str, float], verdict_lines: list[str], decision: str,
                  notes: list[str], primary: str = "exact_match") -> str:
    """The page: verdict, one metrics row per model, then every row side by side with a filter."""
    metric_names = sorted({key.split("/", 1)[1] for key in metrics if key.split("/")[0] in labels})
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
    summary = "".join(
        "<tr><th>" + html.escape(label) + "</th>" + "".join(
            f'<td class="num">{metrics[f"{label}/{m}"]:.4g}</td>' if f"{label}/{m}" in metrics
            else "<td></td>" for m in metric_names) + "</tr>" for label in labels)
    row_head = "<th>#</th><th>input</th><th>target</th>" + "".join(
        f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for _, row in table.iterrows():
        outputs = [row[f"{label}_output"] for label in labels]
        differs = int(len(set(outputs)) > 1)
        cells = [_cell(row["row"], "num"), _cell(row["input"]), _cell(row["target"])]
        for label in labels:
            ok = bool(row[f"{label}_exact_match"]) if f"{label}_exact_match" in row else None
            css = {True: "ok", False: "bad", None: ""}[ok]
            cells.append(f'<td class="{css}"><pre>'
                         f'{html.escape(str(row[f"{label}_output"]))}</pre>'
                         f'<span class="note">{html.escape(primary)} '
                         f'{row[f"{label}_{primary}"]:.3g}, {row[f"{label}_words"]} words, '
                         f'{row[f"{label}_latency_ms"]:.0f} ms</span></td>')
        body.append(f'<tr data-differs="{differs}">' + "".join(cells) + "</tr>")
    rules = "".join(f"<li>{html.escape(line)}</li>" for line in verdict_lines)
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style>
<script>{SCRIPT}</script></head>
<body onload="start()">
<h1>{html.escape(title)}</h1>
<p><span class="verdict {html.escape(decision)}">{html.escape(decision)}</span></p>
<ul>{rules}</ul>
<ul class="note">{note_items}</ul>
<h2>Per model</h2>
{_charts(labels, metrics, primary)}
<table><thead><tr><th>model</th>{head}</tr></thead><tbody>{summary}</tbody></table>
<h2>Side by side</h2>
<p><label><input type="checkbox" id="diffonly" onchange="applyFilter()"> differences only</label>
(<span id="shown">{len(table)}</span> of {len(table)} rows shown; green: exact match)</p>
<table id="rows"><thead><tr>{row_head}</tr></thead><tbody>{''.join(body)}</tbody></table>
</body></html>
"""
