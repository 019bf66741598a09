"""Shared fixtures: tiny models and real adapters, built once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from factories import make_lora_adapter, tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM directory (2 layers, hidden 128, head_dim 64, vocab 500)."""
    return tiny_llama(tmp_path_factory.mktemp("llama-base"))


@pytest.fixture(scope="session")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (r=8, alpha=16) on q/k/v/o and the MLP of `llama_base`."""
    return make_lora_adapter(llama_base, tmp_path_factory.mktemp("llama-adapter"), r=8,
                             lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"])
