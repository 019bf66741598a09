"""Plain-English reading of an AnalysisResult, in the voice of a hand-written adapter report.

Every sentence is computed from the numbers in the result: nothing here is a canned verdict. The
report places each section's sentences beside its chart; `narrate()` is all of them in order.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from statistics import fmean

from tunelens.registry_hooks.engine.naming import LEAF_ORDER, ROLE_NAMES, ROLE_ORDER, role_of
from tunelens.registry_hooks.engine.result import AnalysisResult, FullDiffSection, FullFinetuneInfo
from tunelens.settings import AnalysisSettings

NORMAL_SHARE_WITHIN_ONE_STD = 0.6827  # P(|x - μ| < σ) for a normal distribution
DRIFT_MEAN_OVER_STD = 0.1  # |mean| / std above this reads as the whole delta leaning one way
HEAVY_TAIL_KURTOSIS = 1.0  # excess kurtosis above this: tails clearly heavier than a normal's
EVEN_SPREAD_RATIO = 1.5  # most/least changed layer below this: learning spread evenly
CONCENTRATED_RATIO = 3.0  # above this: a few layers did most of the work
TREND_CORRELATION = 0.5  # |Pearson r| of layer index vs change above this: a depth trend
TREND_MIN_RATIO = 1.2  # ...and only when the layers differ this much (no trend in noise)
SAME_SIZE_RATIO = 1.1  # two sizes within this factor read as "about as much"
AMPLIFICATION_HIGH = 2.0  # above: ΔW boosts directions W barely emphasised (LoRA paper, §7)
# The experts' change reads as concentrated when a layer's top experts hold at least this many
# times the share they would hold if every expert had moved alike.
EXPERT_CONCENTRATED = 2.0


SECTION_TITLES = {
    "summary": "Overall footprint",
    "layers": "Where the change landed",
    "qkvo": "Inside attention: Q / K / V / O",
    "experts": "Which experts moved",
    "rank": "How much of the rank was used",
    "histogram": "Shape of the change",
    "neurons": "Where specialisation concentrated",
    "base": "Compared with the base weights",
    "health": "Problems found",
    "training": "How training moved",
}

GLOSSARY: dict[str, str] = {
    "Adapter": "A small add-on file that changes how a large language model behaves without "
               "touching the original model's weights, like a lens attached to a camera.",
    "Base model": "The original, pre-trained model the adapter was trained on top of.",
    "Weight": "A number inside the model that multiplies an input; a layer holds matrices of them.",
    "ΔW (delta W)": "The change an adapter makes to one weight matrix: the fine-tuned weights "
                    "minus the base weights. For LoRA, ΔW = scale · B · A.",
    "LoRA": "Low-Rank Adaptation: instead of rewriting a weight matrix W, train two thin matrices "
            "B (out × r) and A (r × in) whose product is the change. The base stays frozen.",
    "Rank (r)": "How many independent directions of change LoRA can learn per matrix: the inner "
                "width of B and A. ΔW can never have more than r non-zero singular values.",
    "Alpha (α) and scale": "LoRA multiplies B·A by scale = α / r (α / √r with rsLoRA). Higher "
                           "α means the adapter's change is applied more strongly.",
    "rsLoRA": "Rank-stabilised LoRA: scale = α / √r, so larger ranks are not damped as much.",
    "DoRA": "Weight-Decomposed LoRA: also learns a per-output magnitude vector, so its real "
            "change can only be computed together with the base weights.",
    "Layer": "One of the stacked processing stages (transformer blocks) of the model. Each "
             "transforms the text representation a little further.",
    "Component": "A weight matrix inside a layer, such as self_attn.q_proj or mlp.down_proj.",
    "Attention": "The mechanism that decides which earlier words matter for the current one. "
                 "Its matrices are Q, K, V and O.",
    "Q / K / V / O": "Query: what the current word is looking for. Key: what each word offers. "
                     "Value: the information a word contributes. Output: how the attended "
                     "information is combined and written back.",
    "MLP": "The feed-forward part of each layer (gate/up/down or fc/proj): where much of a "
           "model's stored knowledge is thought to live.",
    "Expert": "In a mixture-of-experts (MoE) model, one of the parallel MLPs of a layer; a router "
              "sends each token to a few of them. Each expert's change ΔW_e is analysed as a "
              "matrix of its own.",
    "Neuron": "One output unit of a weight matrix: one row of W (and of ΔW).",
    "Parameter": "One trainable number. The trainable share is adapter parameters divided by "
                 "the base model's parameters.",
    "Frobenius norm": "‖ΔW‖_F = √(Σ ΔW_ij²): one number for the total size of a change, like "
                      "the distance all of a matrix's weights moved together.",
    "Spectral norm": "‖ΔW‖₂ = σ₁, the largest singular value: the most the change can stretch "
                     "any single input direction.",
    "Singular values": "σ₁ ≥ σ₂ ≥ … ≥ 0: how strongly each independent direction of a change "
                       "acts. A LoRA delta has at most r of them.",
    "Effective rank": "exp of the entropy of the normalised singular values (Roy & Vetterli): "
                      "how many directions effectively carry the change. r if all are equal, "
                      "about 1 if one dominates.",
    "Stable rank": "‖ΔW‖_F² / ‖ΔW‖₂²: a robust count of the strong directions; never more "
                   "than the rank.",
    "Energy rank": "The fewest directions that hold 90% (or 99%) of Σσᵢ², the change's energy.",
    "Rank utilisation": "Effective rank divided by the configured rank r: near 100% means the "
                        "adapter spreads its change over all r directions, low values mean a few "
                        "directions do all the work and a smaller r would likely do.",
    "Relative change": "‖ΔW‖_F / ‖W‖_F: the size of the change compared with the base matrix "
                       "it modifies. Needs the base model.",
    "Amplification factor": "From the LoRA paper: ‖ΔW‖_F / ‖Uᵀ W V‖_F, with U, V the top-r "
                            "singular directions of ΔW. Large values mean the adapter boosts "
                            "directions the base weights barely used. Needs the base model.",
    "Intruder dimensions": "Top singular vectors of the fine-tuned W+ΔW that look like none of "
                           "the base W's (max |cos| < 0.5; Shuttleworth et al. 2024): new "
                           "directions the fine-tune invented. Needs the base model.",
    "Top shifted neuron": "A row of ΔW with a large L2 norm: an output unit whose incoming "
                          "weights the adapter changed most.",
    "Heatmap": "A grid coloured by value. Here each cell is the mean of a block of ΔW: red = "
               "connections strengthened, blue = weakened, white = unchanged.",
    "Histogram": "Counts of ΔW's entries by value, pooled over every analysed matrix.",
    "Standard deviation (std)": "The typical distance of ΔW's entries from their mean.",
    "Drift": "A histogram whose centre sits far from zero relative to its width: the adapter "
             "shifts weights one way overall, rather than adjusting some up and some down.",
    "Heavy tails": "More extreme values than a bell curve of the same width would have "
                   "(positive excess kurtosis): a small set of entries carries large changes.",
    "Excess kurtosis": "A tail-weight measure: 0 for a normal distribution, positive when "
                       "extreme values are more common than under a normal.",
    "modules_to_save": "Whole matrices (often the output head or embeddings) that were fully "
                       "trained and saved alongside the LoRA factors.",
}

# A full fine-tune diff has no adapter, rank r, scale or factors: those entries are left out and
# the ones that mention an adapter are said of the fine-tune.
_LORA_ONLY_TERMS = ("Adapter", "LoRA", "Rank (r)", "Alpha (α) and scale", "rsLoRA", "DoRA",
                    "Rank utilisation", "Amplification factor", "modules_to_save")
FULL_GLOSSARY: dict[str, str] = {
    **{k: v for k, v in GLOSSARY.items() if k not in _LORA_ONLY_TERMS},
    "Full fine-tune": "Training that lets every weight of the model move: its "
                      "change is the difference between the fine-tuned and the base weights.",
    "Base model": "The original, pre-trained model the fine-tune started from.",
    "ΔW (delta W)": "The change fine-tuning made to one weight matrix: the fine-tuned weights "
                    "minus the base weights, W_tuned − W_base.",
    "Parameter": "One number of the model. The changed share is the parameters in tensors that "
                 "differ from the base divided by the base model's parameters.",
    "Singular values": "σ₁ ≥ σ₂ ≥ … ≥ 0: how strongly each independent direction of a change "
                       "acts. Large matrices report the top few, from a Lanczos solver.",
    "Relative rank": "The rank of ΔW (singular values above 1% of σ₁, counted exactly) divided "
                     "by min(m, n), the most it could have: low values mean the update is "
                     "low-rank, as LoRA assumes.",
    "Top shifted neuron": "A row of ΔW with a large L2 norm: an output unit whose incoming "
                          "weights the fine-tune changed most.",
    "Drift": "A histogram whose centre sits far from zero relative to its width: the fine-tune "
             "shifted weights one way overall, rather than adjusting some up and some down.",
}


def glossary_for(result: AnalysisResult) -> dict[str, str]:
    """The glossary that matches the result: FULL_GLOSSARY for a full fine-tune diff."""
    return dict(FULL_GLOSSARY if is_full_finetune(result) else GLOSSARY)


def _group(name: str) -> str:
    return {"mlp": "MLP"}.get(name, name)


_GROUP_ORDER = {"embedding": 0, "attention": 1, "mlp": 2, "other": 3}
def component_order(result: AnalysisResult) -> list[str]:
    """Components of the layer stack in reading order: attention Q, K, V, O, then the MLP."""
    groups = {m.component: m.group for m in result.modules if m.layer is not None}

    def key(component: str) -> tuple:
        # A fused part (attn.c_attn.q) sorts by its part; GPT-2's c_proj is attention's O or the
        # MLP's down projection depending on where it sits.
        leaf, group = component.rsplit(".", 1)[-1], groups[component]
        rank = LEAF_ORDER.get(leaf, (8 if group == "mlp" else 4) if leaf == "c_proj" else 9)
        return _GROUP_ORDER.get(group, 3), rank, component

    return sorted(groups, key=key)


def fmt(x: float | None) -> str:
    """A number as a person would write it: 3 significant figures, thousands separators."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 0.001:
        return f"{x:.3g}"
    return f"{x:.2e}"


