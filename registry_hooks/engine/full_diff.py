"""Full fine-tune diff: two full model directories in, an AnalysisResult with a `full_diff` section out.

Tensors are streamed one name at a time from (sharded) safetensors into two float32 buffers sized
for the largest tensor and reused, so peak memory stays at two tensors of the largest shape (and a
fresh gigabyte-sized allocation per tensor, whose page faults cost three times the copy, is never
made). ΔW = W_tuned − W_base is computed in float32 (exact for bf16/fp16 inputs); norms use torch's
cascaded float32 reductions (relative error ~1e-6; a float64 copy of an embedding matrix would
double the peak). Every singular value comes exactly from the float64 Gram matrix's
eigen-decomposition up to full_diff.lanczos_min_dim; wider matrices get their top singular values
from Lanczos (ARPACK), as many as the rank at full_diff.rank_rtol needs. Intruder dimensions above
exact_max_dim come from a randomized SVD with power iterations (Halko et al. 2011).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, svds
from tqdm import tqdm

from tunelens.config import packaged_settings
from tunelens.settings import Settings

from . import lora_math
from . import module_metrics as M
from .analysis import layer_profiles, mean_and_max, top_neurons, value_histogram
from .loading import AnalysisInputError, BaseModel
from .naming import TYPE_ORDER, matrix_type, parse_module_path
from .result import (AnalysisResult, FullDiffSection, FullFinetuneInfo, LayerTypeGrid, ModuleMetrics,
                     Summary, TensorDiff)

GRID_METRICS = ("relative_fro", "fro", "spectral", "relative_rank")


def randomized_svd(terms: list[torch.Tensor], k: int, oversample: int, power_iterations: int,
                   generator: torch.Generator):
    """Top-k (U, S, V) of A = Σ terms: Q = orth((A·Aᵀ)^p·A·Ω), then the SVD of Qᵀ·A (Halko 2011)."""
    m, n = terms[0].shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=terms[0].dtype).to(terms[0].device)

    def apply(x):
        out = terms[0] @ x
        for t in terms[1:]:
            out += t @ x
        return out

    def apply_t_rows(x):
        """(Aᵀ·x)ᵀ = xᵀ·A: reads a row-major A in its own order, 2-3x faster than A.T @ x."""
        rows = x.T.contiguous()
        out = rows @ terms[0]
        for t in terms[1:]:
            out += rows @ t
        return out

    q = torch.linalg.qr(apply(omega))[0]
    for _ in range(power_iterations):
        q = torch.linalg.qr(apply_t_rows(q).T)[0]
        q = torch.linalg.qr(apply(q))[0]
    small = apply_t_rows(q)  # Qᵀ·A, width×n
    u_small, singular, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small)[:, :k], singular[:k], vh[:k].T


def gram_singular_values(matrix: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """σ(M) descending = sqrt(eigvalsh(G)), G = M·Mᵀ or Mᵀ·M (the smaller), in float64.

    Exact up to rounding: |Δσ_i| <= ~eps·σ_1²/σ_i, at most ~1e-8·σ_1 for σ_i near 0; several
    times faster than an SVD of a 256×1536 matrix. G is summed over `block`-wide slices of the
    long side, so no float64 copy of a large M is made.
    """
    wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    gram = torch.zeros(wide.shape[0], wide.shape[0], dtype=torch.float64, device=matrix.device)
    for start in range(0, wide.shape[1], block):
        piece = wide[:, start:start + block].double()
        gram += piece @ piece.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def singular_values_to_threshold(matrix: torch.Tensor, rtol: float, k: int,
                                 seed: int) -> tuple[torch.Tensor, bool]:
    """(σ_1 ≥ σ_2 ≥ … down to the first σ_i <= rtol·σ_1, whether that is every σ): Lanczos (ARPACK
    svds) for the top k, k doubling until σ_k <= rtol·σ_1; every σ from the Gram matrix once k
    passes min(m, n)/4, where Lanczos is no cheaper. #σ_i > rtol·σ_1 is then the exact rank."""
    quarter = min(matrix.shape) // 4
    values = matrix.detach().cpu().numpy()
    while k <= quarter:
        try:
            top = svds(values, k=k, return_singular_vectors=False,
                       random_state=np.random.default_rng(seed))
        except ArpackError:  # no convergence: the Gram matrix gives every σ instead
            break
        top = torch.from_numpy(np.sort(top.astype(np.float64))[::-1].copy())
        if not top[-1] > rtol * top[0]:
            return top, False
        k *= 2
    return gram_singular_values(matrix).cpu(), True


