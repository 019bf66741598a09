"""Training evolution over LoRA checkpoints: how A, B and ΔW moved from step to step.

The input is a folder of PEFT `checkpoint-*` folders (Trainer's output_dir), or adapter directories
in training order (at least two: e.g. the initial and the final adapter). The final checkpoint gets
the full adapter analysis; the evolution goes into analysis.json's `checkpoints` section, a GIF of
the per-layer profile over steps and its frames as PNG.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tunelens.settings import Settings

from . import lora_math
from .analysis import analyze_adapter
from .loading import AdapterContents, AnalysisInputError, find_adapter_dir, open_adapter
from .module_metrics import analysis_settings, torch_threads
from .naming import parse_module_path
from .result import (AnalysisResult, ChangeStats, CheckpointEvolution, CheckpointRef,
                     LayerEvolution, ModuleEvolution, RunProfile, SimilarityStep, TrainingRuns)

_STEP = re.compile(r"checkpoint-(\d+)$")
STAT_NAMES = ("mean", "var", "abs_mean", "abs_var")


@dataclass(frozen=True)
class Checkpoint:
    """One training state: a label, its adapter directory and its step (None when unknown)."""

    label: str
    path: Path
    step: int | None


def find_checkpoints(paths: list[str | Path]) -> list[Checkpoint]:
    """One folder of checkpoint-* folders (by step), or adapter directories in the given order."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise AnalysisInputError(f"{p} does not exist")
    if len(paths) == 1 and find_adapter_dir(paths[0]) is None:
        folders = [d for d in paths[0].iterdir() if d.is_dir() and _STEP.search(d.name)]
        if len(folders) < 2:
            raise AnalysisInputError(f"{paths[0]} holds {len(folders)} checkpoint-* folders; the "
                                     "evolution needs at least two (or pass adapter directories)")
        paths = sorted(folders, key=lambda d: int(_STEP.search(d.name).group(1)))
    if len(paths) < 2:
        raise AnalysisInputError("the evolution needs at least two checkpoints: pass a folder of "
                                 "checkpoint-* folders, or an initial and a final adapter")
    found = []
    for p in paths:
        adapter = find_adapter_dir(p)
        if adapter is None:
            raise AnalysisInputError(f"{p} holds no adapter_config.json (nor peft/): not a PEFT "
                                     "checkpoint")
        step = _STEP.search(p.name)
        found.append(Checkpoint(p.name, adapter, int(step.group(1)) if step else None))
    return found


def change_stats(delta: torch.Tensor) -> ChangeStats:
    """mean(Δ), var(Δ), mean(|Δ|), var(|Δ|) of one matrix's change (population variances)."""
    magnitude = delta.abs()
    return ChangeStats(mean=float(delta.mean()), var=float(delta.var(correction=0)),
                       abs_mean=float(magnitude.mean()), abs_var=float(magnitude.var(correction=0)))


def subspace_similarity(u_first: torch.Tensor, u_second: torch.Tensor) -> float:
    """‖U₁ᵀU₂‖_F² / min(r₁, r₂) for orthonormal bases U₁, U₂ (Hu et al. 2021's φ): 1 = same span."""
    smaller = min(u_first.shape[1], u_second.shape[1])
    if smaller == 0:
        return math.nan
    return float((u_first.T @ u_second).square().sum()) / smaller


