"""analyze_adapter: an adapter directory (and optionally its base) in, an AnalysisResult out.

Modules are read and analysed one at a time (progress bar on stderr); fused projections are split
into parts; then the adapter-wide aggregates: layers, groups, top neurons, the value histogram.
"""
from __future__ import annotations

import heapq
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tunelens.settings import Settings

from . import lora_math
from . import module_metrics as M
from .loading import (AdapterContents, AnalysisInputError, BaseModel, ExpertModule, LoraModule,
                      open_adapter)
from .naming import (EXPERT_CHECKPOINT_PATHS, ModulePath, expert_parameter_parts, role_of,
                     fused_split, module_group, parse_module_path)
from .result import (AdapterInfo, AnalysisResult, ExpertLayer, ExpertSummary, Histogram,
                     LayerProfile, Summary, TopNeuron)

# Experts per layer whose share of the layer's expert change the summary reports (an eighth of
# them: 16 of 128, 1 of 8).
EXPERT_TOP_FRACTION = 8

__all__ = ["analyze_adapter", "AnalysisInputError"]


@dataclass
class _Part:
    """One unit of analysis: a whole module or one row range of a fused one."""

    name: str
    rows: slice | torch.Tensor | None  # rows of the module's ΔW, None = all
    shape: tuple[int, int]


def analyze_adapter(adapter: str | Path, base: str | Path | None = None, *,
                    config: Settings | None = None, progress: bool = True) -> AnalysisResult:
    """Analyse a PEFT LoRA adapter (or an MLflow model dir with peft/) against an optional base."""
    settings = M.analysis_settings(config)
    # Every torch call under the analysis's threads, the file checks and histogram included: on a
    # busy 2-core machine torch.aminmax over 2 threads took 60 times as long as over one.
    with torch.no_grad(), M.torch_threads(settings), M.reused_allocations():
        return _analyze(adapter, base, settings, progress)


def _analyze(adapter: str | Path, base: str | Path | None, settings,
             progress: bool) -> AnalysisResult:
    device = M.torch_device(settings)
    contents = open_adapter(adapter)
    base_model = BaseModel(base) if base else None
    warnings, needs_base = list(contents.warnings), []
    if base_model is not None:
        _check_base_shapes(contents, base_model)
    plans = _plan_parts(contents, base_model, needs_base)
    expert_plans = {e.name: _expert_parts(e, contents, base_model) for e in contents.experts}
    plans.update({f"{e.module}.{i}.{part}": [_Part(f"{e.module}.{i}.{part}", None,
                                                  (len(rows), e.shape[1]))]
                  for e in contents.experts for part, rows in expert_plans[e.name]
                  for i in range(e.num_experts)})

    if base_model is not None:  # full saved weights become dense ΔW parts too
        plans.update({s.name: [_Part(_module_of(s.name), None, tuple(s.shape))]
                      for s in contents.saved if len(s.shape) == 2})
    total_entries = sum(p.shape[0] * p.shape[1] for parts in plans.values() for p in parts)
    exact_histogram = total_entries <= settings.histogram_exact_max_entries
    generator = torch.Generator().manual_seed(settings.seed)
    quotas = _sample_quotas(plans, total_entries, settings) if not exact_histogram else {}

    samples: list[torch.Tensor] = []
    analyses = _analyse_all(contents, plans, expert_plans, base_model, settings, device, warnings,
                            lambda a: _keep_entries(a, exact_histogram, quotas, samples, generator),
                            progress)
    _note_missing_base(contents, base_model, needs_base)
    finite = [a for a in analyses if a.metrics.nonfinite == 0]
    for a in analyses:
        if a.metrics.nonfinite:
            warnings.append(f"{a.metrics.name}: {a.metrics.nonfinite} NaN/Inf values in its "
                            "tensors; left out of every aggregate")
    result = AnalysisResult(
        adapter=_adapter_info(contents),
        summary=_summary(contents, base_model, analyses, finite,
                         module_fros(finite, _sources(plans, contents))),
        modules=[a.metrics for a in analyses],
        layers=layer_profiles(finite),
        top_neurons=top_neurons(finite, settings.top_neurons),
        histogram=value_histogram(finite, exact_histogram, samples, settings),
        heatmaps=[a.heatmap for a in finite if a.heatmap is not None],
        base_model=str(base_model.path) if base_model else None,
        needs_base=needs_base, warnings=warnings, experts=_experts(finite))
    if contents.experts and base_model is not None:
        warnings.append("amplification and intruder dimensions are not computed per expert (each "
                        "needs a dense SVD of every expert's base weight); ‖ΔW‖/‖W‖ is")
    return result


