"""Per-module metrics: one factored (or dense) ΔW in, a ModuleMetrics record and its extras out.

Factored modules never become m×n matrices here, except tile by tile for the exact min/max (only the
tiles the |ΔW_ij| <= ‖x_i‖·‖y_j‖ bound cannot rule out) and for an exact histogram.
"""
from __future__ import annotations

import ctypes
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tunelens.config import packaged_settings
from tunelens.settings import AnalysisSettings, Settings

from . import lora_math
from .naming import ModulePath
from .result import Heatmap, ModuleMetrics


def analysis_settings(config: Settings | None) -> AnalysisSettings:
    """conf.yaml's `analysis:` section of `config` (the packaged defaults when None)."""
    return (config or packaged_settings()).analysis


@contextmanager
def torch_threads(settings: AnalysisSettings):
    """torch's CPU threads for the analysis, restored afterwards (None: torch's default)."""
    previous = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# glibc's malloc (mallopt): blocks up to this size come from the heap, and this much freed memory
# may stay at its top, during an analysis. By default a block above a threshold of at most 32 MiB
# is a fresh mapping and a freed heap top is returned at once, so each large tensor's pages were
# faulted in and zeroed anew: a quarter of a 1.2 GB MoE adapter's CPU time. Afterwards glibc's
# initial values are set back and the freed memory returned.
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 256 * 2**20, 128 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT = -1, -3, 128 * 1024


@contextmanager
def reused_allocations():
    """Large freed tensors' memory kept for the next ones during the analysis (glibc only)."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "malloc_trim"):  # not glibc: its own allocator's way
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
        libc.malloc_trim(0)


def torch_device(settings: AnalysisSettings) -> torch.device:
    """"auto": CUDA when torch sees a GPU, else the CPU."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