def column_space(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """Orthonormal basis of ΔW = s·L·R's column space (left singular vectors with σ > 0)."""
    u, singular, _ = lora_math.factored_svd(left, right, scale)
    keep = singular > singular.max() * 1e-10 if singular.numel() and singular.max() > 0 else \
        torch.zeros_like(singular, dtype=torch.bool)
    return u[:, keep]


def _open_all(checkpoints: list[Checkpoint]) -> list[AdapterContents]:
    """Open every checkpoint and check they hold the same modules with the same shapes."""
    opened = [open_adapter(c.path) for c in checkpoints]
    first = {m.name: m for m in opened[0].modules}
    for checkpoint, contents in zip(checkpoints[1:], opened[1:]):
        other = {m.name: m for m in contents.modules}
        differ = sorted(set(first) ^ set(other))
        if differ:
            name = differ[0]
            has, lacks = ((checkpoints[0].label, checkpoint.label) if name in first
                          else (checkpoint.label, checkpoints[0].label))
            raise AnalysisInputError(f"checkpoints differ: module {name} is in {has} but not in "
                                     f"{lacks}")
        for name, module in first.items():
            if other[name].shape != module.shape or other[name].rank != module.rank:
                raise AnalysisInputError(
                    f"checkpoints differ: module {name} is {list(module.shape)} rank {module.rank} "
                    f"in {checkpoints[0].label} but {list(other[name].shape)} rank "
                    f"{other[name].rank} in {checkpoint.label}")
    return opened


def checkpoint_evolution(paths: list[str | Path], *, config: Settings | None = None,
                         progress: bool = True) -> CheckpointEvolution:
    """analysis.json's `checkpoints` section: per module and per layer, every checkpoint."""
    settings = analysis_settings(config)
    checkpoints = find_checkpoints(paths)
    opened = _open_all(checkpoints)
    modules = []
    with torch.no_grad(), torch_threads(settings), tqdm(
            total=len(opened[0].modules), desc="tunelens checkpoints", unit="module",
            file=sys.stderr, disable=not progress, leave=False) as bar:
        for module in opened[0].modules:
            modules.append(_module_evolution(module.name, opened))
            bar.update()
    pairs = [_similarity_step(checkpoints[i].label, checkpoints[i + 1].label,
                              [m.subspace_similarity[i] for m in modules])
             for i in range(len(checkpoints) - 1)]
    return CheckpointEvolution(
        checkpoints=[CheckpointRef(c.label, str(c.path), c.step) for c in checkpoints],
        reference=checkpoints[0].label, modules=modules,
        layers=_layer_evolution(modules, len(checkpoints)), subspace_similarity=pairs)


def _module_evolution(name: str, opened: list[AdapterContents]) -> ModuleEvolution:
    states = []
    for contents in opened:
        module = next(m for m in contents.modules if m.name == name)
        a = contents.tensors.get(module.keys["A"]).double()
        b = contents.tensors.get(module.keys["B"]).double()
        left, right = module.factors(contents.tensors, torch.device("cpu"))
        states.append((a, b, left, right, module.scale))
    a0, b0 = states[0][0], states[0][1]
    spaces = [column_space(left, right, scale) for _, _, left, right, scale in states]
    where = parse_module_path(name)
    return ModuleEvolution(
        name=name, layer=where.layer, component=where.component, group=where.group,
        A=[change_stats(a - a0) for a, *_ in states],
        B=[change_stats(b - b0) for _, b, *_ in states],
        delta_fro=[lora_math.frobenius(lora_math.factored_svd(left, right, scale)[1])
                   for _, _, left, right, scale in states],
        subspace_similarity=[subspace_similarity(spaces[i], spaces[i + 1])
                             for i in range(len(spaces) - 1)])


def _similarity_step(first: str, second: str, values: list[float]) -> SimilarityStep:
    """Mean and min of φ over the modules where it is defined."""
    finite = [v for v in values if math.isfinite(v)]
    return SimilarityStep(from_=first, to=second, mean=sum(finite) / len(finite) if finite else None,
                          min=min(finite) if finite else None, modules=len(finite))


def _layer_evolution(modules: list[ModuleEvolution], count: int) -> list[LayerEvolution]:
    """Per layer and checkpoint: A's and B's change stats averaged over its matrices, and
    S_ℓ = Σ ‖ΔW‖_F."""
    layers: dict[int, list[ModuleEvolution]] = {}
    for m in modules:
        if m.layer is not None:
            layers.setdefault(m.layer, []).append(m)

    def averaged(members: list[ModuleEvolution], matrix: str) -> dict[str, list[float]]:
        return {stat: [sum(getattr(getattr(m, matrix)[i], stat) for m in members) / len(members)
                       for i in range(count)] for stat in STAT_NAMES}

    return [LayerEvolution(layer=layer,
                           delta_fro=[sum(m.delta_fro[i] for m in layers[layer])
                                      for i in range(count)],
                           A=averaged(layers[layer], "A"), B=averaged(layers[layer], "B"))
            for layer in sorted(layers)]


def is_run_folder(path: str | Path) -> bool:
    """A training run's output folder: not an adapter itself, holding checkpoint-* folders."""
    path = Path(path)
    return (path.is_dir() and find_adapter_dir(path) is None
            and any(d.is_dir() and _STEP.search(d.name) for d in path.iterdir()))


def training_runs(paths: list[str | Path], labels: list[str] | None = None, *,
                  config: Settings | None = None, progress: bool = True) -> TrainingRuns:
    """Several runs (each a folder of checkpoint-* folders), labelled by `labels` or by folder
    name: each run's S_ℓ per layer at every checkpoint, on the union of their layers."""
    if labels and len(labels) != len(paths):
        raise AnalysisInputError(f"{len(labels)} --label values for {len(paths)} runs: give one "
                                 "per run, in the same order")
    for path in paths:
        if not is_run_folder(path):
            raise AnalysisInputError(f"{path} is not a training run's folder of checkpoint-* "
                                     "folders (several runs need one such folder each)")
    names = labels or [Path(p).resolve().name for p in paths]
    if len(set(names)) != len(names):
        raise AnalysisInputError(f"runs need distinct labels, got {names}: pass --label per run")
    evolutions = [checkpoint_evolution([p], config=config, progress=progress) for p in paths]
    layers = sorted({r.layer for e in evolutions for r in e.layers})
    runs = []
    for name, evolution in zip(names, evolutions):
        by_layer = {r.layer: r.delta_fro for r in evolution.layers}
        runs.append(RunProfile(name, evolution.checkpoints, [
            [by_layer[layer][i] if layer in by_layer else None for layer in layers]
            for i in range(len(evolution.checkpoints))]))
    return TrainingRuns(layers, runs)


def analyze_checkpoints(paths: list[str | Path], base: str | Path | None = None, *,
                        config: Settings | None = None, progress: bool = True) -> AnalysisResult:
    """The final checkpoint's full analysis with the evolution attached as `checkpoints`."""
    section = checkpoint_evolution(paths, config=config, progress=progress)
    result = analyze_adapter(section.checkpoints[-1].path, base, config=config,
                             progress=progress)
    result.checkpoints = section
    return result
