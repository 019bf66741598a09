"""Comparing adapters of one base (domains, learning rates, ranks): profiles, shares, subspaces.

Each input is a LoRA adapter directory (analysed here) or an analysis.json (or the folder holding
one). Module-by-module subspace overlap needs the factors, so it covers the adapter inputs only.
report/compare_page.py writes it: compare.json and one self-contained compare.html.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from tunelens.settings import Settings

from .analysis import analyze_adapter
from .checkpoints import column_space, subspace_similarity
from .loading import (AdapterContents, AnalysisInputError, LoraModule, find_adapter_dir,
                      open_adapter)
from . import lora_math
from .module_metrics import analysis_settings, top_rows, torch_threads
from .naming import parse_module_path
from .retune import GROUPS, PLANS, rank_layers
from .result import AnalysisResult

COMPARE_SCHEMA = "tunelens.compare/1"


@dataclass
class Compared:
    """One input: its label, the analysis, and its adapter directory when factors are available."""

    label: str
    result: AnalysisResult
    adapter_dir: Path | None


@dataclass
class SubspaceOverlap:
    """Two adapters' ΔW column spaces, module by module: φ = ‖U_aᵀU_b‖_F² / min(r_a, r_b)."""

    a: str
    b: str
    modules: dict[str, float]  # module name -> φ
    mean: float | None  # over the modules where φ is defined
    shared_modules: int


@dataclass
class NeuronOverlap:
    """The top shifted neurons (rows i of ΔW by ‖ΔW_i,:‖₂) two inputs share: overall among each
    one's top_neurons (a neuron = module and row), and per module among its top k rows."""

    a: str
    b: str
    k: int  # analysis.top_neurons: the size of each top list
    shared: int  # neurons in both inputs' overall top lists
    share: float | None  # shared / the shorter list's length
    modules: dict[str, float] = field(default_factory=dict)  # module -> |top_a ∩ top_b| / k_module
    mean: float | None = None  # over `modules`; needs both inputs' factors


@dataclass
class DepthProfile:
    """A full fine-tune's change by relative depth, so models of different sizes line up:
    per layer ℓ of L, depth ℓ / L and relative change sqrt(Σ‖ΔW‖_F²) / sqrt(Σ‖W‖_F²) over the
    layer's tensors."""

    label: str
    num_layers: int
    depth: list[float]
    relative_change: list[float | None]


@dataclass
class TopLayerNorms:
    """The layer-targeting check of one group (attention or MLP): the first input's (the full
    run's) top layers by S_ℓ within the group, as the ensemble re-tune targets them, and each
    input's mean S_ℓ within the group over those of them it adapted (a soloist: its one layer)."""

    group: str
    layers: list[int]  # the first input's top layers, most changed first
    mean_norm: dict[str, float | None]  # label -> mean over the layers it adapted among them
    layers_adapted: dict[str, int]  # label -> how many of them it adapted


@dataclass
class Comparison:
    """compare.json: per input the profile and shares; per pair of adapters the subspace overlaps."""

    labels: list[str]
    base_model: str | None
    layers: list[int]
    profiles: dict[str, list[float | None]]  # label -> S_ℓ per entry of `layers`
    group_shares: dict[str, dict[str, float]]  # label -> group -> share of Σ‖ΔW‖_F
    overlaps: list[SubspaceOverlap] = field(default_factory=list)
    neuron_overlaps: list[NeuronOverlap] = field(default_factory=list)
    depth_profiles: list[DepthProfile] = field(default_factory=list)  # full fine-tune diffs
    top_layer_norms: list[TopLayerNorms] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema: str = COMPARE_SCHEMA


def input_kind(path: str | Path) -> str:
    """"adapter" or "analysis" (an analysis.json or a folder holding one); one line if neither."""
    path = Path(path)
    if not path.exists():
        raise AnalysisInputError(f"{path} does not exist")
    if find_adapter_dir(path) is not None:
        return "adapter"
    if (path if path.is_file() else path / "analysis.json").is_file():
        return "analysis"
    raise AnalysisInputError(f"{path} is neither a LoRA adapter directory nor an analysis.json")


