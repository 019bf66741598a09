"use strict";
// tunelens report: every chart is drawn here from the embedded JSON; nothing is fetched.
(function () {
  const DATA = JSON.parse(document.getElementById("tunelens-data").textContent);
  const R = DATA.result;
  // Okabe-Ito: distinguishable with every common colour-vision deficiency.
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
                   "#000000", "#999999"];
  const ROLE_COLOURS = {Q: "#0072B2", K: "#E69F00", V: "#009E73", O: "#CC79A7", QKV: "#56B4E9"};
  const GROUP_COLOURS = {attention: "#0072B2", mlp: "#E69F00", embedding: "#009E73", other: "#999999"};
  const $ = (sel) => document.querySelector(sel);

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
      '"': "&quot;", "'": "&#39;"}[c]));
  }
  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
    const a = Math.abs(x);
    if (x === 0) return "0";
    if (a >= 1e4) return Math.round(x).toLocaleString("en-US");
    if (a >= 0.001) return Number(x.toPrecision(4)).toString();
    return x.toExponential(2);
  }
  function pct(x, d) { return x === null || x === undefined ? "n/a" : (x * 100).toFixed(d === undefined ? 1 : d) + "%"; }
  // Charts are drawn at their container's pixel width so text stays 12px in a narrow viewer.
  function widthOf(sel) { return Math.max(560, Math.min(1400, $(sel).clientWidth || 1100)); }
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => (hi - lo) / s <= n) || 10 * mag;
    const ticks = [];
    // From the last step at or below lo to the first at or above hi, so bars never overflow.
    const end = Math.ceil(hi / step - 1e-9) * step;
    for (let t = Math.floor(lo / step + 1e-9) * step; t <= end + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-6 ? 0 : +t.toPrecision(12));
    return ticks;
  }

  // ---- tooltip: any SVG/HTML element with data-tip shows it on hover ----
  const tip = $("#tip");
  document.addEventListener("mousemove", (e) => {
    const t = e.target.closest && e.target.closest("[data-tip]");
    if (!t) { tip.style.opacity = 0; return; }
    tip.textContent = t.getAttribute("data-tip");
    tip.style.opacity = 1;
    const x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = x + "px"; tip.style.top = (e.clientY + 14) + "px";
  });

  // ---- bar chart (grouped or stacked) as an SVG string ----
  function barChart(opts) {
    const W = opts.width || 1100, H = opts.height || 360;
    const m = {l: 84, r: 16, t: 14, b: opts.xLabel ? 48 : 30};
    const cats = opts.categories, series = opts.series;
    const iw = W - m.l - m.r, ih = H - m.t - m.b;
    let max = 0;
    cats.forEach((_, i) => {
      if (opts.stacked) max = Math.max(max, series.reduce((s, se) => s + (se.values[i] || 0), 0));
      else series.forEach((se) => { max = Math.max(max, se.values[i] || 0); });
    });
    const ticks = niceTicks(0, max || 1, 5), top = ticks[ticks.length - 1];
    const y = (v) => m.t + ih - (v / top) * ih;
    const band = iw / Math.max(cats.length, 1), pad = band * (cats.length > 40 ? 0.08 : 0.18);
    let s = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(opts.label || "bar chart")}">`;
    ticks.forEach((t) => {
      s += `<line x1="${m.l}" x2="${W - m.r}" y1="${y(t)}" y2="${y(t)}" stroke="#e3e6ec"/>`;
      s += `<text x="${m.l - 8}" y="${y(t) + 4}" text-anchor="end">${esc(fmt(t))}</text>`;
    });
    const every = Math.ceil(cats.length / 40);
    cats.forEach((c, i) => {
      const x0 = m.l + i * band + pad, bw = band - 2 * pad;
      if (opts.stacked) {
        let acc = 0;
        series.forEach((se) => {
          const v = se.values[i] || 0;
          if (v > 0) {
            s += `<rect class="bar" x="${x0}" y="${y(acc + v)}" width="${bw}" height="${y(acc) - y(acc + v)}" fill="${se.colour}" data-tip="${esc(opts.catName)} ${esc(c)} · ${esc(se.name)}: ${esc(fmt(v))}"/>`;
          }
          acc += v;
        });
      } else {
        const sw = bw / series.length;
        series.forEach((se, j) => {
          const v = se.values[i];
          if (v === null || v === undefined) return;
          s += `<rect class="bar" x="${x0 + j * sw}" y="${y(v)}" width="${Math.max(sw - 0.5, 0.5)}" height="${m.t + ih - y(v)}" fill="${se.colour}" data-tip="${esc(opts.catName)} ${esc(c)} · ${esc(se.name)}: ${esc(fmt(v))}"/>`;
        });
      }
      if (i % every === 0) s += `<text x="${m.l + (i + 0.5) * band}" y="${m.t + ih + 16}" text-anchor="middle">${esc(c)}</text>`;
    });
    s += `<line x1="${m.l}" x2="${W - m.r}" y1="${m.t + ih}" y2="${m.t + ih}" stroke="#8a93a3"/>`;
    if (opts.xLabel) s += `<text x="${m.l + iw / 2}" y="${H - 8}" text-anchor="middle" font-weight="600">${esc(opts.xLabel)}</text>`;
    if (opts.yLabel) s += `<text transform="translate(16 ${m.t + ih / 2}) rotate(-90)" text-anchor="middle" font-weight="600">${esc(opts.yLabel)}</text>`;
    return s + "</svg>";
  }
  function legend(el, series) {
    el.innerHTML = series.map((se) => `<span><span class="sw" style="background:${se.colour}"></span>${esc(se.name)}</span>`).join("");
  }

  // ---- header, alerts, stories, glossary ----
  const a = R.adapter, S = R.summary;
  const FULL = String(a.peft_type).toUpperCase() === "FULL";  // a full fine-tune diff, not LoRA
  if (FULL) $("#title").textContent = "How fine-tuning changed the model";
  $("#subtitle").textContent = [a.base_model_name_or_path ? "Base: " + a.base_model_name_or_path : "Base model not recorded",
    FULL ? "full fine-tune" : `${a.peft_type} r=${a.r} α=${fmt(a.lora_alpha)}`, `${R.modules.length} modules analysed`].join("  ·  ");
  const alerts = [];
  if (S.nonfinite_modules && S.nonfinite_modules.length) alerts.push(`<div class="alert bad"><b>NaN/Inf weights found</b> in ${S.nonfinite_modules.length} module(s): ${esc(S.nonfinite_modules.slice(0, 6).join(", "))}${S.nonfinite_modules.length > 6 ? " …" : ""}. Their metrics are unreliable.</div>`);
  (R.warnings || []).forEach((w) => alerts.push(`<div class="alert note">${esc(w)}</div>`));
  if (R.needs_base && R.needs_base.length) alerts.push(`<div class="alert note"><b>Computed without the base model.</b> Skipped: ${esc(R.needs_base.join(", "))}. Run with <code>--base DIR</code> to include them.</div>`);
  $("#alerts").innerHTML = alerts.join("");
  document.querySelectorAll(".story[data-section]").forEach((el) => {
    const key = el.getAttribute("data-section"), lines = DATA.sections[key];
    if (!lines || !lines.length) return;
    el.innerHTML = `<h4>${esc(DATA.section_titles[key] || "What this tells us")}</h4>` + lines.map((l) => `<p>${esc(l)}</p>`).join("");
  });
  $("#glossary-list").innerHTML = Object.entries(R.glossary && Object.keys(R.glossary).length ? R.glossary : DATA.glossary)
    .map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
  $("#footer").textContent = `Generated by tunelens · ${R.schema} · every number on this page is also in analysis.json.`;

  // ---- summary cards ----
  const layers = R.layers.slice().sort((p, q) => p.layer - q.layer);
  const lm = S.layers_modified || [];
  const cards = [
    [S.trainable_params.toLocaleString("en-US"), FULL ? "Parameters changed" : "Trainable parameters",
      S.trainable_share !== null && S.trainable_share !== undefined ? pct(S.trainable_share, 3) + " of the base's " + S.base_params.toLocaleString("en-US") : "share unknown (no base given)"],
    [`${lm.length}${S.num_layers ? " / " + S.num_layers : ""}`, "Layers modified",
      lm.length ? (lm.length === 1 ? "layer " + lm[0] : `layers ${lm[0]}–${lm[lm.length - 1]}`) : "none"],
    [fmt(S.mean_module_fro), "Mean ΔW per module", "‖ΔW‖_F, a fused qkv counted once · max " + fmt(S.max_module_fro)],
    FULL ? ["full", "Fine-tune", "every weight trainable · ΔW = W_tuned − W_base"]
      : a.format === "mlx-lm" ? [`r ${a.r}`, "LoRA config (mlx-lm)", `scale ${fmt(a.scale)} · ΔW = scale·B·A`]
      : [`r ${a.r}`, "LoRA config", `α ${fmt(a.lora_alpha)}${a.use_rslora ? ", rsLoRA" : ""}${a.use_dora ? ", DoRA" : ""} · scale ${fmt(a.use_rslora ? a.lora_alpha / Math.sqrt(a.r) : a.lora_alpha / a.r)}`],
  ];
  if (S.mean_layer_fro_sum !== null && S.mean_layer_fro_sum !== undefined) cards.splice(3, 0, [fmt(S.mean_layer_fro_sum), "Mean ΔW per layer", "S_ℓ = Σ‖ΔW‖_F over a layer's matrices · max " + fmt(S.max_layer_fro_sum)]);
  if (S.mean_rank_utilisation !== null && S.mean_rank_utilisation !== undefined) cards.push([pct(S.mean_rank_utilisation, 0), "Mean rank utilisation", "effective rank ÷ r"]);
  const findings = [];
  (DATA.sections.health || []).forEach((l) => findings.push(`<li class="bad">${esc(l)}</li>`));
  ["layers", "qkvo", "histogram", "rank"].forEach((key) => { if (DATA.sections[key]) findings.push(`<li>${esc(DATA.sections[key][0])}</li>`); });
  if (findings.length) $("#findings").innerHTML = findings.join(""); else $("#findings-card").style.display = "none";
  $("#cards").innerHTML = cards.map(([v, k, d]) => `<div class="stat"><div class="v">${esc(v)}</div><div class="k">${esc(k)}</div><div class="d">${esc(d)}</div></div>`).join("");

  // ---- group shares: one stacked horizontal bar ----
  const groups = Object.entries(S.group_fro || {}).filter(([, v]) => v > 0);
  const gtotal = groups.reduce((s, [, v]) => s + v, 0);
  if (groups.length >= 2 && gtotal > 0) {
    let x = 0, s = `<svg viewBox="0 0 1100 44" role="img" aria-label="group shares">`;
    groups.forEach(([g, v], i) => {
      const w = (v / gtotal) * 1100;
      s += `<rect x="${x}" y="0" width="${w}" height="44" fill="${GROUP_COLOURS[g] || PALETTE[(i + 4) % PALETTE.length]}" data-tip="${esc(g)}: Σ‖ΔW‖_F ${esc(fmt(v))} (${pct(v / gtotal)})"/>`;
      if (w > 90) s += `<text x="${x + 10}" y="27" style="fill:#fff;font-size:15px;font-weight:600">${esc(g)} ${pct(v / gtotal, 0)}</text>`;
      x += w;
    });
    $("#groupbar").innerHTML = s + "</svg>";
    $("#groupbar").className = "chart";
  } else {
    $("#groupbar-card").style.display = "none";
  }

  // ---- per-layer bars by component ----
  // Reading order: attention Q, K, V, O, then the MLP. Past a dozen (a MoE adapter has one per
  // expert) report.py keeps the largest and the rest are summed into one "other" series.
  const components = DATA.components, shownComponents = new Set(components);
  const compSeries = components.map((c, i) => ({name: c, colour: PALETTE[i % PALETTE.length],
    values: layers.map((l) => (c in l.components ? l.components[c] : null))}));
  if (DATA.components_folded) compSeries.push({name: `${DATA.components_folded} other components (summed)`, colour: "#bbbbbb",
    values: layers.map((l) => Object.entries(l.components).reduce((s, [c, v]) => (shownComponents.has(c) ? s : s + (v || 0)), 0))});
  // Grid view: one cell per (component, layer), coloured by a chosen per-module metric.
  const GRID_METRICS = [["fro", "‖ΔW‖_F", fmt], ["spectral", "spectral norm σ₁", fmt],
    ["rank_utilisation", "rank utilisation", (v) => pct(v, 0)], ["effective_rank", "effective rank", fmt]];
  if (R.modules.some((mod) => mod.relative_fro !== null && mod.relative_fro !== undefined)) GRID_METRICS.splice(1, 0, ["relative_fro", "relative change ‖ΔW‖/‖W‖", (v) => pct(v, 2)]);
  $("#grid-metric").innerHTML = GRID_METRICS.map(([k, label]) => `<option value="${k}">${esc(label)}</option>`).join("");
  function viridis(t) {  // perceptually uniform and colour-blind safe; t in [0, 1]
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const u = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(Math.floor(u), stops.length - 2), f = u - i;
    return "rgb(" + stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f)).join(",") + ")";
  }
  function gridChart(metric) {
    const [key, label, show] = GRID_METRICS.find(([k]) => k === metric);
    const byCell = {};
    // An experts component has one record per expert: its cell shows the largest expert's.
    R.modules.forEach((mod) => {
      if (mod.layer === null || !shownComponents.has(mod.component)) return;
      const cell = mod.component + "@" + mod.layer, held = byCell[cell];
      if (!held || (mod.expert !== null && mod.expert !== undefined && (mod[key] || 0) > (held[key] || 0))) byCell[cell] = mod;
    });
    const vals = Object.values(byCell).map((mod) => mod[key]).filter((v) => v !== null && v !== undefined);
    // A loop, not Math.min(...vals): spreading tens of thousands of arguments overflows the stack.
    const lo = vals.reduce((p, v) => Math.min(p, v), Infinity), hi = vals.reduce((p, v) => Math.max(p, v), -Infinity);
    const labelW = Math.min(220, 12 + 7 * Math.max(...components.map((c) => c.length))), W = widthOf("#layer-chart");
    const cw = (W - labelW - 10) / Math.max(layers.length, 1), ch = 26, H = 30 + ch * components.length + 50;
    let s = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="layer by component grid">`;
    components.forEach((c, r) => {
      s += `<text x="${labelW - 8}" y="${14 + r * ch + ch / 2 + 4}" text-anchor="end">${esc(c)}</text>`;
      layers.forEach((l, i) => {
        const mod = byCell[c + "@" + l.layer], v = mod ? mod[key] : null;
        const x = labelW + i * cw, y = 14 + r * ch;
        if (v === null || v === undefined) s += `<rect x="${x}" y="${y}" width="${cw - 1}" height="${ch - 1}" fill="#f0f2f6" data-tip="layer ${l.layer} · ${esc(c)}: not modified"/>`;
        else s += `<rect class="cell" x="${x}" y="${y}" width="${cw - 1}" height="${ch - 1}" fill="${viridis(hi > lo ? (v - lo) / (hi - lo) : 0.5)}" data-tip="layer ${l.layer} · ${esc(c)}${mod.expert !== null && mod.expert !== undefined ? " (largest expert: " + mod.expert + ")" : ""}: ${esc(label)} ${esc(show(v))}"/>`;
      });
    });
    const every = Math.ceil(layers.length / 40), yb = 14 + ch * components.length;
    layers.forEach((l, i) => { if (i % every === 0) s += `<text x="${labelW + (i + 0.5) * cw}" y="${yb + 16}" text-anchor="middle">${l.layer}</text>`; });
    s += `<text x="${labelW + (W - labelW) / 2}" y="${yb + 34}" text-anchor="middle" font-weight="600">Layer</text>`;
    for (let k = 0; k < 50; k++) s += `<rect x="${W - 270 + k * 4}" y="${H - 12}" width="4" height="10" fill="${viridis(k / 49)}"/>`;
    s += `<text x="${W - 276}" y="${H - 3}" text-anchor="end">${esc(label)}: ${esc(show(lo))}</text><text x="${W - 66}" y="${H - 3}">${esc(show(hi))}</text>`;
    return s + "</svg>";
  }
  function drawLayers() {
    const mode = $("#layer-mode").value;
    $("#grid-metric-label").hidden = mode !== "grid";
    $("#layer-legend").style.display = mode === "grid" ? "none" : "";
    if (!layers.length) { $("#layer-chart").innerHTML = `<p class="hint">No per-layer modules in this ${FULL ? "fine-tune" : "adapter"}.</p>`; return; }
    $("#layer-chart").innerHTML = mode === "grid" ? gridChart($("#grid-metric").value) : barChart({width: widthOf("#layer-chart"), categories: layers.map((l) => l.layer), series: compSeries,
      stacked: mode === "stacked", catName: "layer", xLabel: "Layer", yLabel: "‖ΔW‖_F (Frobenius norm)", label: "per-layer change by component"});
  }
  $("#layer-mode").addEventListener("change", drawLayers);
  $("#grid-metric").addEventListener("change", drawLayers);
  // Many layers × components make grouped bars too thin to read: open on the grid then.
  if (layers.length * components.length > 160) $("#layer-mode").value = "grid";
  drawLayers();
  legend($("#layer-legend"), compSeries);

  // ---- stacked Q/K/V/O ----
  const roleOrder = ["Q", "K", "V", "O", "QKV"];
  const roleByLayer = {};
  R.modules.forEach((mod) => {
    const role = DATA.roles[mod.name];
    if (!role || mod.layer === null || mod.fro === null) return;
    (roleByLayer[mod.layer] = roleByLayer[mod.layer] || {})[role] = ((roleByLayer[mod.layer] || {})[role] || 0) + mod.fro;
  });
  let drawQkvo = () => {};
  const rolesPresent = roleOrder.filter((r) => Object.values(roleByLayer).some((x) => r in x));
  const roleLayers = Object.keys(roleByLayer).map(Number).sort((p, q) => p - q);
  if (rolesPresent.length) {
    const names = {Q: "Q (query)", K: "K (key)", V: "V (value)", O: "O (output)", QKV: "fused Q/K/V"};
    const roleSeries = rolesPresent.map((r) => ({name: names[r], colour: ROLE_COLOURS[r], values: roleLayers.map((l) => roleByLayer[l][r] || 0)}));
    drawQkvo = () => { $("#qkvo-chart").innerHTML = barChart({width: widthOf("#qkvo-chart"), categories: roleLayers, series: roleSeries, stacked: true, catName: "layer",
      xLabel: "Layer", yLabel: "‖ΔW‖_F, stacked", label: "stacked Q/K/V/O per layer", height: 320}); };
    drawQkvo();
    legend($("#qkvo-legend"), roleSeries);
  } else {
    $("#qkvo-chart").innerHTML = `<p class="hint">This ${FULL ? "fine-tune" : "adapter"} does not touch the attention projections.</p>`;
  }

  // ---- MoE experts: layer × expert grid and each layer's top experts ----
  const EX = R.experts;
  if (!EX) { $("#experts").hidden = true; $("#toc-experts").hidden = true; }
  else {
    let hi = 0;
    EX.layers.forEach((l) => l.fro_by_expert.forEach((v) => { if (v !== null && v > hi) hi = v; }));
    const W = widthOf("#expert-chart"), labelW = 60, cw = (W - labelW - 10) / EX.num_experts;
    const ch = Math.max(4, Math.min(18, 640 / EX.layers.length)), H = 20 + ch * EX.layers.length + 50;
    let s = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="layer by expert grid">`;
    const every = Math.ceil(EX.layers.length / 24);
    EX.layers.forEach((l, r) => {
      const y = 10 + r * ch;
      if (r % every === 0) s += `<text x="${labelW - 8}" y="${y + ch / 2 + 4}" text-anchor="end">${l.layer}</text>`;
      l.fro_by_expert.forEach((v, e) => {
        s += `<rect class="cell" x="${labelW + e * cw}" y="${y}" width="${Math.max(cw - 0.5, 0.5)}" height="${Math.max(ch - 0.5, 0.5)}" fill="${viridis(hi > 0 && v !== null ? v / hi : 0)}" data-tip="layer ${l.layer} · expert ${e}: Σ‖ΔW_e‖_F ${esc(fmt(v))}"/>`;
      });
    });
    const yb = 10 + ch * EX.layers.length, xEvery = Math.ceil(EX.num_experts / 32);
    for (let e = 0; e < EX.num_experts; e += xEvery) s += `<text x="${labelW + (e + 0.5) * cw}" y="${yb + 14}" text-anchor="middle">${e}</text>`;
    s += `<text x="${labelW + (W - labelW) / 2}" y="${yb + 32}" text-anchor="middle" font-weight="600">Expert (rows: layers)</text>`;
    for (let k = 0; k < 50; k++) s += `<rect x="${W - 270 + k * 4}" y="${H - 12}" width="4" height="10" fill="${viridis(k / 49)}"/>`;
    s += `<text x="${W - 276}" y="${H - 3}" text-anchor="end">Σ‖ΔW_e‖_F: 0</text><text x="${W - 66}" y="${H - 3}">${esc(fmt(hi))}</text>`;
    $("#expert-chart").innerHTML = s + "</svg>";
    table($("#expert-table"), [
      {key: "layer", title: "Layer", num: true},
      {key: "top", title: `Top ${EX.top_k} expert(s), largest first`},
      {key: "top_share", title: "Their share", num: true, fmt: (v) => pct(v, 0)},
      {key: "uniform", title: "If all moved alike", num: true, fmt: (v) => pct(v, 0)},
    ], EX.layers.map((l) => ({layer: l.layer, top: l.top_experts.join(", "), top_share: l.top_share, uniform: EX.uniform_share})));
  }

  // ---- layer picker: heatmap + singular-value spectrum per module ----
  // Heatmaps travel as base64 float32 (report.py encode_heatmap); NaN marks a non-finite block.
  function decodeF32(b64) {
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }
  const heatmaps = {};
  const DETAIL_MAX = 64;  // module cards drawn for one layer: a MoE layer can hold hundreds
  (R.heatmaps || []).forEach((h) => {
    const flat = decodeF32(h.f32), values = [];
    for (let i = 0; i < h.rows; i++) values.push(Array.from(flat.subarray(i * h.cols, (i + 1) * h.cols), (v) => (Number.isNaN(v) ? null : v)));
    heatmaps[h.module] = {module: h.module, rows: h.rows, cols: h.cols, values};
  });
  const pickLayers = [...new Set(R.modules.map((mod) => mod.layer))].sort((p, q) => (p === null) - (q === null) || p - q);
  const picker = $("#layer-picker"), profileOf = new Map(layers.map((p) => [p.layer, p]));
  picker.innerHTML = pickLayers.map((l) => {
    const prof = profileOf.get(l);
    return `<option value="${l === null ? "none" : l}">${l === null ? "outside the layers (embeddings, head)" : "Layer " + l}${prof ? " · Σ‖ΔW‖_F " + fmt(prof.fro_sum) : ""}</option>`;
  }).join("");
  // Start on the most-changed layer: the one a reader wants first.
  if (layers.length) picker.value = String(layers.reduce((p, q) => (q.fro_sum > p.fro_sum ? q : p)).layer);

  function heatColour(t) {  // t in [-1, 1] -> blue (neg) · white · red (pos), ColorBrewer RdBu
    const stops = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
    const u = (Math.max(-1, Math.min(1, t)) + 1) / 2 * (stops.length - 1), i = Math.min(Math.floor(u), stops.length - 2), f = u - i;
    return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
  }
  function drawHeatmap(canvas, h) {
    const vals = h.values, rows = vals.length, cols = rows ? vals[0].length : 0;
    canvas.width = cols; canvas.height = rows;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
    let vmax = 0;
    vals.forEach((row) => row.forEach((v) => { if (v !== null) vmax = Math.max(vmax, Math.abs(v)); }));
    vals.forEach((row, i) => row.forEach((v, j) => {
      const c = v === null ? [0, 0, 0] : heatColour(vmax ? v / vmax : 0), o = 4 * (i * cols + j);
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }));
    ctx.putImageData(img, 0, 0);
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor((e.clientX - r.left) / r.width * cols), i = Math.floor((e.clientY - r.top) / r.height * rows);
      if (vals[i] && vals[i][j] !== undefined) canvas.setAttribute("data-tip", `block row ${i}, col ${j} (of ${rows}×${cols}): mean ΔW ${fmt(vals[i][j])}`);
    });
    return vmax;
  }
  function spectrum(sv, rank) {
    if (!sv.length || !(Math.max(...sv) > 0)) return `<div class="nomap">ΔW is zero: this matrix is unchanged</div>`;
    const W = 300, H = 150, m = {l: 42, r: 6, t: 8, b: 24}, iw = W - m.l - m.r, ih = H - m.t - m.b;
    const vals = sv.slice(0, Math.max(rank, 1) * 2 > 64 ? 64 : Math.max(sv.length, 1));
    const max = Math.max(...vals, 1e-30), ticks = niceTicks(0, max, 3), top = ticks[ticks.length - 1];
    const bw = iw / Math.max(vals.length, 1);
    const energy = vals.reduce((s, v) => s + v * v, 0);
    let s = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="singular values">`, cum = 0;
    ticks.forEach((t) => { const y = m.t + ih - t / top * ih; s += `<line x1="${m.l}" x2="${W - m.r}" y1="${y}" y2="${y}" stroke="#eceef2"/><text x="${m.l - 4}" y="${y + 4}" text-anchor="end" font-size="10">${esc(fmt(t))}</text>`; });
    vals.forEach((v, i) => {
      cum += v * v;
      const h = v / top * ih;
      s += `<rect x="${m.l + i * bw + bw * 0.12}" y="${m.t + ih - h}" width="${bw * 0.76}" height="${h}" fill="#0072B2" data-tip="σ${i + 1} = ${esc(fmt(v))} · cumulative energy ${pct(energy ? cum / energy : 0)}"/>`;
      const labelEvery = vals.length <= 10 ? 1 : Math.ceil(vals.length / 8);
      if (i === 0 || (i + 1) % labelEvery === 0) s += `<text x="${m.l + (i + 0.5) * bw}" y="${H - 8}" text-anchor="middle" font-size="10">${i + 1}</text>`;
    });
    return s + `<line x1="${m.l}" x2="${W - m.r}" y1="${m.t + ih}" y2="${m.t + ih}" stroke="#8a93a3"/></svg>`;
  }
  function drawDetail() {
    const key = picker.value, layer = key === "none" ? null : Number(key);
    const mods = R.modules.filter((mod) => mod.layer === layer);
    const el = $("#layer-detail");
    el.innerHTML = "";
    $("#layer-picker-info").textContent = `${mods.length} module(s) in this layer · largest first` +
      (mods.length > DETAIL_MAX ? ` · showing the ${DETAIL_MAX} largest (every module is in the table below)` : "");
    const story = DATA.layer_stories[JSON.stringify(layer)] || [];
    $("#layer-story").innerHTML = story.length ? `<h4>What this layer's profile means</h4>` + story.map((l) => `<p>${esc(l)}</p>`).join("") : "";
    mods.slice().sort((p, q) => (q.fro || 0) - (p.fro || 0)).slice(0, DETAIL_MAX).forEach((mod) => {
      const div = document.createElement("div");
      div.className = "mod";
      div.setAttribute("data-module", mod.name);
      const h = heatmaps[mod.name];
      div.innerHTML = `<h4>${esc(mod.component)}</h4>
        <div class="meta">${esc(mod.shape.join(" × "))} · rank ${mod.rank} · ‖ΔW‖_F ${esc(fmt(mod.fro))} · σ₁ ${esc(fmt(mod.spectral))}<br>
        effective rank ${esc(fmt(mod.effective_rank))} of ${mod.rank} (${pct(mod.rank_utilisation, 0)} used) · stable rank ${esc(fmt(mod.stable_rank))} · 90% energy in ${mod.energy_rank_90}
        ${mod.relative_fro !== null && mod.relative_fro !== undefined ? " · relative change " + pct(mod.relative_fro, 2) : ""}
        ${mod.intruder_dimensions ? " · " + mod.intruder_dimensions + " intruder dim." : ""}
        ${mod.nonfinite ? ` · <b style="color:#a40000">${mod.nonfinite} NaN/Inf</b>` : ""}</div>
        <div class="panes"><div><div class="pane-title">ΔW heatmap (block means${h ? ", " + h.rows + "×" + h.cols : ""})</div>
        ${h ? '<canvas class="heat"></canvas><div class="cbar"><span class="lo"></span><i></i><span class="hi"></span></div>' : `<div class="nomap">${DATA.heatmaps_left_out ? "heatmap left out of this page (only the largest modules' are embedded); it is in analysis.json" : "no heatmap stored for this module"}</div>`}</div>
        <div><div class="pane-title">Singular values σᵢ</div>${spectrum(mod.singular_values || [], mod.rank)}</div></div>`;
      el.appendChild(div);
      if (h && !(mod.fro > 0)) {
        div.querySelector("canvas").outerHTML = `<div class="nomap">ΔW is zero: this matrix is unchanged</div>`;
        div.querySelector(".cbar").remove();
      } else if (h) {
        const vmax = drawHeatmap(div.querySelector("canvas"), h);
        div.querySelector(".cbar .lo").textContent = "−" + fmt(vmax);
        div.querySelector(".cbar .hi").textContent = "+" + fmt(vmax);
      }
    });
  }
  picker.addEventListener("change", drawDetail);
  if (pickLayers.length) drawDetail(); else $("#layer-detail").innerHTML = `<p class="hint">No modules.</p>`;

  // ---- histogram ----
  const H = R.histogram;
  $("#hist-cards").innerHTML = [["Mean", H.mean], ["Std", H.std], ["Min", H.min], ["Max", H.max]]
    .map(([k, v]) => `<div class="stat"><div class="v">${esc(fmt(v))}</div><div class="k">${k}</div></div>`).join("")
    + `<div class="stat"><div class="v">${pct(H.share_within_one_std)}</div><div class="k">within one std</div><div class="d">normal: 68.3%${H.excess_kurtosis !== null && H.excess_kurtosis !== undefined ? " · excess kurtosis " + fmt(H.excess_kurtosis) : ""}</div></div>`;
  function drawHist() {
    const log = $("#hist-log").checked, edges = H.bin_edges, counts = H.counts;
    if (!counts || !counts.length) { $("#hist-chart").innerHTML = `<p class="hint">No histogram.</p>`; return; }
    const W = widthOf("#hist-chart"), Ht = 320, m = {l: 84, r: 16, t: 14, b: 46}, iw = W - m.l - m.r, ih = Ht - m.t - m.b;
    const lo = edges[0], hi = edges[edges.length - 1], x = (v) => m.l + (v - lo) / (hi - lo || 1) * iw;
    const tr = (c) => (log ? Math.log10(1 + c) : c), cmax = Math.max(...counts.map(tr), 1e-9);
    const y = (c) => m.t + ih - tr(c) / cmax * ih;
    let s = `<svg viewBox="0 0 ${W} ${Ht}" role="img" aria-label="histogram of ΔW values">`;
    if (H.std > 0) {
      const a0 = Math.max(lo, H.mean - H.std), a1 = Math.min(hi, H.mean + H.std);
      s += `<rect x="${x(a0)}" y="${m.t}" width="${Math.max(x(a1) - x(a0), 0)}" height="${ih}" fill="#E69F00" opacity="0.13" data-tip="mean ± 1 std: ${pct(H.share_within_one_std)} of entries"/>`;
    }
    counts.forEach((c, i) => {
      if (!c) return;
      s += `<rect x="${x(edges[i])}" y="${y(c)}" width="${Math.max(x(edges[i + 1]) - x(edges[i]) - 0.6, 0.6)}" height="${m.t + ih - y(c)}" fill="#0072B2" data-tip="[${esc(fmt(edges[i]))}, ${esc(fmt(edges[i + 1]))}): ${c.toLocaleString("en-US")} entries"/>`;
    });
    niceTicks(lo, hi, 8).forEach((t) => { if (t >= lo && t <= hi) s += `<line x1="${x(t)}" x2="${x(t)}" y1="${m.t + ih}" y2="${m.t + ih + 5}" stroke="#8a93a3"/><text x="${x(t)}" y="${m.t + ih + 18}" text-anchor="middle">${esc(fmt(t))}</text>`; });
    const yt = niceTicks(0, log ? cmax : cmax, 4);
    yt.forEach((t) => { if (t <= cmax) s += `<text x="${m.l - 8}" y="${m.t + ih - t / cmax * ih + 4}" text-anchor="end">${esc(log ? "10^" + fmt(t) : fmt(t))}</text>`; });
    if (lo < 0 && hi > 0) s += `<line x1="${x(0)}" x2="${x(0)}" y1="${m.t}" y2="${m.t + ih}" stroke="#1d2330" stroke-dasharray="4 3" data-tip="zero"/>`;
    s += `<line x1="${x(H.mean)}" x2="${x(H.mean)}" y1="${m.t}" y2="${m.t + ih}" stroke="#D55E00" stroke-width="2" data-tip="mean ${esc(fmt(H.mean))}"/>`;
    s += `<line x1="${m.l}" x2="${W - m.r}" y1="${m.t + ih}" y2="${m.t + ih}" stroke="#8a93a3"/>`;
    s += `<text x="${m.l + iw / 2}" y="${Ht - 6}" text-anchor="middle" font-weight="600">ΔW entry value (dashed: zero · orange line: mean · shaded: mean ± 1 std)</text>`;
    s += `<text transform="translate(16 ${m.t + ih / 2}) rotate(-90)" text-anchor="middle" font-weight="600">${log ? "count (log₁₀(1+n))" : "count"}</text>`;
    $("#hist-chart").innerHTML = s + "</svg>";
  }
  $("#hist-log").addEventListener("change", drawHist);
  drawHist();
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { drawLayers(); drawQkvo(); drawHist(); }, 150);
  });
  $("#hist-note").textContent = H.exact ? "Counts are exact: every entry of every analysed ΔW." :
    `Mean, std, min and max are exact; counts are estimated from ${H.sample_size ? H.sample_size.toLocaleString("en-US") : "a sample of"} sampled entries` +
    (H.share_within_one_std_error ? ` (share within one std ± ${pct(H.share_within_one_std_error, 2)}).` : ".");

  // ---- sortable tables ----
  function table(el, columns, rows) {
    let sortKey = null, asc = false;
    function render() {
      const sorted = rows.slice();
      if (sortKey !== null) {
        sorted.sort((p, q) => {
          const u = p[sortKey], v = q[sortKey];
          if (u === v) return 0;
          if (u === null || u === undefined) return 1;
          if (v === null || v === undefined) return -1;
          return (u < v ? -1 : 1) * (asc ? 1 : -1);
        });
      }
      el.innerHTML = `<table><thead><tr>${columns.map((c, i) => `<th data-col="${i}" tabindex="0" aria-sort="${sortKey === c.key ? (asc ? "ascending" : "descending") : "none"}" class="${c.num ? "num" : ""} ${sortKey === c.key ? (asc ? "sorted-asc" : "sorted-desc") : ""}">${esc(c.title)}</th>`).join("")}</tr></thead><tbody>` +
        sorted.map((r) => `<tr>${columns.map((c) => `<td class="${c.num ? "num" : ""}">${c.html ? c.html(r) : esc(c.fmt ? c.fmt(r[c.key]) : r[c.key] === null ? "—" : r[c.key])}</td>`).join("")}</tr>`).join("") + "</tbody></table>";
      el.querySelectorAll("th").forEach((th) => {
        const sortBy = () => {
          const c = columns[+th.getAttribute("data-col")];
          if (sortKey === c.key) asc = !asc; else { sortKey = c.key; asc = !c.num; }
          render();
          el.querySelector(`th[data-col="${th.getAttribute("data-col")}"]`).focus();
        };
        th.addEventListener("click", sortBy);
        th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(); } });
      });
    }
    render();
  }
  const maxShift = Math.max(...R.top_neurons.map((t) => t.shift || 0), 1e-30);
  table($("#neuron-table"), [
    {key: "rank", title: "#", num: true},
    {key: "layer", title: "Layer", num: true},
    {key: "component", title: "Component"},
    {key: "index", title: "Neuron index", num: true},
    {key: "shift", title: "Shift ‖ΔW[i,:]‖₂", num: true, html: (r) => `<span class="bar" style="width:${Math.round(80 * r.shift / maxShift)}px"></span>${esc(fmt(r.shift))}`},
  ], R.top_neurons.map((t, i) => Object.assign({rank: i + 1}, t)));
  const modCols = [
    {key: "layer", title: "Layer", num: true},
    {key: "component", title: "Component", html: (r) => `<span data-tip="${esc(r.name)}">${esc(r.component)}</span>`},
    {key: "group", title: "Group"},
  ];
  if (R.experts) modCols.push({key: "expert", title: "Expert", num: true});
  modCols.push(
    {key: "shape_text", title: "Shape"}, {key: "rank", title: "r", num: true},
    {key: "fro", title: "‖ΔW‖_F", num: true, fmt}, {key: "spectral", title: "σ₁", num: true, fmt},
    {key: "effective_rank", title: "Eff. rank", num: true, fmt}, {key: "stable_rank", title: "Stable rank", num: true, fmt},
    {key: "rank_utilisation", title: "Util.", num: true, fmt: (v) => pct(v, 0)});
  if (R.modules.some((mod) => mod.relative_fro !== null && mod.relative_fro !== undefined)) modCols.push({key: "relative_fro", title: "Rel. change", num: true, fmt: (v) => (v === null ? "—" : pct(v, 2))});
  if (R.modules.some((mod) => mod.amplification !== null && mod.amplification !== undefined)) modCols.push({key: "amplification", title: "Amplif.", num: true, fmt});
  if (R.modules.some((mod) => mod.intruder_dimensions !== null && mod.intruder_dimensions !== undefined)) modCols.push({key: "intruder_dimensions", title: "Intruders", num: true});
  if (R.modules.some((mod) => mod.nonfinite)) modCols.push({key: "nonfinite", title: "NaN/Inf", num: true});
  // Model order: by layer (modules outside the layer stack last), then as the engine listed them.
  const inModelOrder = R.modules.map((mod, i) => [mod, i]).sort(([p, i], [q, j]) =>
    ((p.layer === null) - (q.layer === null)) || ((p.layer || 0) - (q.layer || 0)) || (i - j)).map(([mod]) => mod);
  table($("#module-table"), modCols, inModelOrder.map((mod) => Object.assign({shape_text: mod.shape.join("×")}, mod)));
  document.body.setAttribute("data-rendered", "true");
})();
