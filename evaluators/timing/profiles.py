"""Latency and memory as served, one profile per model: what a user of each model feels and
what its server holds (timing.schedule measures them; timing.rules judges them).

Figures per model (milliseconds, over the sampled requests):

* ``e2e``: request sent -> last token back, at concurrency 1 (nothing queued ahead of it);
* ``ttft``: request sent -> first generated token (NaN where the engine cannot tell);
* ``tpot``: time per output token after the first, (e2e - ttft) / (tokens - 1), for requests with
  at least two tokens;

and the same under load (`evaluation.latency.concurrency`): at level N each model is sent N requests
at once (a window), window after window, and each request is timed from its own submission to its
last token; ``output_tokens_per_s`` is the tokens of every window over the windows' wall time (what
the server delivers to N callers at once). Level 1 is the concurrency-1 timing above;
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

A figure that this engine cannot measure honestly is None, with the reason in ``not_measured``
(`engines.interface.MemoryProfile`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import MemoryProfile
from tunelens.settings import EvaluationSettings


def percentile(values, q: float) -> float:
    """The q-th percentile of the finite values (NaN when there are none)."""
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
    concurrency: int = 1  # requests in flight together
    # wall time of each window of `concurrency` requests sent together (first pass), seconds;
    # None at concurrency 1, where a request is its own window
    window_s: tuple[float, ...] | None = None

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
        return percentile(self.e2e_ms, 50)

    @property
    def e2e_p95_ms(self) -> float:
        return percentile(self.e2e_ms, 95)

    @property
    def ttft_p50_ms(self) -> float:
        return percentile(self.ttft_ms, 50)

    @property
    def ttft_p95_ms(self) -> float:
        return percentile(self.ttft_ms, 95)

    @property
    def tpot_p50_ms(self) -> float:
        return percentile(self.tpot_ms, 50)

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
        return percentile(self.core_waits, 50)

    @property
    def output_tokens_per_s(self) -> float:
        """Σ output tokens / Σ window wall time (at concurrency 1: / Σ request time)."""
        busy_s = sum(self.window_s) if self.window_s is not None else sum(self.e2e_ms) / 1e3
        return sum(self.output_tokens) / busy_s if busy_s > 0 else math.nan

    def load_metrics(self) -> dict[str, float]:
        """Flat metrics for `<label>/latency_p50_c<N>` etc. at this profile's level (NaN-free)."""
        level = f"_c{self.concurrency}"
        values = {"latency_p50": self.e2e_p50_ms, "latency_p95": self.e2e_p95_ms,
                  "ttft_p50": self.ttft_p50_ms, "ttft_p95": self.ttft_p95_ms,
                  "tpot_p50": self.tpot_p50_ms, "output_tokens_per_s": self.output_tokens_per_s}
        return {k + level: float(v) for k, v in values.items() if math.isfinite(v)}

    def metrics(self) -> dict[str, float]:
        """Flat metrics for `<label>/served_...` (NaN-free: unknown figures are left out)."""
        values = {"served_latency_ms_p50": self.e2e_p50_ms, "served_latency_ms_p95": self.e2e_p95_ms,
                  "served_ttft_ms_p50": self.ttft_p50_ms, "served_ttft_ms_p95": self.ttft_p95_ms,
                  "served_tpot_ms_p50": self.tpot_p50_ms,
                  "served_core_wait_share_p50": self.core_wait_p50,
                  "served_latency_requests": float(self.n_requests)}
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}


@dataclass(frozen=True)
class ServingSettings:
    """`evaluation.served` and `evaluation.latency` of conf.yaml, checked."""

    served: str  # "adapter" or "merged": how candidates will be served
    sample_rows: int  # rows timed per model (0: no served-latency or memory pass)
    warmup_requests: int  # untimed requests per model and server before timing
    # rounds of sample_rows rows at most, another while the latency rule is undecided
    max_rounds: int
    concurrency: tuple[int, ...] = (1,)  # levels timed, ascending (1 always among them)

    @classmethod
    def from_config(cls, evaluation: EvaluationSettings) -> "ServingSettings":
        """The checked settings' served mode and latency schedule (level 1 always timed)."""
        latency = evaluation.latency
        return cls(evaluation.served, latency.sample_rows, latency.warmup_requests,
                   latency.max_rounds, tuple(sorted({1, *latency.concurrency})))


@dataclass(frozen=True)
class ServingFigures:
    """Latency and memory as served, one profile per model, and how they were measured."""

    latency: tuple[LatencyProfile, ...]  # concurrency 1
    memory: tuple[MemoryProfile, ...]
    notes: tuple[str, ...]
    under_load: tuple[LatencyProfile, ...] = ()  # every model at each level above 1
    # why nothing was measured as served (its server refused or timed out); None when measured
    unmeasured: str | None = None

    def latency_of(self, label: str) -> LatencyProfile:
        return next(p for p in self.latency if p.label == label)

    @property
    def levels(self) -> tuple[int, ...]:
        """The concurrency levels timed, ascending."""
        return tuple(sorted({1, *(p.concurrency for p in self.under_load)}))

    def at(self, label: str, concurrency: int) -> LatencyProfile:
        """`label`'s profile at `concurrency` requests in flight."""
        if concurrency == 1:
            return self.latency_of(label)
        found = [p for p in self.under_load if p.label == label and p.concurrency == concurrency]
        if not found:
            raise TunelensError(f"{label!r} was not timed at concurrency {concurrency} (timed: "
                                f"{', '.join(map(str, self.levels))})")
        return found[0]

    def every_level(self) -> tuple[LatencyProfile, ...]:
        """Every model's profile at every level."""
        return (*self.latency, *self.under_load)

    def memory_of(self, label: str) -> MemoryProfile:
        return next(p for p in self.memory if p.label == label)