def pct(share: float, digits: int = 1) -> str:
    """0.0123 -> '1.2%'; tiny shares keep enough digits to not read as zero."""
    value = share * 100
    if 0 < abs(value) < 0.1:
        return f"{value:.2g}%"
    return f"{value:.{digits}f}%"


def _layer_range(layers: list[int]) -> str:
    """[0,1,2,5] -> 'layers 0–2 and 5'."""
    if not layers:
        return "no layers"
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    parts = [f"{a}" if a == b else f"{a}–{b}" for a, b in runs]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return ("layer " if len(layers) == 1 else "layers ") + joined


def _pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    mx, my = fmean(xs), fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def component_means(result: AnalysisResult) -> dict[str, float]:
    """Mean ‖ΔW‖_F per component over the layers that have it."""
    per: dict[str, list[float]] = defaultdict(list)
    for layer in result.layers:
        for component, fro in layer.components.items():
            per[component].append(fro)
    return {c: fmean(v) for c, v in per.items() if v}


def role_totals(result: AnalysisResult) -> dict[str, float]:
    """Σ ‖ΔW‖_F over all layers for each attention role present (Q, K, V, O, QKV)."""
    totals: dict[str, float] = defaultdict(float)
    for module in result.modules:
        role = role_of(module)
        if role and math.isfinite(module.fro):
            totals[role] += module.fro
    return {r: totals[r] for r in ROLE_ORDER if r in totals}