def load_input(path: str | Path, base: str | Path | None, config: Settings | None,
               progress: bool) -> Compared:
    """An adapter directory (analysed now) or an analysis.json / folder holding one."""
    path = Path(path)
    if input_kind(path) == "analysis":
        json_path = path if path.is_file() else path / "analysis.json"
        try:
            result = AnalysisResult.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise AnalysisInputError(f"{json_path} is not a tunelens analysis.json ({exc})") from None
        return Compared(_label(path), result, None)
    result = analyze_adapter(path, base, config=config, progress=progress)
    return Compared(_label(path), result, find_adapter_dir(path))


def _label(path: Path) -> str:
    if path.name == "analysis.json":
        path = path.parent
    return path.name if path.name not in ("peft", "") else path.parent.name


def compare(paths: list[str | Path], base: str | Path | None = None, *, config: Settings | None = None,
            progress: bool = True) -> Comparison:
    """Compare two or more adapters or analysis results of the same base model."""
    if len(paths) < 2:
        raise AnalysisInputError("compare needs at least two adapters or analysis.json files")
    for path in paths:  # every input checked before the first is analysed
        input_kind(path)
    inputs = [load_input(p, base, config, progress) for p in paths]
    labels = _unique_labels([c.label for c in inputs])
    for c, label in zip(inputs, labels):
        c.label = label
    bases = {c.label: c.result.adapter.base_model_name_or_path for c in inputs}
    known = {b for b in bases.values() if b}
    full = all(c.result.full_diff is not None for c in inputs)
    if len(known) > 1 and not full:  # full fine-tunes of different sizes line up by depth
        first, *_ = inputs
        other = next(c for c in inputs if bases[c.label] and bases[c.label] != bases[first.label])
        raise AnalysisInputError(f"not the same base model: {first.label} was trained on "
                                 f"{bases[first.label]!r} but {other.label} on {bases[other.label]!r}")
    layers = sorted({p.layer for c in inputs for p in c.result.layers})
    profiles = {c.label: [next((p.fro_sum for p in c.result.layers if p.layer == layer), None)
                          for layer in layers] for c in inputs}
    shares = {c.label: _group_shares(c.result) for c in inputs}
    comparison = Comparison(labels, next(iter(known), None) if len(known) == 1 else None,
                            layers, profiles, shares)
    comparison.depth_profiles = [depth_profile(c) for c in inputs if c.result.full_diff]
    comparison.top_layer_norms = [norms for group in GROUPS
                                  if (norms := top_layer_norms(inputs, group)) is not None]
    adapters = [c for c in inputs if c.adapter_dir is not None]
    if len(adapters) < len(inputs):
        comparison.warnings.append("subspace overlap and the per-module overlap of top neurons "
                                   "need the adapters' factors: analysis.json inputs are left out "
                                   "of them")
    settings = analysis_settings(config)
    with torch.no_grad(), torch_threads(settings):
        for a, b in combinations(inputs, 2):
            both = a.adapter_dir is not None and b.adapter_dir is not None
            comparison.neuron_overlaps.append(neuron_overlap(a, b, settings.top_neurons, both))
            if both:
                comparison.overlaps.append(module_overlaps(a, b))
    return comparison


def top_layer_norms(inputs: list[Compared], group: str) -> TopLayerNorms | None:
    """The first input's top PLANS["ensemble"] layers by S_ℓ within `group`, and every input's
    mean S_ℓ within the group over those layers it adapted; None when the first lacks the group."""
    top = [layer for layer, _ in rank_layers(inputs[0].result, group)[:PLANS["ensemble"]]]
    if not top:
        return None
    norms, counts = {}, {}
    for c in inputs:
        values = [p.groups[group] for p in c.result.layers
                  if p.layer in top and p.groups.get(group)]
        norms[c.label] = sum(values) / len(values) if values else None
        counts[c.label] = len(values)
    return TopLayerNorms(group, top, norms, counts)


