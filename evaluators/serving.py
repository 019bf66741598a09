"""Latency and memory as served: what a user of each model feels and what its server holds.

Latency (`LatencyProfile`, one per model) is measured at concurrency 1 on a sample of the test rows,
after warm-up requests, each model on a server configured the way it will be served:

* the base on an engine without LoRA (an engine started with LoRA enabled runs the LoRA kernels for
  base requests too, so the base would be timed slower than it serves);
* a candidate with ``evaluation.served: adapter`` as a LoRA on a LoRA-enabled engine of the base, or
  with ``merged`` as its weights merged into the base (PEFT ``merge_and_unload``) on a plain engine.

Only one server is in memory at a time. The passes run base, candidates, base again (A-B-A): the
candidate is compared with both base passes (geometric mean of the two ratios, so a load that
rises or falls steadily over the passes hits both sides alike), and the two base passes against
each other (A/A) give the noise floor of this machine at this moment. Within one server the models
it serves are interleaved request by request.

Figures per model (milliseconds, over the sampled requests):

* ``e2e``: request sent -> last token back, at concurrency 1 (nothing queued ahead of it);
* ``ttft``: request sent -> first generated token (NaN where the engine cannot tell);
* ``tpot``: time per output token after the first, (e2e - ttft) / (tokens - 1), for requests with
  at least two tokens;
* ``batch_tokens_per_s``: generated tokens per second of the batched generation (all rows at once):
  throughput, reported apart because it is not what one request feels.

Memory (`MemoryProfile`, one per model) comes from the engines' and torch's own accounting, never a
process's RSS or total-minus-free device memory. Bytes:

* ``weights``: the model's parameters and buffers as the server holds them (numel x dtype bytes of
  the loaded tensors; for a merged candidate, the merged weights);
* ``adapter``: the adapter's tensors as served (numel x the dtype they are held in); 0 for the base
  and for a merged candidate (folded into ``weights``);
* ``lora_buffers``: what the engine preallocates for LoRA (vLLM's stacked LoRA slots, one slot's
  share); 0 where nothing is preallocated (PEFT, plain engines);
* ``kv_cache_peak``: the KV cache the test set actually used at its peak at concurrency 1 (vLLM:
  the blocks the longest request held x the engine's bytes per block; transformers: the bytes of the
  largest cache a request left behind);
* ``peak_allocated``: torch's ``max_memory_allocated`` over the model's requests (transformers on
  a GPU only: it also counts activations and workspace);
* ``total``: weights + adapter (unless it lives inside the LoRA buffers) + lora_buffers +
  kv_cache_peak; None when any part is unknown.

A figure that this engine cannot measure honestly is None, with the reason in ``not_measured``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tunelens.errors import TunelensError

if TYPE_CHECKING:  # the verdict module imports this one; the rule type is imported lazily below
    from tunelens.evaluators.verdict import RuleOutcome

SERVED_AS = ("adapter", "merged")
GIB = 1024 ** 3


def _percentile(values, q: float) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.percentile(finite, q)) if finite.size else math.nan


@dataclass(frozen=True)
class LatencyProfile:
    """One model's served latency: per-request timings at concurrency 1, after warm-up.

    Row i of every profile of one evaluation is the same prompt. `repeat_e2e_ms` is the base's
    second pass (after the candidates'): the A/A pair that gives the noise floor; None for others.
    """

    label: str
    served_as: str  # how its server ran it, in words ("base on a plain engine", ...)
    backend: str  # "vllm" or "transformers"
    rows: tuple[int, ...]  # indices of the sampled rows among the evaluated rows, request order
    e2e_ms: tuple[float, ...]
    ttft_ms: tuple[float, ...]  # NaN where the engine cannot tell
    output_tokens: tuple[int, ...]
    warmup_requests: int
    repeat_e2e_ms: tuple[float, ...] | None = None
    batch_tokens_per_s: float | None = None  # the batched generation's throughput, if known
    load_average: float | None = None  # 1-minute load average when this model's pass ended

    def __post_init__(self):
        lengths = {len(self.rows), len(self.e2e_ms), len(self.ttft_ms), len(self.output_tokens)}
        if self.repeat_e2e_ms is not None:
            lengths.add(len(self.repeat_e2e_ms))
        if len(lengths) != 1 or not self.rows:
            raise TunelensError(f"latency profile of {self.label!r} needs one timing per sampled "
                                f"row and at least one row")

    @property
    def n_requests(self) -> int:
        return len(self.rows)

    @property
    def tpot_ms(self) -> np.ndarray:
        """(e2e - ttft) / (tokens - 1) per request; NaN with fewer than two tokens or no TTFT."""
        e2e, ttft = np.asarray(self.e2e_ms), np.asarray(self.ttft_ms)
        tokens = np.asarray(self.output_tokens, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tokens >= 2, (e2e - ttft) / (tokens - 1), math.nan)

    @property
    def e2e_p50_ms(self) -> float:
        return _percentile(self.e2e_ms, 50)

    @property
    def e2e_p95_ms(self) -> float:
        return _percentile(self.e2e_ms, 95)

    @property
    def ttft_p50_ms(self) -> float:
        return _percentile(self.ttft_ms, 50)

    @property
    def ttft_p95_ms(self) -> float:
        return _percentile(self.ttft_ms, 95)

    @property
    def tpot_p50_ms(self) -> float:
        return _percentile(self.tpot_ms, 50)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for `<label>/served_...` (NaN-free: unknown figures are left out)."""
        values = {"served_latency_ms_p50": self.e2e_p50_ms, "served_latency_ms_p95": self.e2e_p95_ms,
                  "served_ttft_ms_p50": self.ttft_p50_ms, "served_ttft_ms_p95": self.ttft_p95_ms,
                  "served_tpot_ms_p50": self.tpot_p50_ms,
                  "served_latency_requests": float(self.n_requests),
                  "batch_tokens_per_s": (math.nan if self.batch_tokens_per_s is None
                                         else self.batch_tokens_per_s)}
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


@dataclass(frozen=True)
class MemoryProfile:
    """One model's memory as served, in bytes, each figure from the engine's or torch's accounting.

    None means "not measured on this engine"; `not_measured` says why for each such figure.
    """

    label: str
    served_as: str
    backend: str
    weights_bytes: int | None
    adapter_bytes: int | None
    lora_buffers_bytes: int | None
    kv_cache_peak_bytes: int | None
    source: str  # where each figure came from, in words
    adapter_in_buffers: bool = False  # the adapter is held inside the LoRA buffers (vLLM)
    peak_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated (GPU only)
    not_measured: tuple[str, ...] = ()  # "figure: reason" for each None figure

    @property
    def total_bytes(self) -> int | None:
        """weights + adapter (unless inside the LoRA buffers) + LoRA buffers + peak KV cache."""
        parts = [self.weights_bytes, 0 if self.adapter_in_buffers else self.adapter_bytes,
                 self.lora_buffers_bytes, self.kv_cache_peak_bytes]
        return None if any(p is None for p in parts) else int(sum(parts))

    @property
    def total_gib(self) -> float | None:
        return None if self.total_bytes is None else self.total_bytes / GIB

    def metrics(self) -> dict[str, float]:
        """Flat metrics for `<label>/memory_...` in GiB (unknown figures left out)."""
        values = {"memory_weights_gib": self.weights_bytes, "memory_adapter_gib": self.adapter_bytes,
                  "memory_lora_buffers_gib": self.lora_buffers_bytes,
                  "memory_kv_cache_peak_gib": self.kv_cache_peak_bytes,
                  "memory_peak_allocated_gib": self.peak_allocated_bytes,
                  "memory_total_gib": self.total_bytes}
        return {k: v / GIB for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class LatencyRatio:
    """Candidate against base: p95 ratios with paired bootstrap intervals and the A/A noise floor."""

    estimate: float  # geometric mean of p95(candidate)/p95(base pass 1) and /p95(base pass 2)
    low: float
    high: float
    level: float
    base_vs_base: float  # A/A: p95(base pass 2) / p95(base pass 1)
    base_vs_base_low: float
    base_vs_base_high: float
    p50_estimate: float  # the same geometric mean on medians

    @property
    def noise_factor(self) -> float:
        """How far apart two measurements of the same model can land here: max(A/A high, 1/A/A low)."""
        return max(1.0, self.base_vs_base_high, 1.0 / self.base_vs_base_low)


def _p95(values, axis=-1):
    return np.percentile(values, 95, axis=axis)


def compare_latency(base: LatencyProfile, candidate: LatencyProfile, *, level: float,
                    n_resamples: int, seed: int) -> LatencyRatio:
    """Paired (rows resampled jointly, pairs kept) percentile bootstrap of the served p95 ratio.

    ratio = sqrt(p95(c)/p95(b1) · p95(c)/p95(b2)): with the base timed before and after the
    candidate, a steady drift of the machine's speed cancels to first order.
    """
    from scipy.stats import bootstrap

    if base.repeat_e2e_ms is None:
        raise TunelensError(f"{base.label!r} has one latency pass; the comparison needs the base "
                            "timed before and after the candidate")
    if base.rows != candidate.rows:
        raise TunelensError(f"{base.label!r} and {candidate.label!r} were timed on different rows")
    first, second = np.asarray(base.e2e_ms), np.asarray(base.repeat_e2e_ms)
    other = np.asarray(candidate.e2e_ms)

    def ratio(c, b1, b2, axis=-1, statistic=_p95):
        return np.sqrt(statistic(c, axis=axis) ** 2 / (statistic(b1, axis=axis) *
                                                      statistic(b2, axis=axis)))

    def base_vs_base(b1, b2, axis=-1):
        return _p95(b2, axis=axis) / _p95(b1, axis=axis)

    options = dict(paired=True, vectorized=True, method="percentile", n_resamples=n_resamples,
                   confidence_level=level, rng=np.random.default_rng(seed))
    if len(other) < 2:
        raise TunelensError("the served-latency comparison needs at least 2 sampled rows")
    interval = bootstrap((other, first, second), ratio, **options).confidence_interval
    aa = bootstrap((first, second), base_vs_base, **options).confidence_interval
    return LatencyRatio(estimate=float(ratio(other, first, second)), low=float(interval.low),
                        high=float(interval.high), level=level,
                        base_vs_base=float(base_vs_base(first, second)),
                        base_vs_base_low=float(aa.low), base_vs_base_high=float(aa.high),
                        p50_estimate=float(ratio(other, first, second, statistic=np.median)))


def latency_rule(base: LatencyProfile, candidate: LatencyProfile, limit: float, *, level: float,
                 n_resamples: int, seed: int, name: str = "latency_p95_ratio") -> "RuleOutcome":
    """Pass when the served p95 ratio is within `limit`; fail only when its whole interval lies
    above limit x noise (the A/A factor): a difference within the machine's noise never fails."""
    from tunelens.evaluators.verdict import RuleOutcome

    compared = compare_latency(base, candidate, level=level, n_resamples=n_resamples, seed=seed)
    noise = compared.noise_factor
    passed = (True if compared.estimate <= limit else
              False if compared.low > limit * noise else None)
    relation = {True: "within the limit", False: "above the limit by more than the noise",
                None: "above the limit, but not by more than the noise and its interval"}[passed]
    detail = (f"served p95 latency {candidate.label}/{base.label} {compared.estimate:.3f} "
              f"({level:.0%} CI {compared.low:.3f} to {compared.high:.3f}; p50 "
              f"{compared.p50_estimate:.3f}) {relation} {limit:g}; noise x{noise:.3f} (base timed "
              f"before and after: A/A {compared.base_vs_base:.3f}, CI {compared.base_vs_base_low:.3f}"
              f" to {compared.base_vs_base_high:.3f}); {candidate.n_requests} requests each at "
              f"concurrency 1, {candidate.label} served as {candidate.served_as}")
    return RuleOutcome(name, compared.estimate, float(limit), passed, detail)


def memory_rules(base: MemoryProfile, candidate: MemoryProfile, max_ratio: float | None,
                 max_gib: float | None) -> list["RuleOutcome"]:
    """`memory_ratio` (total as served, candidate / base) and `memory_gib` (candidate's total).

    Totals come from accounting, not sampling, so these rules have no interval: undecided only
    when a figure could not be measured on this engine.
    """
    from tunelens.evaluators.verdict import RuleOutcome

    rules = []
    unknown = "; ".join(candidate.not_measured + base.not_measured) or "no total"
    if max_ratio is not None:
        ratio = (None if base.total_bytes in (None, 0) or candidate.total_bytes is None
                 else candidate.total_bytes / base.total_bytes)
        rules.append(RuleOutcome(
            "memory_ratio", ratio, float(max_ratio), None if ratio is None else ratio <= max_ratio,
            f"memory as served not measured ({unknown}); set the limit to null to skip the rule"
            if ratio is None else
            f"memory as served {base.total_gib:.4f} -> {candidate.total_gib:.4f} GiB, ratio "
            f"{ratio:.3f} {'<=' if ratio <= max_ratio else '>'} {max_ratio:g} ({_parts(candidate)})"))
    if max_gib is not None:
        gib = candidate.total_gib
        rules.append(RuleOutcome(
            "memory_gib", gib, float(max_gib), None if gib is None else gib <= max_gib,
            f"memory as served not measured ({unknown}); set the limit to null to skip the rule"
            if gib is None else
            f"{candidate.label} memory as served {gib:.4f} GiB "
            f"{'<=' if gib <= max_gib else '>'} budget {max_gib:g} GiB ({_parts(candidate)})"))
    return rules


def _parts(profile: MemoryProfile) -> str:
    def mib(value):
        return "n/a" if value is None else f"{value / 1024 ** 2:.2f} MiB"

    adapter = mib(profile.adapter_bytes) + (" inside the buffers" if profile.adapter_in_buffers
                                            else "")
    return (f"weights {mib(profile.weights_bytes)}, adapter {adapter}, LoRA buffers "
            f"{mib(profile.lora_buffers_bytes)}, peak KV cache {mib(profile.kv_cache_peak_bytes)}")