def left_singular_vectors(matrix: torch.Tensor) -> torch.Tensor:
    """U of M = U·Σ·Vᵀ (columns by descending σ), float64: the eigenvectors of M·Mᵀ when M is
    wide (4x faster than an SVD at 256×1536), else torch's SVD."""
    matrix = matrix.double()
    if matrix.shape[0] > matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)[0]
    return torch.linalg.eigh(matrix @ matrix.T)[1].flip(1)


def stratified_positions(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct flat indices of [0, numel): one uniform draw from each of `count` nearly
    equal strata (without replacement); every index when count >= numel."""
    if count >= numel:
        return torch.arange(numel)
    edges = torch.arange(count + 1, dtype=torch.int64) * numel // count
    widths = edges[1:] - edges[:-1]  # each >= 1 since numel > count
    offsets = (torch.rand(count, generator=generator, dtype=torch.float64) * widths).long()
    return edges[:-1] + offsets


def numerical_rank(singular: torch.Tensor, rtol: float) -> int:
    """#σ_i > rtol·σ_1: the rank of ΔW that matters at relative tolerance rtol."""
    if singular.numel() == 0 or not singular[0] > 0:
        return 0
    return int((singular > rtol * singular[0]).sum())


def partial_energy_rank(top: torch.Tensor, total_energy: float, fraction: float) -> int | None:
    """Smallest k with Σ_{i<=k} σ_i² >= fraction·‖ΔW‖_F² from the top σ's only; None if they fall short."""
    if total_energy <= 0:
        return 0
    cumulative = top.double().square().cumsum(0) / total_energy
    reached = (cumulative >= fraction - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else None


def top_left_vectors_overlap(tuned_u: torch.Tensor, base_u: torch.Tensor) -> torch.Tensor:
    """max_j |cos(t_i, u_j)| for every column t_i of tuned_u against the columns of base_u."""
    return (tuned_u.T @ base_u).abs().max(dim=1).values


# --------------------------------------------------------------------------- models and checks

def is_full_model_dir(path: str | Path) -> bool:
    """A model directory with config.json and safetensors weights but no adapter_config.json."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file()
            and not (path / "adapter_config.json").is_file()
            and not (path / "peft" / "adapter_config.json").is_file()
            and any(path.glob("*.safetensors")))


def open_full_model(path: str | Path, role: str) -> BaseModel:
    """A full model directory opened header-only; one clear line when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisInputError(f"{role} model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise AnalysisInputError(f"{role} model directory {path} has no config.json")
    return BaseModel(path)


def check_same_architecture(tuned: BaseModel, base: BaseModel) -> None:
    """Raise on the first difference in architecture, tensor set or tensor shape."""
    for key in ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        a, b = tuned.config.get(key), base.config.get(key)
        if a is not None and b is not None and a != b:
            raise AnalysisInputError(f"architectures differ: config.json {key} is {a!r} in "
                                     f"{tuned.path} but {b!r} in {base.path}")
    tuned_keys, base_keys = set(tuned.keys()), set(base.keys())
    only = sorted((tuned_keys - base_keys) | (base_keys - tuned_keys))
    if only:
        where = tuned.path if only[0] in tuned_keys else base.path
        raise AnalysisInputError(f"tensor sets differ: {only[0]} is only in {where} "
                                 f"({len(only)} tensors differ in all)")
    for key in sorted(tuned_keys):
        if tuned.shape(key) != base.shape(key):
            raise AnalysisInputError(f"tensor shapes differ: {key} is {tuned.shape(key)} in "
                                     f"{tuned.path} but {base.shape(key)} in {base.path}")


# --------------------------------------------------------------------------- the diff

def diff_models(finetuned: str | Path, base: str | Path, *, config: Settings | None = None,
                progress: bool = True) -> AnalysisResult:
    """Every tensor's ΔW = W_tuned − W_base between two full model directories, streamed."""
    settings = M.analysis_settings(config)
    diff_settings = (config or packaged_settings()).full_diff
    device = M.torch_device(settings)
    tuned_model, base_model = open_full_model(finetuned, "fine-tuned"), open_full_model(base, "base")
    check_same_architecture(tuned_model, base_model)
    keys = sorted(base_model.keys(), key=_natural_key)
    matrices = [k for k in keys if len(base_model.shape(k)) == 2]
    total_entries = sum(math.prod(base_model.shape(k)) for k in matrices)
    generator = torch.Generator().manual_seed(settings.seed)
    analyses, diffs, samples, warnings = [], [], [], []
    with torch.no_grad(), M.torch_threads(settings), tqdm(
            total=len(keys), desc="tunelens full diff", unit="tensor", file=sys.stderr,
            disable=not progress, leave=False) as bar:
        buffers = _PairBuffers(max((math.prod(base_model.shape(k)) for k in keys), default=0),
                               device)
        for key in keys:
            w_base, delta = buffers.load(base_model, tuned_model, key)
            total = float(delta.sum())
            bad = 0 if math.isfinite(total) else M.count_nonfinite(delta)
            name = key[:-len(".weight")] if key.endswith(".weight") else key
            if delta.ndim != 2:
                fro, base_fro = _norm(delta), _norm(w_base)
                diffs.append(TensorDiff(key, list(delta.shape), fro, base_fro, _ratio(fro, base_fro)))
            elif bad:
                analyses.append(M.nonfinite_module(name, parse_module_path(name),
                                                   list(delta.shape), min(delta.shape), 1.0,
                                                   "full", bad))
                warnings.append(f"{name}: {bad} NaN/Inf values in ΔW; left out of every aggregate")
            else:
                analysis, diff = _matrix_diff(name, key, w_base, delta, total, settings,
                                              diff_settings, generator)
                quota = round(settings.histogram_sample_entries * delta.numel() / total_entries)
                if quota:
                    flat = stratified_positions(delta.numel(), quota, generator)
                    samples.append(delta.reshape(-1)[flat.to(device)].double().cpu())
                analyses.append(analysis)
                diffs.append(diff)
            del w_base, delta
            bar.update()
        del buffers
    return _result(tuned_model, base_model, analyses, diffs, samples, warnings, settings,
                   diff_settings)


class _PairBuffers:
    """Two flat float32 buffers, sized once for the largest tensor, that every (W, ΔW) pair is
    read into: reusing them saves a gigabyte-sized allocation (and its page faults) per tensor."""

    def __init__(self, numel: int, device):
        self.base = torch.empty(numel, dtype=torch.float32, device=device)
        self.delta = torch.empty(numel, dtype=torch.float32, device=device)

    def load(self, base_model: BaseModel, tuned_model: BaseModel, key: str):
        """(W_base, ΔW = W_tuned − W_base) as float32 views of the buffers."""
        shape = base_model.shape(key)
        numel = math.prod(shape)
        w_base = self.base[:numel].view(shape).copy_(base_model.tensor(key))
        delta = self.delta[:numel].view(shape).copy_(tuned_model.tensor(key))
        return w_base, delta.sub_(w_base)


def _natural_key(key: str):
    """Sort `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


def _matrix_diff(name, key, w_base, delta, total, settings, diff_settings, generator):
    """ModuleMetrics (kind "full") and the TensorDiff of one weight matrix (`total` = Σ ΔW_ij)."""
    m, n = delta.shape
    where = parse_module_path(name)
    row_norms = torch.linalg.vector_norm(delta, dim=1)
    fro = math.sqrt(float(row_norms.double().square().sum()))  # ‖ΔW‖_F² = Σ_i ‖ΔW_i‖², one pass
    base_fro = _norm(w_base)
    low, high = (float(v) for v in torch.aminmax(delta))
    exact = min(m, n) <= diff_settings.exact_max_dim
    k = min(diff_settings.top_singular_values, m, n)
    if exact or min(m, n) < diff_settings.lanczos_min_dim:
        singular, complete = gram_singular_values(delta), True
    elif fro == 0:
        singular, complete = torch.zeros(k, dtype=torch.float64), False
    else:
        singular, complete = singular_values_to_threshold(delta, diff_settings.rank_rtol, 2 * k,
                                                          settings.seed)
    top = singular[:k]
    rank = numerical_rank(singular, diff_settings.rank_rtol)
    spectrum = singular if complete else None
    energy_90 = (lora_math.energy_rank(singular, 0.90) if complete
                 else partial_energy_rank(singular, fro * fro, 0.90))
    intruders = _intruders(w_base, delta, exact, settings, diff_settings, generator)
    mean = total / (m * n)
    spectral = float(top[0]) if top.numel() else 0.0
    full_rank = min(m, n)
    effective = lora_math.effective_rank(spectrum) if spectrum is not None else math.nan
    metrics = ModuleMetrics(
        name=name, layer=where.layer, component=where.component, group=where.group, shape=[m, n],
        rank=full_rank, scale=1.0, fro=fro, spectral=spectral,
        singular_values=[float(s) for s in top], effective_rank=effective,
        stable_rank=fro * fro / (spectral * spectral) if spectral > 0 else 0.0,
        energy_rank_90=_known_or_beyond(energy_90, singular.numel()),
        energy_rank_99=_known_or_beyond(lora_math.energy_rank(spectrum, 0.99) if spectrum is not None
                                        else partial_energy_rank(singular, fro * fro, 0.99),
                                        singular.numel()),
        rank_utilisation=effective / full_rank if spectrum is not None else math.nan,
        mean=mean, std=math.sqrt(max(fro * fro / (m * n) - mean * mean, 0.0)),
        min=low, max=high, relative_fro=_ratio(fro, base_fro),
        intruder_dimensions=intruders, kind="full")
    heatmap = None
    if delta.numel() <= diff_settings.heatmap_max_entries:
        # 4 significant digits, as the adapter path's heatmaps: a third of the JSON text
        heatmap = M.heatmap_record(name, lora_math.block_means_dense(delta, settings.heatmap_size).double())
    rows = M.top_rows(row_norms, settings.top_neurons)
    analysis = M.ModuleAnalysis(metrics, heatmap, rows, _Population(m * n), total)
    diff = TensorDiff(key, [m, n], fro, base_fro, _ratio(fro, base_fro), spectral=spectral,
                      rank=rank, relative_rank=rank / full_rank,
                      energy_rank_90=energy_90, spectrum_exact=complete, intruders_exact=exact)
    return analysis, diff


def _known_or_beyond(rank: int | None, k: int) -> int:
    """ModuleMetrics needs an int: an energy rank beyond the k computed σ's is reported as k + 1
    (TensorDiff.energy_rank_90 says None there)."""
    return rank if rank is not None else k + 1


@dataclass
class _Population:
    """The entry count of a matrix whose values were sampled (the histogram's population)."""

    numel: int


def _intruders(w_base, delta, exact, settings, diff_settings, generator) -> int | None:
    """Intruder dimensions of W+ΔW: exact (full SVDs) when small; else, when intruders_randomized,
    counted against W's top intruder_reference_k left singular vectors (an upper bound on the
    exact count; three times the randomized SVD's cost), else None."""
    top_k = min(settings.intruder_top_k, *delta.shape)
    if not exact and not diff_settings.intruders_randomized:
        return None
    if exact:
        # lora_math.intruder_dimensions' count, with U from the Gram matrices (no full SVDs)
        base_u = left_singular_vectors(w_base)
        tuned_u = left_singular_vectors(w_base + delta)[:, :top_k]
        return int((top_left_vectors_overlap(tuned_u, base_u) < settings.intruder_cos_threshold)
                   .sum())
    tuned_u = randomized_svd([w_base, delta], top_k, diff_settings.oversample,
                             diff_settings.power_iterations, generator)[0]
    base_u = randomized_svd([w_base], min(diff_settings.intruder_reference_k, *delta.shape),
                            diff_settings.oversample, diff_settings.power_iterations, generator)[0]
    best = top_left_vectors_overlap(tuned_u, base_u)
    return int((best < settings.intruder_cos_threshold).sum())


def _result(tuned_model, base_model, analyses, diffs, samples, warnings, settings, diff_settings):
    finite = [a for a in analyses if a.metrics.nonfinite == 0]
    layers = layer_profiles(finite)
    mean_module, max_module = mean_and_max([a.metrics.fro for a in finite])
    mean_layer, max_layer = mean_and_max([p.fro_sum for p in layers])
    group_fro: dict[str, float] = {}
    for a in finite:
        group_fro[a.metrics.group] = group_fro.get(a.metrics.group, 0.0) + a.metrics.fro
    changed = sum(math.prod(d.shape) for d in diffs if d.fro > 0)
    summary = Summary(
        trainable_params=changed, base_params=base_model.params,
        trainable_share=changed / base_model.params if base_model.params else None,
        layers_modified=sorted({a.metrics.layer for a in analyses if a.metrics.layer is not None
                                and a.metrics.fro != 0}),
        num_layers=base_model.num_layers,
        mean_module_fro=mean_module, max_module_fro=max_module,
        mean_layer_fro_sum=mean_layer, max_layer_fro_sum=max_layer,
        group_fro=group_fro, mean_rank_utilisation=math.nan,
        nonfinite_modules=[a.metrics.name for a in analyses if a.metrics.nonfinite])
    adapter = FullFinetuneInfo(base_model.config.get("_name_or_path") or str(base_model.path))
    result = AnalysisResult(
        adapter=adapter, summary=summary, modules=[a.metrics for a in analyses], layers=layers,
        top_neurons=top_neurons(finite, settings.top_neurons),
        histogram=_sampled_histogram(finite, samples, settings),
        heatmaps=[a.heatmap for a in finite if a.heatmap is not None],
        base_model=str(base_model.path), warnings=warnings,
        full_diff=_section(tuned_model, base_model, diffs, diff_settings))
    return result


def _sampled_histogram(finite, samples, settings):
    """The histogram of the sampled entries; exact when the quotas took every entry (a population
    smaller than analysis.histogram_sample_entries)."""
    histogram = value_histogram(finite, False, samples, settings)
    if histogram.sample_size == histogram.total_entries:
        histogram = replace(histogram, exact=True, sample_size=None,
                            share_within_one_std_error=None)
    return histogram


def _section(tuned_model, base_model, diffs: list[TensorDiff], diff_settings) -> FullDiffSection:
    """analysis.json's `full_diff`: per tensor facts and the layer × matrix type grid."""
    matrices = [d for d in diffs if len(d.shape) == 2]
    base_fro = math.sqrt(sum(d.base_fro ** 2 for d in diffs))
    delta_fro = math.sqrt(sum(d.fro ** 2 for d in diffs))
    return FullDiffSection(
        finetuned_model=str(tuned_model.path), base_model=str(base_model.path),
        settings=diff_settings.model_dump(), relative_fro_total=_ratio(delta_fro, base_fro),
        tensors_compared=len(diffs), tensors_unchanged=sum(1 for d in diffs if d.fro == 0),
        tensors=diffs, grid=layer_type_grid(matrices))


def layer_type_grid(matrices: list[TensorDiff]) -> LayerTypeGrid:
    """Per layer × matrix type values of GRID_METRICS (null where a layer lacks that type)."""
    cells: dict[tuple[int, str], TensorDiff] = {}
    for d in matrices:
        where = parse_module_path(d.name[:-len(".weight")] if d.name.endswith(".weight") else d.name)
        if where.layer is not None:
            cells[(where.layer, matrix_type(where.component))] = d
    layers = sorted({layer for layer, _ in cells})
    present = {t for _, t in cells}
    types = [t for t in TYPE_ORDER if t in present] + sorted(present - set(TYPE_ORDER))
    return LayerTypeGrid(layers=layers, matrix_types=types,
                         metrics={metric: [[getattr(cells[(layer, t)], metric)
                                            if (layer, t) in cells else None for t in types]
                                           for layer in layers] for metric in GRID_METRICS})