class FactoredEntries:
    """ΔW's entries as X·Yᵀ (balanced SVD factors): exact extremes, tiles and samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.numel = x.shape[0] * y.shape[0]

    def extremes(self, x_norms: torch.Tensor | None = None) -> tuple[float, float]:
        low, high, _ = lora_math.extreme_entries(self.x, self.y, x_norms)
        return low, high

    def tiles(self):
        return lora_math.entry_tiles(self.x, self.y)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return lora_math.sample_entries(self.x, self.y, count, generator)


class DenseEntries:
    """A materialised ΔW (DoRA's effective delta, modules_to_save): same interface."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self.numel = delta.numel()

    def extremes(self) -> tuple[float, float]:
        return float(self.delta.min()), float(self.delta.max())

    def tiles(self):
        yield self.delta

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        flat = torch.randint(0, self.numel, (count,), generator=generator).to(self.delta.device)
        return self.delta.reshape(-1)[flat]


@dataclass
class ModuleAnalysis:
    """A module's record plus what the adapter-wide aggregates need from it."""

    metrics: ModuleMetrics
    heatmap: Heatmap | None = None
    top_rows: list[tuple[int, float]] = field(default_factory=list)  # (row, ‖ΔW_row‖), largest first
    entries: FactoredEntries | DenseEntries | None = None
    entry_sum: float = 0.0  # Σ ΔW_ij, for the adapter-wide mean


def _spectrum_metrics(singular: torch.Tensor, max_rank: int) -> dict:
    eff = lora_math.effective_rank(singular)
    return dict(fro=lora_math.frobenius(singular),
                spectral=float(singular.max()) if singular.numel() else 0.0,
                singular_values=singular.tolist(),
                effective_rank=eff, stable_rank=lora_math.stable_rank(singular),
                energy_rank_90=lora_math.energy_rank(singular, 0.90),
                energy_rank_99=lora_math.energy_rank(singular, 0.99),
                rank_utilisation=eff / max_rank if max_rank else 0.0)


def heatmap_record(name: str, values: torch.Tensor, digits: int = 4) -> Heatmap:
    """A Heatmap record with values cut to `digits` significant digits: a picture needs no more,
    and analysis.json for a 224-module adapter shrinks from ~26 MB to a third."""
    values = values.cpu()
    magnitude = values.abs().clamp_min(1e-300).log10().floor()
    power = (digits - 1 - magnitude).clamp(-300, 300)
    # Divide by an exact power of ten so each value is the double nearest its decimal: short repr.
    positive = power >= 0
    scale = torch.pow(10.0, power.abs()).to(values.dtype)
    rounded = torch.where(positive, (values * scale).round() / scale, (values / scale).round() * scale)
    rounded = torch.where(values == 0, values, rounded)
    return Heatmap(name, values.shape[0], values.shape[1], rounded.tolist())


def top_rows(norms: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, rows = norms.topk(min(k, norms.numel()))
    return list(zip(rows.tolist(), values.tolist()))


def _base_metrics(fro: float, base: torch.Tensor | None, tuned_delta, settings, u=None, v=None,
                  singular=None) -> dict:
    """relative_fro, amplification and intruder dimensions; all None without the base weight."""
    if base is None:
        return {}
    base_fro = float(base.norm())
    out = {"relative_fro": fro / base_fro if base_fro > 0 else math.inf}
    if u is not None:
        out["amplification"] = lora_math.amplification_factor(u, v, singular, base)
    out["intruder_dimensions"] = lora_math.intruder_dimensions(
        base, base + tuned_delta(), settings.intruder_top_k, settings.intruder_cos_threshold)
    return out


def factored_module(name: str, where: ModulePath, left: torch.Tensor, right: torch.Tensor,
                    scale: float, rank: int, kind: str, settings: AnalysisSettings,
                    base: torch.Tensor | None = None) -> ModuleAnalysis:
    """Every metric of ΔW = scale·L·R from the factors (the base, when given, is W in [out, in])."""
    m, n = left.shape[0], right.shape[1]
    x, singular, y = lora_math.balanced_factored_svd(left, right, scale)
    spectrum = _spectrum_metrics(singular, min(rank, m, n))
    total = lora_math.entry_sum(left, right, scale)
    mean = total / (m * n)
    variance = max(spectrum["fro"] ** 2 / (m * n) - mean * mean, 0.0)
    entries = FactoredEntries(x, y)
    norms, x_norms = lora_math.batched_row_norms(x, singular)
    low, high = entries.extremes(x_norms)
    u, v = lora_math.singular_vectors(x, singular, y) if base is not None else (None, None)
    extra = _base_metrics(spectrum["fro"], base, lambda: scale * (left @ right), settings,
                          u, v, singular)
    metrics = ModuleMetrics(name=name, layer=where.layer, component=where.component,
                            group=where.group, shape=[m, n], rank=rank, scale=scale, mean=mean,
                            std=math.sqrt(variance), min=low, max=high, kind=kind,
                            **spectrum, **extra)
    heat = lora_math.block_means(left, right, scale, settings.heatmap_size)
    return ModuleAnalysis(metrics, heatmap_record(name, heat),
                          top_rows(norms, settings.top_neurons),
                          entries, total)


def dense_module(name: str, where: ModulePath, delta: torch.Tensor, rank: int, kind: str,
                 settings: AnalysisSettings, base: torch.Tensor | None = None,
                 scale: float = 1.0) -> ModuleAnalysis:
    """Every metric of a materialised ΔW (DoRA's effective delta, a modules_to_save weight)."""
    m, n = delta.shape
    singular = torch.linalg.svdvals(delta)
    spectrum = _spectrum_metrics(singular, min(m, n))
    extra = _base_metrics(spectrum["fro"], base, lambda: delta, settings)
    metrics = ModuleMetrics(name=name, layer=where.layer, component=where.component,
                            group=where.group, shape=[m, n], rank=rank, scale=scale,
                            mean=float(delta.mean()), std=float(delta.std(correction=0)),
                            min=float(delta.min()), max=float(delta.max()), kind=kind,
                            **spectrum, **extra)
    heat = lora_math.block_means_dense(delta, settings.heatmap_size)
    return ModuleAnalysis(metrics, heatmap_record(name, heat),
                          top_rows(delta.norm(dim=1), settings.top_neurons),
                          DenseEntries(delta), float(delta.sum()))


def nonfinite_module(name: str, where: ModulePath, shape: list[int], rank: int, scale: float,
                     kind: str, nonfinite: int) -> ModuleAnalysis:
    """A module whose tensors hold NaN/Inf: recorded with its count, left out of every aggregate."""
    nan = math.nan
    return ModuleAnalysis(ModuleMetrics(
        name=name, layer=where.layer, component=where.component, group=where.group, shape=shape,
        rank=rank, scale=scale, fro=nan, spectral=nan, singular_values=[], effective_rank=nan,
        stable_rank=nan, energy_rank_90=0, energy_rank_99=0, rank_utilisation=nan, mean=nan,
        std=nan, min=nan, max=nan, kind=kind, nonfinite=nonfinite))


def count_nonfinite(*tensors: torch.Tensor | None) -> int:
    """NaN and ±Inf entries across the given tensors (a finite sum proves there are none)."""
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors
               if t is not None and not torch.isfinite(t.sum()))


def factored_experts(names: list[str], where: ModulePath, left: torch.Tensor, right: torch.Tensor,
                     scale: float, rank: int, settings: AnalysisSettings,
                     base: torch.Tensor | None = None, right_root=None) -> list[ModuleAnalysis]:
    """One record per expert of ΔW_e = scale·L_e·R_e, L (E, m, r), R (E, r, n), computed for the
    whole stack at once; `base` (E, m, n) adds ‖ΔW_e‖/‖W_e‖; `right_root`: lora_math.gram_root of
    R·Rᵀ, shared by the parts of one fused parameter. No heatmap per expert: the report's
    layer × expert grid shows where the experts moved."""
    experts, m, n = left.shape[0], left.shape[1], right.shape[-1]
    x, singular, y = lora_math.batched_factored_svd(left, right, scale, right_root)
    spectrum = {k: t.tolist() for k, t in lora_math.batched_spectrum(singular).items()}
    totals = lora_math.batched_entry_sums(left, right, scale).tolist()
    norms, x_norms = lora_math.batched_row_norms(x, singular)
    low, high = (t.tolist() for t in lora_math.batched_extreme_entries(x, y, x_norms=x_norms)[:2])
    top_values, top_rows = norms.topk(min(settings.top_neurons, m), dim=-1)
    relative = None
    if base is not None:
        base_fro = base.norm(dim=(1, 2))
        relative = torch.where(base_fro > 0, torch.tensor(spectrum["fro"], dtype=base_fro.dtype,
                                                          device=base_fro.device) / base_fro,
                               math.inf).tolist()
    singular_lists, top_values, top_rows = singular.tolist(), top_values.tolist(), top_rows.tolist()
    max_rank = min(rank, m, n)
    out = []
    for e in range(experts):
        fro, mean = spectrum["fro"][e], totals[e] / (m * n)
        metrics = ModuleMetrics(
            name=names[e], layer=where.layer, component=where.component, group=where.group,
            shape=[m, n], rank=rank, scale=scale, fro=fro, spectral=spectrum["spectral"][e],
            singular_values=singular_lists[e], effective_rank=spectrum["effective_rank"][e],
            stable_rank=spectrum["stable_rank"][e], energy_rank_90=spectrum["energy_rank_90"][e],
            energy_rank_99=spectrum["energy_rank_99"][e],
            rank_utilisation=spectrum["effective_rank"][e] / max_rank if max_rank else 0.0,
            mean=mean, std=math.sqrt(max(fro * fro / (m * n) - mean * mean, 0.0)), min=low[e],
            max=high[e], relative_fro=relative[e] if relative is not None else None, kind="lora",
            expert=e)
        out.append(ModuleAnalysis(metrics, None, list(zip(top_rows[e], top_values[e])),
                                  FactoredEntries(x[e], y[e]), totals[e]))
    return out
