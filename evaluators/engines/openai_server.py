"""The OpenAI-compatible backend: the models as a running deployment serves them.

`evaluation.endpoint.url` (or `tunelens evaluate --endpoint URL`) names a server speaking the
OpenAI completions API with vLLM's extensions (`vllm serve BASE --enable-lora`): the base is the
model it serves; the candidate and the alias's holder are LoRA modules loaded on it at run time
through `/v1/load_lora_adapter` (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and must
be able to read the adapter folders tunelens downloaded: the same machine, or a shared path) and
unloaded when the evaluation is done. Outputs come from `/v1/completions` on the same token ids
every backend sends (`return_token_ids`), prompt log-probabilities from its `prompt_logprobs`, and
served latency from streamed completions stamped on this side (what a caller waits). The server's
memory is its own process's: not visible through the API, so not measured here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelens.errors import TunelensError
from tunelens.evaluators.engines.interface import (Backend, Candidate, Generation, MemoryProfile,
                                                   Phase, ServedRequest, decode, timed_phase)
from tunelens.evaluators.engines.vllm import lm_head_refusal, vllm_refusal
from tunelens.settings import EvaluationSettings, GenerationSettings

BASE_ON_ENDPOINT = "the served model of the endpoint (its server as deployed)"
LORA_ON_ENDPOINT = "a LoRA module loaded on the endpoint's server"


class EndpointUnavailable(TunelensError):
    """The deployment at `url` could not be asked: unreachable, too slow, refusing, or without
    LoRA. No model's outputs exist, so the evaluation records an INCONCLUSIVE verdict saying this
    line."""

    def __init__(self, url: str, message: str):
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class Endpoint:
    """Where the server is and how to call it; the API key is read from an environment variable
    and never logged."""

    url: str
    api_key: str | None
    timeout_s: float

    @classmethod
    def from_config(cls, evaluation: EvaluationSettings) -> "Endpoint":
        section = evaluation.endpoint
        if not section.url:
            raise TunelensError("the openai_server backend needs evaluation.endpoint.url "
                                "(tunelens evaluate --endpoint URL)")
        key_env = section.api_key_env
        api_key = os.environ.get(key_env) if key_env else None
        if key_env and not api_key:
            raise TunelensError(f"the API key variable {key_env} (--api-key-env) is not set")
        return cls(section.url.rstrip("/"), api_key, float(section.timeout_s))

    def call(self, method: str, path: str, body: dict | None = None, *, stream: bool = False):
        """One HTTP call; any failure to reach the server or a non-2xx answer is one line."""
        import requests

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            answer = requests.request(method, self.url + path, json=body, headers=headers,
                                      timeout=self.timeout_s, stream=stream)
        except requests.Timeout:
            raise EndpointUnavailable(self.url, f"the server at {self.url} did not answer {path} "
                                      f"within {self.timeout_s:g} s "
                                      "(evaluation.endpoint.timeout_s)") from None
        except requests.RequestException as exc:
            raise EndpointUnavailable(self.url, f"cannot reach the server at {self.url} "
                                      f"({type(exc).__name__})") from None
        if not answer.ok:
            raise EndpointUnavailable(self.url, f"the server at {self.url} refused {path}: HTTP "
                                      f"{answer.status_code} {_message(answer.text)}")
        return answer


def _message(text: str) -> str:
    """An error body's message, on one line."""
    try:
        body = json.loads(text)
        text = (body.get("error") or {}).get("message", text) if isinstance(body, dict) else text
    except (ValueError, AttributeError):
        pass
    return " ".join(str(text).split())[:300]


