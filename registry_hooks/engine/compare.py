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

from .analysis import analyze_adapter
from .checkpoints import column_space, subspace_similarity
from .loading import AnalysisInputError, find_adapter_dir, open_adapter
from .module_metrics import analysis_settings, torch_threads
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
class Comparison:
    """compare.json: per input the profile and shares; per pair of adapters the subspace overlaps."""

    labels: list[str]
    base_model: str | None
    layers: list[int]
    profiles: dict[str, list[float | None]]  # label -> S_ℓ per entry of `layers`
    group_shares: dict[str, dict[str, float]]  # label -> group -> share of Σ‖ΔW‖_F
    overlaps: list[SubspaceOverlap] = field(default_factory=list)
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


def load_input(path: str | Path, base: str | Path | None, config: dict | None,
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


def compare(paths: list[str | Path], base: str | Path | None = None, *, config: dict | None = None,
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
    if len(known) > 1:
        first, *_ = inputs
        other = next(c for c in inputs if bases[c.label] and bases[c.label] != bases[first.label])
        raise AnalysisInputError(f"not the same base model: {first.label} was trained on "
                                 f"{bases[first.label]!r} but {other.label} on {bases[other.label]!r}")
    layers = sorted({p.layer for c in inputs for p in c.result.layers})
    profiles = {c.label: [next((p.fro_sum for p in c.result.layers if p.layer == layer), None)
                          for layer in layers] for c in inputs}
    shares = {c.label: _group_shares(c.result) for c in inputs}
    comparison = Comparison(labels, next(iter(known), None), layers, profiles, shares)
    adapters = [c for c in inputs if c.adapter_dir is not None]
    if len(adapters) < len(inputs):
        comparison.warnings.append("subspace overlap needs the adapters' factors: analysis.json "
                                   "inputs are left out of it")
    settings = analysis_settings(config)
    with torch.no_grad(), torch_threads(settings):
        for a, b in combinations(adapters, 2):
            comparison.overlaps.append(module_overlaps(a, b))
    return comparison


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