def _summary(result: AnalysisResult) -> list[str]:
    s, a = result.summary, result.adapter
    out = []
    params = f"{s.trainable_params:,}"
    if is_full_finetune(result):
        return _full_summary(result)
    if s.trainable_share is not None and s.base_params:
        out.append(f"The adapter trains {params} parameters: {pct(s.trainable_share, 3)} of the "
                   f"base model's {s.base_params:,}. The base model itself is untouched; the "
                   f"adapter is a small set of adjustments applied on top of it.")
    else:
        out.append(f"The adapter trains {params} parameters. Its share of the base model is "
                   f"unknown because no base model was given.")
    if s.layers_modified:
        count = len(s.layers_modified)
        of = (f"{count} of {s.num_layers} layers" if s.num_layers else
              f"{count} layer{'s' if count != 1 else ''}")
        config = (f" with mlx-lm LoRA rank {a.r} and scale {fmt(a.scale)} (ΔW = scale·B·A)"
                  if a.format == "mlx-lm" else
                  f" with LoRA rank {a.r} and α {fmt(a.lora_alpha)}"
                  f"{' (rsLoRA scaling)' if a.use_rslora else ''}"
                  f"{' using DoRA' if a.use_dora else ''}")
        out.append(f"It modifies {of} ({_layer_range(s.layers_modified)}){config}.")
    out += _mean_change(result)
    return out


def _mean_change(result: AnalysisResult) -> list[str]:
    """The two average sizes of change, each said as what it averages: ‖ΔW‖_F per module (a
    fused projection counted once) and S_ℓ = Σ_components ‖ΔW‖_F per modified layer."""
    s = result.summary
    out = []
    if math.isfinite(s.mean_module_fro) and s.mean_module_fro > 0:
        out.append(f"Per modified matrix (a fused projection such as qkv_proj counted once) the "
                   f"change averages ‖ΔW‖_F = {fmt(s.mean_module_fro)}, the largest "
                   f"{fmt(s.max_module_fro)}.")
    if math.isfinite(s.mean_layer_fro_sum) and s.mean_layer_fro_sum > 0:
        out.append(f"Summed over each modified layer's matrices (S_ℓ) it averages "
                   f"{fmt(s.mean_layer_fro_sum)}, the largest {fmt(s.max_layer_fro_sum)}.")
    return out


