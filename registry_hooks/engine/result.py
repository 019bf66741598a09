"""The analysis result: typed records that become analysis.json ("tunelens.analysis/1").

Data flows one way: adapter files -> factored modules -> per-module metrics -> AnalysisResult ->
JSON, HTML, MLflow. Nothing downstream recomputes what is here; everything downstream reads it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "tunelens.analysis/1"


@dataclass
class AdapterInfo:
    """What adapter_config.json says, as the analysis understood it."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: list[str] | str | None
    base_model_name_or_path: str | None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # "mlx-lm": an mlx-lm adapter, whose `scale` multiplies B·A as is (lora_alpha = scale·r, the
    # PEFT α with the same multiplier)
    format: str = "peft"
    scale: float | None = None


@dataclass
class FullFinetuneInfo:
    """A full fine-tune's source: every weight could move, so there is no rank, alpha or target."""

    base_model_name_or_path: str | None
    peft_type: str = "FULL"  # analysis.json's `adapter.peft_type` tells the two sources apart


@dataclass
class ModuleMetrics:
    """One analysed module, or one part (.q/.k/.v/.gate/.up) of a fused projection.

    `shape` is [out, in] in Linear orientation whatever fan_in_fan_out says. `kind` is "lora",
    "embedding" (lora_embedding_A/B), "dora" (effective ΔW, needs the base) or "dense"
    (modules_to_save: full tensor, ΔW = saved - base).
    """

    name: str
    layer: int | None
    component: str
    group: str  # "attention" | "mlp" | "embedding" | "other"
    shape: list[int]
    rank: int
    scale: float
    fro: float
    spectral: float
    singular_values: list[float]
    effective_rank: float
    stable_rank: float
    energy_rank_90: int
    energy_rank_99: int
    rank_utilisation: float
    mean: float
    std: float
    min: float
    max: float
    relative_fro: float | None = None
    amplification: float | None = None
    intruder_dimensions: int | None = None
    kind: str = "lora"
    nonfinite: int = 0  # NaN/Inf entries found in this module's tensors
    bias_delta_norm: float | None = None  # ‖scale·lora_B.bias‖₂ when the adapter trains a LoRA bias
    expert: int | None = None  # the expert's index for one expert of a 3-D experts parameter


@dataclass
class LayerProfile:
    """S_ℓ, the sum over components of ‖ΔW‖_F in one layer, and its parts."""

    layer: int
    fro_sum: float
    components: dict[str, float]
    groups: dict[str, float]
    # The Q/K/V/O breakdown: Σ ‖ΔW‖_F per attention role ("QKV" = an unsplit fused one).
    roles: dict[str, float] = field(default_factory=dict)


@dataclass
class ExpertLayer:
    """One MoE layer: Σ over its adapted expert parameters of ‖ΔW_e‖_F, for each expert e."""

    layer: int
    fro_by_expert: list[float]
    top_experts: list[int]  # the top_k experts by that sum, largest first
    top_share: float  # their share of the layer's total


@dataclass
class ExpertSummary:
    """Experts adapted through target_parameters (3-D MoE parameters), aggregated.

    Each expert's ΔW_e is a module record of its own (ModuleMetrics.expert set); these are the sums
    of their ‖ΔW_e‖_F per layer × expert, per parameter (gate_proj, up_proj, down_proj) and per
    expert index across layers. top_share is the layers' mean share held by their top_k experts;
    uniform_share = top_k / num_experts is that share had every expert moved alike.
    """

    num_experts: int
    parameters: list[str]
    layers: list[ExpertLayer]
    fro_by_parameter: dict[str, float]
    fro_by_expert: list[float]
    top_k: int
    top_share: float
    uniform_share: float


@dataclass
class TopNeuron:
    """A row of ΔW (an output neuron) that moved most: shift = ‖ΔW[index, :]‖₂."""

    layer: int | None
    component: str
    index: int
    shift: float
    module: str


@dataclass
class Histogram:
    """Distribution of ΔW's entries over all analysed modules.

    mean/std/min/max are exact (from the factors); counts are exact when `exact`, otherwise
    estimated from `sample_size` sampled entries, with `share_within_one_std_error` the standard
    error of that share.
    """

    mean: float
    std: float
    min: float
    max: float
    bin_edges: list[float]
    counts: list[int]
    exact: bool
    share_within_one_std: float
    sample_size: int | None = None
    share_within_one_std_error: float | None = None
    skewness: float | None = None
    excess_kurtosis: float | None = None
    total_entries: int | None = None  # entries of ΔW over all analysed modules (the population)


@dataclass
class Heatmap:
    """Block means of ΔW for one module on a grid of at most heatmap_size cells per side."""

    module: str
    rows: int
    cols: int
    values: list[list[float]]


