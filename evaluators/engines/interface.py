"""What every backend does for an evaluation, and the values it hands back.

A backend is one module of this package with a `BACKEND` (registered in `choice.BACKENDS`):

* its generation engine (`Engine`, started per base by `Backend.start`): every model's outputs as
  one batch, and the log-probability of every prompt token (the text groups' perplexity);
* serving (`ServedEngine`): one request timed alone, several in flight together (latency under
  load), and the memory a model holds as served, each
  figure from the engine's own accounting. Either the generation engine serves too, each served
  configuration (the base alone, adapters on a LoRA-enabled engine, a merged candidate) on an
  engine of its own started in turn (vLLM), or `Backend.start_server` holds the base and every
  candidate at once (transformers in one process).

Every engine takes the same token ids (tokenised once by the caller) and decodes its outputs the
same way (`decode`), so a difference between two models is the models', not the backends'.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from tunelens.evaluators.inputs.prompts import cut_at_stop
from tunelens.settings import GenerationSettings

GIB = 1024 ** 3
BASE_SERVED_AS = "the base alone (no LoRA)"
ADAPTER_SERVED_AS = "an adapter on the base (LoRA enabled)"
MERGED_SERVED_AS = "its weights merged into the base (no LoRA)"


@dataclass(frozen=True)
class Candidate:
    """One model of the comparison: the base (adapter_dir None) or the base plus one adapter."""

    label: str
    adapter_dir: Path | None = None
    version: str | None = None


@dataclass(frozen=True)
class Generation:
    """One model's answer to one prompt, as token ids and the decoded text."""

    text: str
    token_ids: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Phase:
    """All of one model's generations, produced as one batch.

    Only the batch's throughput is kept: a row's time inside a batch is its wait behind the other
    prompts, not what a caller of the served model waits (`ServedEngine.request` times that, one
    request at a time), and the engine's process memory is not the model's (`ServedEngine.memory`
    accounts for that).
    """

    label: str
    generations: tuple[Generation, ...]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(g.n_tokens for g in self.generations) / self.wall_s if self.wall_s else math.nan


@contextmanager
def timed_phase():
    """Wall time of one model's batch; yields a dict the caller reads `wall_s` from afterwards."""
    record: dict = {}
    start = time.perf_counter()
    yield record
    record["wall_s"] = time.perf_counter() - start


def decode(tokenizer, token_ids, stop: tuple[str, ...]) -> str:
    """The text every backend reports: special tokens skipped, cut at the first stop string."""
    return cut_at_stop(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop)[0]


@dataclass(frozen=True)
class ServedRequest:
    """One request timed alone: send -> last token, send -> first token, tokens generated."""

    e2e_ms: float
    ttft_ms: float  # NaN where the engine cannot tell
    output_tokens: int
    # prompt + output - 1: the positions the KV cache held at the request's end (the last token
    # generated is never fed back, so never cached)
    tokens_in_cache: int
    # share of the serving threads' runnable time spent waiting for a CPU core
    # (timing/core_wait.py); NaN where not measured
    core_wait: float = math.nan


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


class Engine(Protocol):
    """A base's generation engine: the base and its adapters, one batch per model."""

    name: str

    @property
    def settings(self) -> dict:
        """The engine options that shape results and speed (logged as run params)."""

    def generate(self, candidate: Candidate, prompt_ids: list[list[int]], tokenizer,
                 settings: GenerationSettings) -> Phase:
        """`candidate`'s answer to every prompt, as one timed batch."""

    def token_logprobs(self, candidate: Candidate, prompt_ids: list[list[int]]
                       ) -> list[np.ndarray]:
        """log p(x_t | x_<t) of every token after the first, per prompt."""

    def close(self) -> None:
        """Free what the engine holds (before the next engine starts)."""


class ServedEngine(Protocol):
    """Models as they will be served: one request timed alone, and memory as the server holds it."""

    backend: str
    # the processes whose threads run a request (their core wait is measured around it)
    compute_pids: tuple[int, ...]

    def request(self, candidate: Candidate, prompt_ids: list[int], settings: GenerationSettings,
                tokenizer) -> tuple[ServedRequest, int]:
        """One request alone (concurrency 1), and the bytes of KV cache it held at its end."""

    def serve_together(self, candidate: Candidate, prompts: list[list[int]],
                       settings: GenerationSettings, tokenizer) -> list[ServedRequest]:
        """Every prompt sent at once, as that many callers would: each request timed from its own
        submission to its first and its last token as the caller sees them."""

    def memory(self, candidate: Candidate, kv_peak: int) -> MemoryProfile:
        """`candidate`'s memory as served, its largest KV cache being `kv_peak` bytes."""

    def close(self) -> None:
        """Free what the server holds."""


def never_refused(adapter_dir: Path) -> str | None:
    """A backend that serves every adapter the base fits."""
    return None


@dataclass(frozen=True)
class Backend:
    """One backend: how it starts, what it refuses, how its models are timed as served.

    `start(base_dir, adapters, evaluation, settings, max_model_len, *, inspect_workers, served_as)`
    gives a base's generation engine (`inspect_workers`: its memory as served will be read);
    `start_server(base_dir, candidates, evaluation, served)`, when set, one server holding the base
    and every candidate as served at once, after the generation engine closed; when None, the
    generation engine serves too (a `ServedEngine` with `forget_cached_prompts()`, emptying its
    prefix cache before the timed requests), and each served configuration gets an engine of its
    own in turn (`start` with `served_as`). `refusal(adapter_dir)`: why it cannot serve that
    adapter, or None; `text_refusal(adapter_dir)`: why it cannot score the text groups' tokens
    with it, or None. `title` names it in messages; `missing` is the line shown when it is asked
    for and `available()` is False.
    """

    name: str
    title: str
    available: Callable[[], bool]
    missing: str
    start: Callable[..., Engine]
    start_server: Callable[..., ServedEngine] | None = None
    refusal: Callable[[Path], str | None] = never_refused
    text_refusal: Callable[[Path], str | None] = never_refused