def _full_summary(result: AnalysisResult) -> list[str]:
    """A full fine-tune's footprint: parameters and matrices changed, overall relative change."""
    s, section = result.summary, result.full_diff
    finite = [m for m in result.modules if math.isfinite(m.fro)]
    moved = sum(1 for m in finite if m.fro > 0)
    of = (f" of the base model's {s.base_params:,} parameters ({pct(s.trainable_share, 1)})"
          if s.trainable_share is not None and s.base_params else " parameters")
    out = [f"The fine-tune changed {s.trainable_params:,}{of}: {moved} of "
           f"{len(result.modules)} weight matrices moved. Every weight could move, so ΔW is the "
           f"full difference between the fine-tuned and the base weights, W_tuned − W_base."]
    if section is not None and section.relative_fro_total is not None:
        unchanged = section.tensors_unchanged
        out.append(f"Overall the weights moved by {pct(section.relative_fro_total, 3)} of their "
                   f"norm (‖ΔW‖_F / ‖W‖_F over all {section.tensors_compared} tensors); "
                   f"{unchanged} tensor{'s are' if unchanged != 1 else ' is'} bit-for-bit "
                   f"unchanged.")
    cells = _grid_cells(section)
    if cells:
        top, low = max(cells), min(cells)
        out.append(f"The largest relative change is layer {top[1]}'s {top[2]} matrix "
                   f"({pct(top[0], 3)}), the smallest layer {low[1]}'s {low[2]} "
                   f"({pct(low[0], 3)}).")
    if s.layers_modified:
        count = len(s.layers_modified)
        of_layers = f"{count} of {s.num_layers}" if s.num_layers else str(count)
        out.append(f"It modifies {of_layers} layers ({_layer_range(s.layers_modified)}).")
    return out + _mean_change(result)


def _grid_cells(section: FullDiffSection | None) -> list[tuple[float, int, str]]:
    """(relative change, layer, matrix type) of every filled cell of the full diff's grid."""
    if section is None:
        return []
    grid = section.grid
    return [(value, layer, t) for layer, row in zip(grid.layers, grid.rows("relative_fro"))
            for t, value in zip(grid.matrix_types, row) if value is not None]


def _full_layers(result: AnalysisResult) -> list[str]:
    """Which layers and matrix types moved most relative to their base weights."""
    cells = _grid_cells(result.full_diff)
    if not cells:
        return []
    by_type: dict[str, list[float]] = defaultdict(list)
    by_layer: dict[int, list[float]] = defaultdict(list)
    for value, layer, t in cells:
        by_type[t].append(value)
        by_layer[layer].append(value)
    types = sorted(((fmean(v), t) for t, v in by_type.items()), reverse=True)
    out = ["Relative to the base weights, by matrix type (mean ‖ΔW‖_F / ‖W‖_F over layers): "
           + ", ".join(f"{t} {pct(m, 3)}" for m, t in types)
           + (f": the {types[0][1]} matrices moved most." if len(types) >= 2 else ".")]
    if len(by_layer) >= 2:
        layers = sorted(((fmean(v), layer) for layer, v in by_layer.items()), reverse=True)
        out.append(f"By layer, the mean relative change is largest in layer {layers[0][1]} "
                   f"({pct(layers[0][0], 3)}) and smallest in layer {layers[-1][1]} "
                   f"({pct(layers[-1][0], 3)}).")
    return out


def _full_rank(result: AnalysisResult) -> list[str]:
    """The rank of a full fine-tune's ΔW (its rank relative to min(m, n))."""
    section = result.full_diff
    tensors = section.tensors if section is not None else []
    ranks = sorted(d.relative_rank for d in tensors if d.relative_rank is not None)
    if not ranks:
        return []
    rtol = section.settings.get("rank_rtol", 0.01)
    return [f"Relative rank of ΔW (σ_i above {rtol:g}·σ_1, over min(m, n)): median "
            f"{ranks[len(ranks) // 2]:.3f} over {len(ranks)} matrices, from {ranks[0]:.3f} to "
            f"{ranks[-1]:.3f}; a low value says the update is low-rank, as LoRA assumes."]


def _times(big: float, small: float) -> str:
    """'2.5× as much as', 'about as much as', or 'against nothing for' when small is 0."""
    if small <= 0:
        return "while nothing changed in"
    ratio = big / small
    return "about as much as" if ratio < SAME_SIZE_RATIO else f"{ratio:.1f}× as much as"