@dataclass
class Summary:
    """The headline numbers of an adapter.

    Two sizes of the change, each named for what it averages: mean_module_fro / max_module_fro
    are over modules of ‖ΔW‖_F (a fused projection such as qkv_proj is one module, its norm
    sqrt(Σ parts' ‖ΔW‖_F²)); mean_layer_fro_sum / max_layer_fro_sum are over the modified layers
    of S_ℓ = Σ ‖ΔW‖_F over the layer's matrices (NaN when no module sits in a numbered layer).
    trainable_share is trainable_params / base_params; mean_rank_utilisation averages
    effective_rank / max rank.
    """

    trainable_params: int
    base_params: int | None
    trainable_share: float | None
    layers_modified: list[int]
    num_layers: int | None
    mean_module_fro: float
    max_module_fro: float
    mean_layer_fro_sum: float
    max_layer_fro_sum: float
    group_fro: dict[str, float]
    mean_rank_utilisation: float
    nonfinite_modules: list[str] = field(default_factory=list)


@dataclass
class TensorDiff:
    """One tensor's change: ‖ΔW‖_F, ‖W‖_F and, for matrices, rank facts the ModuleMetrics lacks."""

    name: str
    shape: list[int]
    fro: float
    base_fro: float
    relative_fro: float
    spectral: float | None = None
    rank: int | None = None  # numerical rank of ΔW: #σ_i > rank_rtol·σ_1 (exact at that threshold)
    relative_rank: float | None = None  # rank / min(m, n)
    energy_rank_90: int | None = None  # None when the computed singular values hold < 90% of ‖ΔW‖_F²
    spectrum_exact: bool = True  # every σ computed (else those down to the rank threshold)
    # False: counted against W's top intruder_reference_k vectors (an upper bound); the count is
    # None for large matrices unless full_diff.intruders_randomized is on
    intruders_exact: bool = True


@dataclass
class LayerTypeGrid:
    """Per layer × matrix type values of each grid metric (None where a layer lacks that type)."""

    layers: list[int]
    matrix_types: list[str]
    metrics: dict[str, list[list[float | None]]]

    def rows(self, metric: str) -> list[list[float | None]]:
        return self.metrics.get(metric) or []


@dataclass
class FullDiffSection:
    """analysis.json's `full_diff`: what a full fine-tune changed, tensor by tensor."""

    finetuned_model: str
    base_model: str
    settings: dict[str, Any]  # conf.yaml's full_diff values the diff ran with
    relative_fro_total: float | None  # ‖ΔW‖_F / ‖W‖_F over every compared tensor
    tensors_compared: int
    tensors_unchanged: int
    tensors: list[TensorDiff]
    grid: LayerTypeGrid

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FullDiffSection":
        return cls(**{**_fields(cls, data),
                      "tensors": [TensorDiff(**_fields(TensorDiff, t)) for t in data["tensors"]],
                      "grid": LayerTypeGrid(**_fields(LayerTypeGrid, data["grid"]))})


@dataclass
class ChangeStats:
    """One matrix's change since the reference checkpoint: mean(Δ), var(Δ), mean(|Δ|), var(|Δ|)."""

    mean: float
    var: float
    abs_mean: float
    abs_var: float


@dataclass
class CheckpointRef:
    """One training state: its label, adapter directory and step (None when unknown)."""

    label: str
    path: str
    step: int | None


@dataclass
class ModuleEvolution:
    """One module over the checkpoints: A's and B's change, ‖ΔW‖_F, and φ between neighbours."""

    name: str
    layer: int | None
    component: str
    group: str
    A: list[ChangeStats]
    B: list[ChangeStats]
    delta_fro: list[float]
    subspace_similarity: list[float]  # φ(checkpoint i, i+1)


@dataclass
class LayerEvolution:
    """One layer over the checkpoints: S_ℓ, and A's and B's change stats averaged over its modules."""

    layer: int
    delta_fro: list[float]
    A: dict[str, list[float]]  # stat name -> one value per checkpoint
    B: dict[str, list[float]]


@dataclass
class SimilarityStep:
    """φ between two consecutive checkpoints: mean and min over modules."""

    from_: str = field(metadata={"json": "from"})
    to: str = ""
    mean: float | None = None
    min: float | None = None
    modules: int = 0


@dataclass
class CheckpointEvolution:
    """analysis.json's `checkpoints`: how A, B and ΔW moved from checkpoint to checkpoint."""

    checkpoints: list[CheckpointRef]
    reference: str
    modules: list[ModuleEvolution]
    layers: list[LayerEvolution]
    subspace_similarity: list[SimilarityStep]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointEvolution":
        def stats(items):
            return [ChangeStats(**s) for s in items]
        return cls(
            checkpoints=[CheckpointRef(**c) for c in data["checkpoints"]],
            reference=data["reference"],
            modules=[ModuleEvolution(**{**_fields(ModuleEvolution, m), "A": stats(m["A"]),
                                        "B": stats(m["B"])}) for m in data["modules"]],
            layers=[LayerEvolution(**_fields(LayerEvolution, layer)) for layer in data["layers"]],
            subspace_similarity=[SimilarityStep(from_=p["from"], to=p["to"], mean=p["mean"],
                                                min=p["min"], modules=p["modules"])
                                 for p in data["subspace_similarity"]])