def _sampling(settings: GenerationSettings) -> dict:
    """The completions API's sampling fields for `settings` (as vllm_sampling_params sets them)."""
    return {"max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "seed": settings.seed, "stop": list(settings.stop) or None}


class EndpointServer:
    """The deployment behind `evaluation.endpoint`: generates, scores prompt tokens and serves.

    Adapters it was given are loaded on the server as LoRA modules when it starts and unloaded by
    close(); the base is the model the server serves (the first in `/v1/models` that is no LoRA).
    """

    name = "openai_server"
    backend = "openai_server"
    compute_pids: tuple[int, ...] = ()  # the server's processes are not this machine's to read

    def __init__(self, base_dir: Path, adapters: list[Path], evaluation: EvaluationSettings):
        self.endpoint = Endpoint.from_config(evaluation)
        self.models_answer = self.endpoint.call("GET", "/v1/models").json()
        served = [m["id"] for m in self.models_answer.get("data", []) if not m.get("parent")]
        if not served:
            raise EndpointUnavailable(self.endpoint.url, f"the server at {self.endpoint.url} "
                                      "lists no model in /v1/models")
        self.served_model = served[0]
        self._modules: dict[Path, str] = {}
        try:
            for adapter in adapters:
                self._load(Path(adapter))
        except EndpointUnavailable:
            self.close()
            raise

    def _load(self, adapter: Path) -> None:
        """`adapter` as a LoRA module of the server, named after its folder's path."""
        name = "tunelens-" + hashlib.sha256(str(adapter.resolve()).encode()).hexdigest()[:12]
        try:
            self.endpoint.call("POST", "/v1/load_lora_adapter",
                               {"lora_name": name, "lora_path": str(adapter.resolve())})
        except EndpointUnavailable as exc:
            raise EndpointUnavailable(
                exc.url, f"{exc}: the adapter could not be loaded as a LoRA module (the server "
                "needs --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and read access to "
                "the adapter's folder)") from None
        self._modules[adapter] = name

    def model_of(self, candidate: Candidate) -> str:
        """The `model` field that asks the server for `candidate`."""
        if candidate.adapter_dir is None:
            return self.served_model
        return self._modules[Path(candidate.adapter_dir)]

    @property
    def settings(self) -> dict:
        """The endpoint as logged: its URL (never a key) and the models it listed."""
        return {"endpoint": self.endpoint.url, "served_model": self.served_model,
                "models": json.dumps(self.models_answer.get("data", []))[:4000]}

    def generate(self, candidate: Candidate, prompt_ids: list[list[int]], tokenizer,
                 settings: GenerationSettings) -> Phase:
        """Every prompt in one completions request (the server batches them), as token ids."""
        body = {"model": self.model_of(candidate), "prompt": prompt_ids, "return_token_ids": True,
                **_sampling(settings)}
        with timed_phase() as record:
            choices = self.endpoint.call("POST", "/v1/completions", body).json()["choices"]
        choices = sorted(choices, key=lambda c: c["index"])
        generations = [Generation(decode(tokenizer, c["token_ids"], settings.stop),
                                  tuple(c["token_ids"])) for c in choices]
        return Phase(candidate.label, tuple(generations), record["wall_s"])

    def token_logprobs(self, candidate: Candidate, prompt_ids: list[list[int]]) -> list:
        """log p(x_t | x_<t) of every token after the first, per prompt: the server's
        prompt_logprobs=0 (the prompt's own token at each position), one request per prompt (a
        LoRA request's prompt logprobs are right only alone, as on the in-process engine)."""
        scored = []
        for ids in prompt_ids:
            body = {"model": self.model_of(candidate), "prompt": ids, "max_tokens": 1,
                    "temperature": 0.0, "prompt_logprobs": 0}
            choice = self.endpoint.call("POST", "/v1/completions", body).json()["choices"][0]
            scored.append(np.array([entry[str(token)]["logprob"] for entry, token in
                                    zip(choice["prompt_logprobs"][1:], ids[1:])],
                                   dtype=np.float64))
        return scored

    def _streamed(self, candidate: Candidate, prompt_ids: list[int],
                  settings: GenerationSettings) -> ServedRequest:
        """One streamed completion, stamped here: sent -> first token chunk -> last chunk."""
        body = {"model": self.model_of(candidate), "prompt": prompt_ids, "stream": True,
                "return_token_ids": True, **_sampling(settings)}
        start = time.perf_counter()
        first, tokens = None, 0
        answer = self.endpoint.call("POST", "/v1/completions", body, stream=True)
        for line in answer.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            new = sum(len(c.get("token_ids") or []) for c in json.loads(line[6:])["choices"])
            if new and first is None:
                first = time.perf_counter()
            tokens += new
        end = time.perf_counter()
        return ServedRequest((end - start) * 1e3,
                             (first - start) * 1e3 if first is not None else math.nan, tokens,
                             len(prompt_ids) + max(tokens - 1, 0))

    def request(self, candidate: Candidate, prompt_ids: list[int], settings: GenerationSettings,
                tokenizer) -> tuple[ServedRequest, int]:
        """One request alone (its KV cache is the server's: not read, 0)."""
        return self._streamed(candidate, prompt_ids, settings), 0

    def serve_together(self, candidate: Candidate, prompts: list[list[int]],
                       settings: GenerationSettings, tokenizer) -> list[ServedRequest]:
        """Every prompt at once, one connection per caller."""
        with ThreadPoolExecutor(max_workers=len(prompts)) as callers:
            return list(callers.map(lambda ids: self._streamed(candidate, ids, settings), prompts))

    def memory(self, candidate: Candidate, kv_peak: int) -> MemoryProfile:
        """Not measured: the server's memory is its own process's, not visible through the API."""
        why = "the endpoint's server runs elsewhere; the OpenAI API does not report its memory"
        return MemoryProfile(
            label=candidate.label,
            served_as=BASE_ON_ENDPOINT if candidate.adapter_dir is None else LORA_ON_ENDPOINT,
            backend=self.backend, weights_bytes=None, adapter_bytes=None,
            lora_buffers_bytes=None, kv_cache_peak_bytes=None, source=why,
            not_measured=tuple(f"{figure}: {why}" for figure in (
                "weights_bytes", "adapter_bytes", "lora_buffers_bytes", "kv_cache_peak_bytes")))

    def close(self) -> None:
        """Unload every LoRA module this evaluation loaded."""
        for adapter, name in list(self._modules.items()):
            try:
                self.endpoint.call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            except EndpointUnavailable:
                pass  # the server is gone or already dropped it: nothing left to unload
            del self._modules[adapter]


class EndpointServing(EndpointServer):
    """The endpoint as the served-latency timing sees it: every candidate on the one server."""

    def __init__(self, base_dir: Path, candidates: list[Candidate], evaluation: EvaluationSettings,
                 served: str):
        if served != "adapter":
            raise TunelensError("an endpoint serves adapters as LoRA modules: evaluation.served "
                                "must be adapter with --endpoint")
        super().__init__(base_dir, [c.adapter_dir for c in candidates if c.adapter_dir], evaluation)
        self._labels = {c.label: c.adapter_dir is None for c in candidates}

    @property
    def served_as(self) -> dict[str, str]:
        return {label: BASE_ON_ENDPOINT if is_base else LORA_ON_ENDPOINT
                for label, is_base in self._labels.items()}


def start_engine(base_dir: Path, adapters: list[Path], evaluation: EvaluationSettings,
                 settings: GenerationSettings, max_model_len: int, *,
                 inspect_workers: bool = False, served_as: str | None = None) -> EndpointServer:
    """The endpoint, with `adapters` loaded on it as LoRA modules."""
    return EndpointServer(base_dir, adapters, evaluation)


def start_server(base_dir: Path, candidates: list[Candidate], evaluation: EvaluationSettings,
                 served: str) -> EndpointServing:
    """The endpoint holding the base and every candidate at once."""
    return EndpointServing(base_dir, candidates, evaluation, served)


BACKEND = Backend("openai_server", title="an OpenAI-compatible server",
                  available=lambda: True, missing="", start=start_engine,
                  start_server=start_server, refusal=vllm_refusal, text_refusal=lm_head_refusal)