def _analyse_all(contents: AdapterContents, plans, expert_plans, base_model, settings, device,
                 warnings: list[str], keep, progress: bool) -> list[M.ModuleAnalysis]:
    """Every module, expert parameter and saved weight analysed in turn (a progress bar on
    stderr); `keep` takes each analysis's entries for the histogram as it comes."""
    analyses: list[M.ModuleAnalysis] = []
    work = len(contents.modules) + len(contents.saved) + len(contents.experts)
    bar = tqdm(total=work, desc="tunelens analyze", unit="module", file=sys.stderr,
               disable=not progress, leave=False)
    with bar:
        for module in contents.modules:
            for analysis in _analyse_module(module, plans[module.name], contents, base_model,
                                            settings, device, warnings):
                analyses.append(analysis)
                keep(analysis)
            bar.update()
        for expert_module in contents.experts:
            for analysis in _analyse_experts(expert_module, expert_plans[expert_module.name],
                                             contents, base_model, settings, device, warnings):
                analyses.append(analysis)
                keep(analysis)
            bar.update()
        for saved in contents.saved:
            analysis = _analyse_saved(saved, contents, base_model, settings, device, warnings)
            if analysis is not None:
                analyses.append(analysis)
                keep(analysis)
            bar.update()
    return analyses


def _check_base_shapes(contents: AdapterContents, base_model: BaseModel) -> None:
    """Fail on a mismatching base before any work starts, from the headers alone."""
    for module in contents.modules:
        base_model.check(f"{module.name}.weight", module.shape, module.fan_in_fan_out)
    for experts in contents.experts:
        for part, rows in _expert_parts(experts, contents, base_model):
            _expert_base_keys(base_model, experts, part, rows)
    for saved in contents.saved:
        if len(saved.shape) == 2:
            base_model.check(saved.name, tuple(saved.shape), False)


def _plan_parts(contents: AdapterContents, base_model: BaseModel | None,
                needs_base: list[str]) -> dict[str, list[_Part]]:
    """Split fused projections; a Phi-3 qkv_proj without the base config stays whole."""
    base_config = base_model.attention_config if base_model else None
    plans, unsplit = {}, []
    for module in contents.modules:
        m, n = module.shape
        try:
            split = fused_split(module.name, m, base_config) if module.kind == "lora" else None
        except ValueError as exc:
            raise AnalysisInputError(str(exc)) from None
        if split is None or split.needs_base_config:
            if split is not None:
                unsplit.append(module.name)
            plans[module.name] = [_Part(module.name, None, (m, n))]
        else:
            plans[module.name] = [_Part(f"{module.name}.{suffix}", _row_index(rows), (len(rows), n))
                                  for suffix, rows in split.parts]
    if unsplit:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in unsplit})
        needs_base.append(f"Q/K/V split of {len(unsplit)} fused {'/'.join(leaves)} modules (their "
                          "per-head layout comes from the base config.json; analysed unsplit)")
    return plans


def _row_index(rows: range | list[int]) -> slice | torch.Tensor:
    """A contiguous range as a slice (a view), per-head rows as an index tensor."""
    if isinstance(rows, range) and rows.step == 1:
        return slice(rows.start, rows.stop)
    return torch.tensor(list(rows), dtype=torch.long)


def _expert_parts(module: ExpertModule, contents: AdapterContents,
                  base_model: BaseModel | None) -> list[tuple[str, range]]:
    """(part name, rows of each expert's ΔW) for an experts parameter: gate_up_proj -> gate_proj
    and up_proj (halves, or interleaved rows for GPT-OSS), any other parameter whole."""
    model_type = base_model.config.get("model_type") if base_model else None
    if model_type is None and "gpt-oss" in (contents.config.base_model_name_or_path or "").lower():
        model_type = "gpt_oss"
    parts = expert_parameter_parts(module.parameter, model_type)
    out = module.shape[0]
    if len(parts) == 1:
        return [(parts[0][0], range(out))]
    if out % len(parts):
        raise AnalysisInputError(f"{module.name} has {out} output rows per expert, not divisible "
                                 f"into {'/'.join(p for p, _ in parts)}")
    size = out // len(parts)
    if parts[0][1] == "interleaved":
        return [(part, range(i, out, len(parts))) for i, (part, _) in enumerate(parts)]
    return [(part, range(i * size, (i + 1) * size)) for i, (part, _) in enumerate(parts)]


