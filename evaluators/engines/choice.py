"""Which backend runs an evaluation: every backend by name, and the choice for `--backend`.

A new backend is one module of this package defining `BACKEND` (engines.interface.Backend),
listed here; conf.yaml's `evaluation.<name>` holds its options.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelens.errors import TunelensError
from tunelens.evaluators.engines import openai_server, transformers, vllm
from tunelens.evaluators.engines.interface import Backend

BACKENDS: dict[str, Backend] = {b.name: b for b in (vllm.BACKEND, transformers.BACKEND,
                                                     openai_server.BACKEND)}


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a key of BACKENDS
    reason: str

    @property
    def backend(self) -> Backend:
        return BACKENDS[self.name]


def choose_backend(requested: str, adapters: list[Path]) -> BackendChoice:
    """The backend asked for, when it is available and serves every adapter; with "auto", vLLM
    when available and able to serve every adapter, else transformers, with why."""
    if requested != "auto" and requested not in BACKENDS:
        raise TunelensError(f"unknown backend {requested!r}: use auto, "
                            f"{', '.join(list(BACKENDS)[:-1])} or {list(BACKENDS)[-1]}")
    if requested != "auto":
        return _requested(BACKENDS[requested], adapters)
    refusals = [f"{a}: {reason}" for a in adapters if (reason := vllm.vllm_refusal(a))]
    if refusals:
        return BackendChoice("transformers", f"vLLM refuses {refusals[0]}")
    if not vllm.vllm_available():
        return BackendChoice("transformers", "vLLM is not importable")
    return BackendChoice("vllm", "vLLM available and every adapter is plain LoRA")


def _requested(backend: Backend, adapters: list[Path]) -> BackendChoice:
    """`backend`, asked for by name: refused when it cannot serve an adapter or is missing."""
    refusals = [f"{a}: {reason}" for a in adapters if (reason := backend.refusal(a))]
    if refusals:
        raise TunelensError(f"{backend.title} cannot serve {refusals[0]}; use --backend "
                            "transformers or auto")
    if not backend.available():
        raise TunelensError(backend.missing)
    return BackendChoice(backend.name, "requested")


def check_text_scoring(choice: BackendChoice, adapters: list[Path]) -> None:
    """Refuse, before anything runs, an adapter whose text-group tokens the backend cannot score."""
    for adapter in adapters:
        reason = choice.backend.text_refusal(adapter)
        if reason is not None:
            raise TunelensError(f"{adapter} {reason}: use --backend transformers for the "
                                "perplexity of text groups")