def is_full_finetune(result: AnalysisResult) -> bool:
    """A full fine-tune diff (full_diff.py) rather than a LoRA adapter."""
    return isinstance(result.adapter, FullFinetuneInfo)


def _who(result: AnalysisResult) -> str:
    return "the fine-tune" if is_full_finetune(result) else "the adapter"


def _layers(result: AnalysisResult) -> list[str]:
    layers = [l for l in result.layers if math.isfinite(l.fro_sum)]
    out: list[str] = _full_layers(result) if is_full_finetune(result) else []
    if len(layers) >= 2:
        most = max(layers, key=lambda l: l.fro_sum)
        least = min(layers, key=lambda l: l.fro_sum)
        sentence = (f"The most-changed layer is layer {most.layer} (summed ‖ΔW‖_F "
                    f"{fmt(most.fro_sum)}) and the least-changed is layer {least.layer} "
                    f"({fmt(least.fro_sum)})")
        if least.fro_sum > 0:
            ratio = most.fro_sum / least.fro_sum
            if ratio < EVEN_SPREAD_RATIO:
                reading = ("a narrow spread: every trained layer took a similar share of the "
                           "learning, none did all the work")
            elif ratio < CONCENTRATED_RATIO:
                reading = ("a moderate spread: some layers took on noticeably more of the new "
                           "task than others")
            else:
                reading = ("a wide spread: the learning is concentrated in a few layers, which "
                           "are the ones to inspect or to target when re-tuning")
            sentence += f": a {ratio:.1f}× range, {reading}."
        else:
            sentence += "; that layer did not change at all."
        out.append(sentence)
        r = _pearson([float(l.layer) for l in layers], [l.fro_sum for l in layers])
        if least.fro_sum > 0 and most.fro_sum / least.fro_sum < TREND_MIN_RATIO:
            pass  # layers this alike have no depth trend worth a sentence
        elif r > TREND_CORRELATION:
            out.append(f"Change grows with depth (correlation {r:.2f} between layer index and "
                       f"size of change): the later layers specialised most for the new task.")
        elif r < -TREND_CORRELATION:
            out.append(f"Change shrinks with depth (correlation {r:.2f} between layer index and "
                       f"size of change): the earlier layers were adjusted most.")
    elif len(layers) == 1:
        out.append(f"Only layer {layers[0].layer} was changed (summed ‖ΔW‖_F "
                   f"{fmt(layers[0].fro_sum)}).")
    groups = {g: v for g, v in result.summary.group_fro.items() if v and math.isfinite(v)}
    total = sum(groups.values())
    if len(groups) >= 2 and total > 0:
        ranked = sorted(groups.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{_group(g)} {pct(v / total, 0)}" for g, v in ranked)
        out.append(f"By group, the change (sum of ‖ΔW‖_F) splits {parts}: {_group(ranked[0][0])} "
                   f"carries {_times(ranked[0][1], ranked[1][1])} {_group(ranked[1][0])}.")
    elif len(groups) == 1:
        out.append(f"All of the change is in the {_group(next(iter(groups)))} group.")
    means = component_means(result)
    if len(means) >= 2:
        ranked = sorted(means.items(), key=lambda kv: -kv[1])
        (top, top_v), (low, low_v) = ranked[0], ranked[-1]
        out.append(f"Per layer, {top} changed most on average (‖ΔW‖_F {fmt(top_v)}), "
                   f"{_times(top_v, low_v)} {low}, the least-changed component ({fmt(low_v)}).")
    return out


def _qkvo(result: AnalysisResult) -> list[str]:
    totals = role_totals(result)
    total = sum(totals.values())
    if len(totals) < 2 or total <= 0:
        return []
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{ROLE_NAMES[r]} {pct(v / total, 0)}" for r, v in ranked)
    if ranked[-1][1] > 0 and ranked[0][1] / ranked[-1][1] < SAME_SIZE_RATIO:
        out = [f"Within attention the change splits {parts}: evenly, no component stands out."]
    else:
        out = [f"Within attention the change splits {parts}: {ROLE_NAMES[ranked[0][0]]} absorbed "
               f"the most, {ROLE_NAMES[ranked[-1][0]]} the least."]
    if {"Q", "K", "V", "O"} <= totals.keys() and len(out) == 1 and "evenly" not in out[0]:
        qk = (totals["Q"] + totals["K"]) / total
        if qk > 0.55:
            out.append(f"Query and Key together hold {pct(qk, 0)}: {_who(result)} mainly changed "
                       f"what the model pays attention to, a pattern usually read as learning "
                       f"where to look in the input.")
        elif qk < 0.45:
            out.append(f"Value and Output together hold {pct(1 - qk, 0)}: {_who(result)} mainly "
                       f"changed what attended information is passed on and how it is "
                       f"combined, a pattern usually read as learning a new style or format "
                       f"of expression.")
        else:
            out.append("Query/Key (where to look) and Value/Output (what to pass on) changed "
                       "by similar amounts: attention was adjusted in a balanced way.")
    return out


def _rank(result: AnalysisResult) -> list[str]:
    if is_full_finetune(result):
        return _full_rank(result)
    mods = [m for m in result.modules if m.rank > 0 and m.kind in ("lora", "embedding")
            and math.isfinite(m.effective_rank)]
    if not mods:
        return []
    util = fmean(m.rank_utilisation for m in mods)
    eff = fmean(m.effective_rank for m in mods)
    e90 = fmean(m.energy_rank_90 for m in mods)
    ranks = sorted({m.rank for m in mods})
    r_text = f"r = {ranks[0]}" if len(ranks) == 1 else f"r = {ranks[0]}–{ranks[-1]}"
    out = [f"On average a module uses {pct(util, 0)} of its rank ({r_text}): effective rank "
           f"{eff:.1f}, and {e90:.1f} directions hold 90% of the change's energy."]
    if util >= 0.8:
        out.append("The change is spread over nearly all available directions. That is what "
                   "a freshly initialised or under-trained adapter looks like, and it can also "
                   "mean the task wanted more capacity: a higher rank may help if quality "
                   "falls short.")
    elif util <= 0.35:
        out.append("A few directions carry most of the change: the adapter has spare "
                   "capacity, and a smaller rank would likely learn the same thing.")
    else:
        out.append("The singular values fall off in steps rather than all being equal or one "
                   "dominating: the usual healthy pattern, with the rank neither wasted nor "
                   "exhausted.")
    return out


def _histogram(result: AnalysisResult) -> list[str]:
    h = result.histogram
    if not (math.isfinite(h.std) and h.std > 0):
        return []
    out: list[str] = []
    drift = h.mean / h.std
    if abs(drift) > DRIFT_MEAN_OVER_STD:
        out.append(f"The entries of ΔW are not centred on zero: the mean {fmt(h.mean)} is "
                   f"{abs(drift):.2f} standard deviations {'above' if drift > 0 else 'below'} "
                   f"zero. That is drift: {_who(result)} pushes weights "
                   f"{'up' if drift > 0 else 'down'} overall rather than adjusting some up and "
                   f"some down, worth checking for an over-aggressive learning rate.")
    else:
        distance = "less than 0.001" if abs(drift) < 0.001 else f"only {abs(drift):.3f}"
        out.append(f"The entries of ΔW are centred on zero (mean {fmt(h.mean)}, {distance} "
                   f"standard deviations from it; std {fmt(h.std)}): increases and decreases "
                   f"balance out, with no overall drift.")
    share = h.share_within_one_std
    est = ""
    if not h.exact and h.sample_size:
        err = f" ± {pct(h.share_within_one_std_error)}" if h.share_within_one_std_error else ""
        population = f" of {h.total_entries:,}" if h.total_entries else ""
        est = f" (estimated from {h.sample_size:,} sampled entries{population}{err})"
    kurt = h.excess_kurtosis
    heavy = (kurt is not None and kurt > HEAVY_TAIL_KURTOSIS) or (
        kurt is None and share > NORMAL_SHARE_WITHIN_ONE_STD + 0.03)
    compare = ("more than" if share > NORMAL_SHARE_WITHIN_ONE_STD + 0.01 else
               "fewer than" if share < NORMAL_SHARE_WITHIN_ONE_STD - 0.01 else "about the same as")
    sentence = (f"{pct(share)} of the entries lie within one standard deviation of the mean"
                f"{est}, {compare} the 68.3% of a normal distribution")
    if heavy:
        sentence += (f"{f' (excess kurtosis {kurt:.1f})' if kurt is not None else ''}: a tall "
                     f"narrow peak with heavy tails. Most connections barely moved and the real "
                     f"learning sits in a small number of large entries.")
    elif kurt is not None and kurt < -HEAVY_TAIL_KURTOSIS:
        sentence += (f" (excess kurtosis {kurt:.1f}): a flat, wide distribution with few "
                     f"extremes, as if many connections moved by similar amounts.")
    else:
        sentence += (f"{f' (excess kurtosis {kurt:.1f})' if kurt is not None else ''}: a "
                     f"bell-shaped spread without unusual tails.")
    out.append(sentence)
    if h.min < 0 < h.max:
        lopsided = max(-h.min, h.max) / min(-h.min, h.max)
        if lopsided < 1.5:
            out.append(f"The most extreme decrease ({fmt(h.min)}) and increase (+{fmt(h.max)}) "
                       f"are roughly symmetric.")
        else:
            bigger = "decrease" if -h.min > h.max else "increase"
            out.append(f"The extremes are lopsided: the largest {bigger} is {lopsided:.1f}× the "
                       f"largest {'increase' if bigger == 'decrease' else 'decrease'} "
                       f"(min {fmt(h.min)}, max {fmt(h.max)}).")
    return out


def _neurons(result: AnalysisResult, settings: AnalysisSettings | None) -> list[str]:
    """The most-shifted neuron and where the top ones gather: the top analysis.top_neurons of
    `settings` (None: every neuron the result keeps, which the analysis cut at that setting)."""
    top = result.top_neurons[:settings.top_neurons] if settings else result.top_neurons
    if not top:
        return []
    first = top[0]
    where = f"layer {first.layer} " if first.layer is not None else ""
    out = [f"The most-shifted neuron is row {first.index} of {where}{first.component} (shift "
           f"{fmt(first.shift)}, the L2 norm of that row of ΔW)."]
    if len(top) >= 3:
        layer, n = Counter(t.layer for t in top).most_common(1)[0]
        fair_share = len(top) / max(len(result.layers), 1)  # if neurons spread evenly
        if layer is not None and n >= max(3, 2 * fair_share):
            out.append(f"Layer {layer} holds {n} of the top {len(top)}: a focal point of the "
                       f"specialisation.")
        component, k = Counter(t.component for t in top).most_common(1)[0]
        if k > len(top) / 2:
            out.append(f"{k} of the top {len(top)} are in {component}.")
    return out


def _base(result: AnalysisResult) -> list[str]:
    out: list[str] = []
    rel = [m for m in result.modules if m.relative_fro is not None and math.isfinite(m.relative_fro)]
    if rel:
        top = max(rel, key=lambda m: m.relative_fro)
        mean_rel = fmean(m.relative_fro for m in rel)
        reading = ("a light touch on the base weights" if mean_rel < 0.01 else
                   "a moderate adjustment of the base weights" if mean_rel < 0.1 else
                   f"a large change: {_who(result)} rewrites a sizeable part of these matrices "
                   "rather than nudging them")
        out.append(f"Compared with the base weights, the change is {pct(mean_rel, 2)} of ‖W‖_F "
                   f"on average ({reading}); the largest relative change is "
                   f"{pct(top.relative_fro, 2)} in {top.name}.")
    amp = [m for m in result.modules if m.amplification is not None and math.isfinite(m.amplification)]
    if amp:
        top = max(amp, key=lambda m: m.amplification)
        mean_amp = fmean(m.amplification for m in amp)
        reading = (f"{_who(result)} amplifies directions the base weights had not emphasised, "
                   "rather than repeating what the base already does strongly"
                   if mean_amp > AMPLIFICATION_HIGH else
                   f"{_who(result)} mostly reinforces directions the base weights already emphasise")
        out.append(f"The amplification factor averages {mean_amp:.1f} (highest "
                   f"{top.amplification:.1f} in {top.name}): {reading}.")
    intr = [m for m in result.modules if m.intruder_dimensions is not None]
    if intr:
        with_intruders = [m for m in intr if m.intruder_dimensions > 0]
        if with_intruders:
            out.append(f"{len(with_intruders)} of {len(intr)} modules have intruder dimensions "
                       f"(new singular directions unlike any of the base's), "
                       f"{sum(m.intruder_dimensions for m in intr)} in all: the fine-tune "
                       f"invented directions rather than only re-weighting existing ones.")
        else:
            out.append(f"None of the {len(intr)} checked modules has intruder dimensions: the "
                       f"fine-tune re-weighted directions the base already had.")
    if result.needs_base:
        out.append(f"Skipped because no base model was given: {'; '.join(result.needs_base)}. "
                   f"Pass the base model directory (--base) to compute them.")
    return out


def _health(result: AnalysisResult) -> list[str]:
    bad = result.summary.nonfinite_modules or [m.name for m in result.modules if m.nonfinite]
    if not bad:
        return []
    count = sum(m.nonfinite for m in result.modules)
    listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    modules = "1 module contains" if len(bad) == 1 else f"{len(bad)} modules contain"
    return [f"Warning: {modules} NaN or Inf values"
            f"{f' ({count:,} entries)' if count else ''}: {listed}. Their metrics are unreliable "
            f"and {_who(result)} will corrupt the model's outputs; retrain or check the export."]


def _training(result: AnalysisResult) -> list[str]:
    """Whether the last two checkpoints' ΔW column spaces agree: settled or still moving."""
    steps = result.checkpoints.subspace_similarity if result.checkpoints else []
    if not steps or steps[-1].mean is None:
        return []
    last = steps[-1]
    return [f"Between the last two checkpoints ({last.from_} → {last.to}) ΔW's column spaces "
            f"overlap {last.mean:.2f} on average (1 = the same subspace): "
            + ("training had settled on its directions." if last.mean > 0.9 else
               "the directions were still moving.")]


def _experts(result: AnalysisResult) -> list[str]:
    """Whether the experts' change concentrated in few of them, and which moved most."""
    summary = result.experts
    if summary is None or not summary.layers or not math.isfinite(summary.top_share):
        return []
    k, experts = summary.top_k, summary.num_experts
    share, uniform = summary.top_share, summary.uniform_share
    concentrated = share >= EXPERT_CONCENTRATED * uniform
    out = [f"{len(summary.layers)} MoE layers with {experts} experts each were adapted "
           f"({', '.join(summary.parameters)}). In the average layer its top {k} "
           f"expert{'s hold' if k > 1 else ' holds'} {pct(share, 0)} of the experts' change (sum of "
           f"‖ΔW_e‖_F), against {pct(uniform, 0)} had every expert moved alike: "
           + ("the change concentrated in a few experts." if concentrated else
              "the change is spread across the experts, none did all the work.")]
    totals = summary.fro_by_expert
    best = max(range(len(totals)), key=lambda e: totals[e])
    mean = fmean(totals)
    if mean > 0:
        out.append(f"Across layers expert {best} moved most (summed ‖ΔW_e‖_F {fmt(totals[best])}, "
                   f"{totals[best] / mean:.1f}× the mean expert).")
    return out


def narrate_sections(result: AnalysisResult,
                     settings: AnalysisSettings | None = None) -> dict[str, list[str]]:
    """The narrative by report section (keys of SECTION_TITLES), empty sections left out; the
    limits it reads to (top neurons) are `settings`' (None: the result's own lists)."""
    sections = {
        "health": _health(result), "summary": _summary(result), "layers": _layers(result),
        "qkvo": _qkvo(result), "experts": _experts(result), "rank": _rank(result),
        "histogram": _histogram(result), "neurons": _neurons(result, settings), "base": _base(result),
        "training": _training(result),
    }
    return {k: v for k, v in sections.items() if v}


def narrate(result: AnalysisResult, settings: AnalysisSettings | None = None) -> list[str]:
    """Plain-English sentences derived from the result's numbers, most important first."""
    return [s for sentences in narrate_sections(result, settings).values() for s in sentences]


def narrate_layer(result: AnalysisResult, layer: int | None) -> list[str]:
    """What one layer's profile says: its rank among layers, its largest module, its spectra."""
    modules = [m for m in result.modules if m.layer == layer and math.isfinite(m.fro)]
    if not modules:
        return []
    out: list[str] = []
    profiles = sorted((l for l in result.layers if math.isfinite(l.fro_sum)),
                      key=lambda l: -l.fro_sum)
    mine = next((l for l in profiles if l.layer == layer), None)
    if mine is not None and len(profiles) >= 2:
        place = profiles.index(mine) + 1
        least = profiles[-1].fro_sum
        standing = ("the most-changed" if place == 1 else "the least-changed"
                    if place == len(profiles) else f"number {place} by size of change")
        versus = (f", {mine.fro_sum / least:.1f}× the least-changed layer" if least > 0 and
                  place < len(profiles) else "")
        out.append(f"Layer {layer} is {standing} of {len(profiles)} layers (summed ‖ΔW‖_F "
                   f"{fmt(mine.fro_sum)}{versus}).")
    total = sum(m.fro for m in modules)
    top = max(modules, key=lambda m: m.fro)
    if len(modules) >= 2 and total > 0:
        scope = "the layer's summed ‖ΔW‖_F" if layer is not None else "the change outside the layers"
        out.append(f"Its largest change is in {top.component} ({pct(top.fro / total, 0)} of "
                   f"{scope}).")
    lora = [m for m in modules if m.kind in ("lora", "embedding") and m.rank > 0
            and m.singular_values and math.isfinite(m.effective_rank)]
    if lora:
        util = fmean(m.rank_utilisation for m in lora)
        first_share = {m.component: m.singular_values[0] ** 2 / sum(s * s for s in m.singular_values)
                       for m in lora if sum(s * s for s in m.singular_values) > 0}
        if first_share:
            peaked = max(first_share, key=first_share.get)
            out.append(f"Its modules use {pct(util, 0)} of their rank on average; the most "
                       f"concentrated is {peaked}, whose strongest direction holds "
                       f"{pct(first_share[peaked], 0)} of its change's energy.")
    return out