def _analyse_experts(module: ExpertModule, parts, contents, base_model, settings, device,
                     warnings):
    """Every expert of every part of one adapted experts parameter, each part as one batch."""
    left, right = module.factors(contents.tensors, device)
    bad = 0 if module.factors_finite else M.count_nonfinite(left, right)
    right_root = None if bad else lora_math.gram_root(right @ right.transpose(-2, -1))
    component = parse_module_path(module.module)
    for part, rows in parts:
        where = ModulePath(component.layer, f"{component.component}.{part}",
                           module_group(f"{component.component}.{part}"))
        names = [f"{module.module}.{e}.{part}" for e in range(module.num_experts)]
        if bad:
            for e, name in enumerate(names):
                analysis = M.nonfinite_module(name, where, [len(rows), module.shape[1]],
                                              module.rank, module.scale, "lora", bad)
                analysis.metrics.expert = e
                yield analysis
            continue
        base = _expert_base(base_model, module, part, rows, device, warnings)
        yield from M.factored_experts(names, where, left[:, _row_index(rows)], right,
                                      module.scale, module.rank, settings, base, right_root)


def _expert_base_keys(base_model: BaseModel, module: ExpertModule, part: str, rows: range):
    """Where the base keeps one part of every expert: (the fused 3-D key, None), or (None, one
    key per expert) for a checkpoint with a Linear per expert; (None, None) when it has neither.
    Shapes are checked here, from the headers."""
    stacked = (module.num_experts, *module.shape)
    key = base_model.find(module.name)
    if key is not None:
        if tuple(base_model.shape(key)) not in (stacked, (stacked[0], stacked[2], stacked[1])):
            raise AnalysisInputError(f"base weight {key} has shape {base_model.shape(key)} but the "
                                     f"adapter needs {list(stacked)} (experts, out, in): is "
                                     f"{base_model.path} the model this adapter was trained on?")
        return key, None
    layer = module.module[:-len(parse_module_path(module.module).component)]
    for template in EXPERT_CHECKPOINT_PATHS.get(part, ()):
        keys = [base_model.find(f"{layer}{template.format(e=e)}.weight")
                for e in range(module.num_experts)]
        if all(keys):
            for k in keys:
                if base_model.shape(k) != [len(rows), module.shape[1]]:
                    raise AnalysisInputError(
                        f"base weight {k} has shape {base_model.shape(k)} but the adapter needs "
                        f"{[len(rows), module.shape[1]]}: is {base_model.path} the model this "
                        "adapter was trained on?")
            return None, keys
    return None, None


def _expert_base(base_model: BaseModel | None, module: ExpertModule, part: str, rows: range,
                 device, warnings: list[str]) -> torch.Tensor | None:
    """One part of every expert's base weight as (E, rows, in), or None without a base."""
    if base_model is None:
        return None
    fused, per_expert = _expert_base_keys(base_model, module, part, rows)
    if fused is not None:
        tensor = base_model.tensor(fused).to(device=device, dtype=torch.float64)
        if tuple(tensor.shape[1:]) != module.shape:
            tensor = tensor.transpose(1, 2)
        return tensor[:, _row_index(rows)]
    if per_expert is not None:
        return torch.stack([base_model.tensor(k).to(device=device, dtype=torch.float64)
                            for k in per_expert])
    warnings.append(f"{module.module}: the base model has no {part} weights for its experts; base "
                    "metrics skipped for them")
    return None