@dataclass
class RunProfile:
    """One training run: its label, checkpoints and S_ℓ per layer at each checkpoint."""

    label: str
    checkpoints: list[CheckpointRef]
    layer_fro: list[list[float | None]]  # per checkpoint, S_ℓ per entry of TrainingRuns.layers


@dataclass
class TrainingRuns:
    """runs.json ("tunelens.runs/1"): several runs of one base (domains, learning rates), their
    per-layer change S_ℓ = Σ ‖ΔW‖_F at every checkpoint, side by side."""

    layers: list[int]
    runs: list[RunProfile]
    schema: str = "tunelens.runs/1"


@dataclass
class AnalysisResult:
    """Everything `tunelens analyze` found, numbers only: the report package words it (narrative,
    glossary) and writes analysis.json from `to_dict()` plus those words."""

    adapter: AdapterInfo | FullFinetuneInfo
    summary: Summary
    modules: list[ModuleMetrics]
    layers: list[LayerProfile]
    top_neurons: list[TopNeuron]
    histogram: Histogram
    heatmaps: list[Heatmap]
    base_model: str | None = None  # the local base directory used, if any
    needs_base: list[str] = field(default_factory=list)  # metrics skipped for want of a base
    warnings: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    # Optional sections (docs/analysis-json.md): a full fine-tune diff, a training evolution.
    full_diff: FullDiffSection | None = None
    checkpoints: CheckpointEvolution | None = None
    experts: ExpertSummary | None = None  # MoE experts adapted through target_parameters

    def to_dict(self) -> dict[str, Any]:
        return json_safe(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalysisResult":
        """The inverse of to_dict (analysis.json read back); nulls stay None, unknown keys are
        ignored so newer files still load."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema: {data.get('schema')!r})")
        return cls(**{
            **_fields(cls, data),
            "adapter": _source(data["adapter"]),
            "summary": Summary(**_fields(Summary, data["summary"])),
            "modules": [ModuleMetrics(**_fields(ModuleMetrics, m)) for m in data["modules"]],
            "layers": [LayerProfile(**_fields(LayerProfile, layer)) for layer in data["layers"]],
            "top_neurons": [TopNeuron(**_fields(TopNeuron, t)) for t in data["top_neurons"]],
            "histogram": Histogram(**_fields(Histogram, data["histogram"])),
            "heatmaps": [Heatmap(**_fields(Heatmap, h)) for h in data.get("heatmaps", [])],
            "full_diff": (FullDiffSection.from_dict(data["full_diff"])
                          if data.get("full_diff") else None),
            "checkpoints": (CheckpointEvolution.from_dict(data["checkpoints"])
                            if data.get("checkpoints") else None),
            "experts": _experts_from_dict(data.get("experts")),
        })


def _source(data: dict[str, Any]) -> AdapterInfo | FullFinetuneInfo:
    kind = FullFinetuneInfo if str(data.get("peft_type")).upper() == "FULL" else AdapterInfo
    return kind(**_fields(kind, data))


def _experts_from_dict(data: dict[str, Any] | None) -> ExpertSummary | None:
    if data is None:
        return None
    return ExpertSummary(**{**_fields(ExpertSummary, data), "layers": [
        ExpertLayer(**_fields(ExpertLayer, layer)) for layer in data["layers"]]})


def _fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The keys `cls` knows; a null in a plain `float` field was a NaN/Inf and becomes NaN again."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: (math.nan if v is None and types[k] == "float" else v)
            for k, v in data.items() if k in types}


def json_safe(value: Any) -> Any:
    """Dataclasses as plain dicts and NaN/Inf as null, in one pass (dataclasses.asdict deep-copies
    every heatmap value first: 4x slower): analysis.json stays strict JSON for a broken adapter."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind in _ATOMS:
        return value
    if kind is list or kind is tuple:
        if _finite_numbers(value):  # a heatmap row, singular values: no walk needed
            return list(value)
        return [json_safe(v) for v in value]
    if kind is dict:
        return {k: json_safe(v) for k, v in value.items()}
    fields = _JSON_FIELDS.get(kind)
    if fields is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = _JSON_FIELDS[kind] = [(f.metadata.get("json", f.name), f.name)
                                       for f in dataclasses.fields(value)]
    if fields is not None:
        return {key: json_safe(getattr(value, name)) for key, name in fields}
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_ATOMS = (int, str, bool, type(None))
_JSON_FIELDS: dict[type, list[tuple[str, str]]] = {}  # dataclass -> (JSON key, attribute) pairs


def _finite_numbers(values: list | tuple) -> bool:
    """True when the items are plain numbers none of which is NaN or ±Inf: their sum is then a
    finite int or float (one NaN or ±Inf makes it NaN or ±Inf; a string, None, list or record
    raises). A sum that overflows says False and the caller walks the items one by one."""
    try:
        total = sum(values)
    except TypeError:
        return False
    return type(total) in (int, float) and math.isfinite(total)