def depth_profile(compared: Compared) -> DepthProfile:
    """Relative change per layer of a full fine-tune diff, at relative depth ℓ / L."""
    changed: dict[int, float] = {}
    base: dict[int, float] = {}
    for tensor in compared.result.full_diff.tensors:
        layer = parse_module_path(tensor.name).layer
        if layer is not None:
            changed[layer] = changed.get(layer, 0.0) + tensor.fro ** 2
            base[layer] = base.get(layer, 0.0) + tensor.base_fro ** 2
    count = compared.result.summary.num_layers or (max(changed, default=-1) + 1)
    layers = sorted(changed)
    return DepthProfile(compared.label, count, [layer / count for layer in layers],
                        [math.sqrt(changed[layer] / base[layer]) if base[layer] > 0 else None
                         for layer in layers])


def top_set_overlap(first: set, second: set) -> float | None:
    """|A ∩ B| / min(|A|, |B|): the share of the shorter top list the other one holds too."""
    size = min(len(first), len(second))
    return len(first & second) / size if size else None


def neuron_overlap(a: Compared, b: Compared, k: int, per_module: bool) -> NeuronOverlap:
    """The top shifted neurons two inputs share, overall and (with both factors) per module."""
    top_a = {(t.module, t.index) for t in a.result.top_neurons[:k]}
    top_b = {(t.module, t.index) for t in b.result.top_neurons[:k]}
    overlap = NeuronOverlap(a=a.label, b=b.label, k=k, shared=len(top_a & top_b),
                            share=top_set_overlap(top_a, top_b))
    if per_module:
        first, second = open_adapter(a.adapter_dir), open_adapter(b.adapter_dir)
        theirs = {m.name: m for m in second.modules}
        for module in first.modules:
            other = theirs.get(module.name)
            if other is not None and other.shape == module.shape:
                overlap.modules[module.name] = top_set_overlap(
                    _top_rows(module, first, k), _top_rows(other, second, k))
        values = [v for v in overlap.modules.values() if v is not None]
        overlap.mean = sum(values) / len(values) if values else None
    return overlap


def _top_rows(module: LoraModule, contents: AdapterContents, k: int) -> set[int]:
    """The k rows of the module's ΔW with the largest ‖ΔW_i,:‖₂."""
    left, right = module.factors(contents.tensors, torch.device("cpu"))
    return {index for index, _ in top_rows(lora_math.row_norms(left, right, module.scale), k)}


def _unique_labels(labels: list[str]) -> list[str]:
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]


def _group_shares(result: AnalysisResult) -> dict[str, float]:
    """Each group's share of Σ‖ΔW‖_F (attention vs MLP)."""
    total = sum(v for v in result.summary.group_fro.values() if math.isfinite(v))
    return {g: v / total for g, v in result.summary.group_fro.items()} if total > 0 else {}


def module_overlaps(a: Compared, b: Compared) -> SubspaceOverlap:
    """φ = ‖U_aᵀU_b‖_F²/min(r_a, r_b) of ΔW's column spaces for every module both adapters train."""
    first, second = open_adapter(a.adapter_dir), open_adapter(b.adapter_dir)
    theirs = {m.name: m for m in second.modules}
    modules = {}
    for module in first.modules:
        other = theirs.get(module.name)
        if other is None or other.shape != module.shape:
            continue
        cpu = torch.device("cpu")
        space_a = column_space(*module.factors(first.tensors, cpu), module.scale)
        space_b = column_space(*other.factors(second.tensors, cpu), other.scale)
        modules[module.name] = subspace_similarity(space_a, space_b)
    finite = [v for v in modules.values() if math.isfinite(v)]
    return SubspaceOverlap(a=a.label, b=b.label, modules=modules,
                           mean=sum(finite) / len(finite) if finite else None,
                           shared_modules=len(modules))