def _experts(finite: list[M.ModuleAnalysis]) -> ExpertSummary | None:
    """Σ‖ΔW_e‖_F per layer × expert, per parameter and per expert, and how concentrated it is."""
    records = [a.metrics for a in finite if a.metrics.expert is not None]
    if not records:
        return None
    count = max(m.expert for m in records) + 1
    by_layer: dict[int, list[float]] = {}
    by_parameter: dict[str, float] = defaultdict(float)
    for m in records:
        row = by_layer.setdefault(m.layer if m.layer is not None else -1, [0.0] * count)
        row[m.expert] += m.fro
        by_parameter[m.component.rsplit(".", 1)[-1]] += m.fro
    top_k = max(1, math.ceil(count / EXPERT_TOP_FRACTION))
    layers = []
    for layer in sorted(by_layer):
        row = by_layer[layer]
        top = sorted(range(count), key=lambda e: -row[e])[:top_k]
        total = sum(row)
        layers.append(ExpertLayer(layer, row, top,
                                  sum(row[e] for e in top) / total if total > 0 else math.nan))
    shares = [p.top_share for p in layers if math.isfinite(p.top_share)]
    return ExpertSummary(
        num_experts=count, parameters=list(by_parameter), layers=layers,
        fro_by_parameter=dict(by_parameter),
        fro_by_expert=[sum(row[e] for row in by_layer.values()) for e in range(count)],
        top_k=top_k, top_share=sum(shares) / len(shares) if shares else math.nan,
        uniform_share=top_k / count)


def _sample_quotas(plans, total_entries: int, settings) -> dict[str, int]:
    """Entries to sample per part, proportional to its size (stratified: largest remainders)."""
    parts = [p for ps in plans.values() for p in ps]
    if not parts or total_entries == 0:
        return {}
    wanted = [settings.histogram_sample_entries * p.shape[0] * p.shape[1] / total_entries
              for p in parts]
    quotas = [math.floor(w) for w in wanted]
    by_remainder = sorted(range(len(parts)), key=lambda i: quotas[i] - wanted[i])
    for i in by_remainder[:settings.histogram_sample_entries - sum(quotas)]:
        quotas[i] += 1
    return {p.name: q for p, q in zip(parts, quotas)}


def _keep_entries(analysis, exact: bool, quotas, samples, generator) -> None:
    """Exact histogram: keep the factors for the second pass. Sampled: draw this part's share now."""
    if analysis.entries is None or analysis.metrics.nonfinite:
        return
    if not exact:
        count = quotas.get(analysis.metrics.name, 0)
        if count:
            samples.append(analysis.entries.sample(count, generator).cpu())
        analysis.entries = _Population(analysis.entries.numel)


@dataclass
class _Population:
    """A part's entry count once its sample is drawn (its factors are released)."""

    numel: int


def _analyse_module(module: LoraModule, parts: list[_Part], contents, base_model, settings,
                    device, warnings):
    left, right = module.factors(contents.tensors, device)
    bias = module.optional(contents.tensors, "bias", device)
    magnitude = module.optional(contents.tensors, "magnitude", device)
    factors = () if module.factors_finite else (left, right)
    bad = M.count_nonfinite(*factors, bias, magnitude)
    base = _base_weight(base_model, module.name, module.shape, module.fan_in_fan_out, device,
                        warnings)
    dense = None
    if magnitude is not None and base is not None:
        dense = lora_math.dora_delta(base, left, right, module.scale, magnitude) if not bad else None
    for part in parts:
        rows = slice(None) if part.rows is None else part.rows
        where = parse_module_path(part.name)
        kind = "dora" if magnitude is not None and base is not None else module.kind
        if bad:
            yield M.nonfinite_module(part.name, where, list(part.shape), module.rank, module.scale,
                                     kind, bad)
            continue
        part_base = base[rows] if base is not None else None
        if dense is not None:
            analysis = M.dense_module(part.name, where, dense[rows], module.rank, "dora", settings,
                                      part_base, module.scale)
        else:
            analysis = M.factored_module(part.name, where, left[rows], right, module.scale,
                                         module.rank, module.kind, settings, part_base)
        if bias is not None:
            analysis.metrics.bias_delta_norm = abs(module.scale) * float(bias[rows].norm())
        yield analysis


def _analyse_saved(saved, contents, base_model, settings, device, warnings):
    """A full saved weight (modules_to_save): a dense ΔW = saved − base when the base is given."""
    if base_model is None or len(saved.shape) != 2:
        return None
    module_name = _module_of(saved.name)
    base = _base_weight(base_model, module_name, tuple(saved.shape), False, device, warnings)
    if base is None:
        return None
    tuned = contents.tensors.get(saved.key).to(device=device, dtype=torch.float64)
    where = parse_module_path(module_name)
    bad = M.count_nonfinite(tuned)
    if bad:
        return M.nonfinite_module(module_name, where, saved.shape, min(saved.shape), 1.0, "dense",
                                  bad)
    delta = tuned - base
    return M.dense_module(module_name, where, delta, min(saved.shape), "dense", settings, base)


def _module_of(parameter: str) -> str:
    """`lm_head.weight` -> `lm_head`."""
    return parameter[:-len(".weight")] if parameter.endswith(".weight") else parameter


def _base_weight(base_model, module_name, shape, transposed, device, warnings):
    if base_model is None:
        return None
    weight = base_model.weight(f"{module_name}.weight", tuple(shape), transposed, device)
    if weight is None:
        warnings.append(f"{module_name}: the base model has no {module_name}.weight; base "
                        "metrics skipped for it")
    return weight


def _note_missing_base(contents: AdapterContents, base_model, needs_base: list[str]) -> None:
    if base_model is not None:
        return
    needs_base.append("relative change ‖ΔW‖/‖W‖, amplification factor and intruder dimensions")
    dora = [m.name for m in contents.modules if "magnitude" in m.keys]
    if dora:
        needs_base.append(f"DoRA's effective ΔW for {len(dora)} modules (their LoRA direction "
                          "s·B·A is analysed; the magnitude vector needs the base weights)")
    weights = [s.name for s in contents.saved if len(s.shape) == 2]
    if weights:
        needs_base.append(f"ΔW of the full weights saved in the adapter (modules_to_save): "
                          f"{', '.join(weights[:5])}{' …' if len(weights) > 5 else ''}")


def _adapter_info(contents: AdapterContents) -> AdapterInfo:
    c = contents.config
    return AdapterInfo(peft_type=c.peft_type, r=c.r, lora_alpha=c.lora_alpha,
                       use_rslora=c.use_rslora, use_dora=c.use_dora,
                       target_modules=c.target_modules,
                       base_model_name_or_path=c.base_model_name_or_path, task_type=c.task_type,
                       fan_in_fan_out=c.fan_in_fan_out, bias=c.bias,
                       modules_to_save=c.modules_to_save, rank_pattern=c.rank_pattern,
                       alpha_pattern=c.alpha_pattern, format=c.format, scale=c.scale)


def layer_profiles(finite: list[M.ModuleAnalysis]) -> list[LayerProfile]:
    """S_ℓ = Σ_components ‖ΔW‖_F per layer, with its components, groups and Q/K/V/O."""
    by_layer: dict[int, LayerProfile] = {}
    for a in finite:
        m = a.metrics
        if m.layer is None:
            continue
        profile = by_layer.setdefault(m.layer, LayerProfile(m.layer, 0.0, {}, {}))
        profile.fro_sum += m.fro
        profile.components[m.component] = profile.components.get(m.component, 0.0) + m.fro
        profile.groups[m.group] = profile.groups.get(m.group, 0.0) + m.fro
        role = role_of(m)
        if role:
            profile.roles[role] = profile.roles.get(role, 0.0) + m.fro
    return [by_layer[k] for k in sorted(by_layer)]


def _sources(plans: dict[str, list[_Part]], contents: AdapterContents) -> dict[str, str]:
    """Each analysed part's module: a fused projection's parts (.q/.k/.v, .gate/.up) map to the
    projection, an expert's gate/up parts to that expert's parameter; anything else to itself."""
    sources = {part.name: key for key, parts in plans.items() for part in parts}
    for e in contents.experts:
        for i in range(e.num_experts):
            sources.update({f"{e.module}.{i}.{part}": f"{e.name}.{i}"
                            for part, _ in expert_parameter_parts(e.parameter, None)})
    return sources


def module_fros(finite: list[M.ModuleAnalysis], sources: dict[str, str]) -> list[float]:
    """‖ΔW‖_F per module, a module split into parts counted once: sqrt(Σ parts' ‖ΔW‖_F²)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for a in finite:
        parts[sources.get(a.metrics.name, a.metrics.name)].append(a.metrics.fro)
    return [lora_math.combined_fro(fros) for fros in parts.values()]


def mean_and_max(values: list[float]) -> tuple[float, float]:
    """(mean, max) of `values`; (NaN, NaN) when there are none."""
    if not values:
        return math.nan, math.nan
    return sum(values) / len(values), max(values)


def _summary(contents, base_model, analyses, finite, module_norms: list[float]) -> Summary:
    layers = layer_profiles(finite)
    mean_module, max_module = mean_and_max(module_norms)
    mean_layer, max_layer = mean_and_max([p.fro_sum for p in layers])
    group_fro: dict[str, float] = defaultdict(float)
    for a in finite:
        group_fro[a.metrics.group] += a.metrics.fro
    utilisation = [a.metrics.rank_utilisation for a in finite]
    base_params = base_model.params if base_model else None
    return Summary(
        trainable_params=contents.trainable_params, base_params=base_params,
        trainable_share=contents.trainable_params / base_params if base_params else None,
        layers_modified=sorted({a.metrics.layer for a in analyses if a.metrics.layer is not None}),
        num_layers=base_model.num_layers if base_model else None,
        mean_module_fro=mean_module, max_module_fro=max_module,
        mean_layer_fro_sum=mean_layer, max_layer_fro_sum=max_layer,
        group_fro=dict(group_fro),
        mean_rank_utilisation=sum(utilisation) / len(utilisation) if utilisation else math.nan,
        nonfinite_modules=[a.metrics.name for a in analyses if a.metrics.nonfinite])


def top_neurons(finite: list[M.ModuleAnalysis], k: int) -> list[TopNeuron]:
    candidates = ((shift, a.metrics, index) for a in finite for index, shift in a.top_rows)
    best = heapq.nlargest(k, candidates, key=lambda c: c[0])
    return [TopNeuron(m.layer, m.component, index, shift, m.name) for shift, m, index in best]


def value_histogram(finite: list[M.ModuleAnalysis], exact: bool, samples: list[torch.Tensor],
               settings) -> Histogram:
    """Adapter-wide value distribution: mean/std/min/max exact; counts exact or from the sample."""
    count = sum(a.entries.numel for a in finite if a.entries is not None)
    if count == 0:
        return Histogram(math.nan, math.nan, math.nan, math.nan, [], [], exact, math.nan,
                         total_entries=0)
    total = sum(a.entry_sum for a in finite)
    squares = sum(a.metrics.fro ** 2 for a in finite)
    mean = total / count
    std = math.sqrt(max(squares / count - mean * mean, 0.0))
    low = min(a.metrics.min for a in finite)
    high = max(a.metrics.max for a in finite)
    bins = settings.histogram_bins
    if exact:
        counts = torch.zeros(bins, dtype=torch.int64)
        moments = torch.zeros(3, dtype=torch.float64)
        for a in finite:
            for tile in a.entries.tiles():
                # clamp: a tile's rounding may differ from the extremes' by an ulp
                tile = tile.reshape(-1).cpu().clamp(low, high)
                counts += _bin_counts(tile, low, high, bins)
                moments += _central_moments(tile, mean, std)
        within, third, fourth = moments.tolist()
        share, share_error, sample_size, n = within / count, None, None, count
    else:
        values = torch.cat(samples) if samples else torch.zeros(0, dtype=torch.float64)
        n = values.numel()
        counts = _bin_counts(values, low, high, bins)
        within, third, fourth = _central_moments(values, mean, std).tolist()
        share = within / n if n else math.nan
        # Simple-random-sampling error; the proportional (stratified) draw can only be tighter.
        share_error = math.sqrt(share * (1 - share) / n) if n else None
        sample_size = n
    skewness = third / n / std ** 3 if std > 0 and n else None
    kurtosis = fourth / n / std ** 4 - 3 if std > 0 and n else None
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist()
    return Histogram(mean=mean, std=std, min=low, max=high, bin_edges=edges,
                     counts=[int(c) for c in counts], exact=exact, share_within_one_std=share,
                     sample_size=sample_size, share_within_one_std_error=share_error,
                     skewness=skewness, excess_kurtosis=kurtosis, total_entries=count)


def _bin_counts(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """numpy.histogram's counts on `bins` equal bins over [low, high], the last bin closed."""
    if high <= low:
        counts = torch.zeros(bins, dtype=torch.int64)
        counts[0] = values.numel()
        return counts
    return torch.histogram(values, bins, range=(low, high))[0].round().long()


def _central_moments(values: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """[#{|x−μ| <= σ}, Σ(x−μ)³, Σ(x−μ)⁴] over `values`."""
    centred = values - mean
    squared = centred * centred
    return torch.stack([(squared <= std * std).sum().to(torch.float64), (squared * centred).sum(),
                        (squared * squared).sum()])
