"""Shared fixtures: tiny models and real adapters, built once per test session."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from support.factories import make_lora_adapter, save_tiny_model, tiny_llama

# One verdict key for this test session, inherited by every server and command the tests start
# (so nothing reads or creates the user's own key file).
os.environ["TUNELENS_VERDICT_KEY"] = secrets.token_hex(32)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM directory (2 layers, hidden 128, head_dim 64, vocab 500)."""
    return tiny_llama(tmp_path_factory.mktemp("llama-base"))


@pytest.fixture(scope="session")
def phi3_base(tmp_path_factory) -> Path:
    """Phi-3 with fused qkv_proj (4 heads, 2 KV heads, head_dim 16) and gate_up_proj."""
    from transformers import Phi3Config

    config = Phi3Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("phi3-base"))


@pytest.fixture(scope="session")
def llama_adapter(llama_base, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (r=8, alpha=16) on q/k/v/o and the MLP of `llama_base`."""
    return make_lora_adapter(llama_base, tmp_path_factory.mktemp("llama-adapter"), r=8,
                             lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"])


# --- MLflow servers (HOOKS) -------------------------------------------------------------------
from support.mlflow_server import MlflowServer, postgres_database  # noqa: E402 - grouped with its fixtures
from support.tracking import tracking_at  # noqa: E402 - grouped with its fixture


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` (sqlite backend, local artifacts) for the whole test session."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-sqlite"), allow_loopback_webhooks=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def tracking(mlflow_server) -> MlflowServer:
    """MLflow pointed at the session's server for one module's tests (MLFLOW_TRACKING_URI, which
    child processes inherit, and mlflow's own URI), put back when the module is done."""
    with tracking_at(mlflow_server.url):
        yield mlflow_server


@pytest.fixture(scope="session")
def postgres_database_uri() -> str:
    """A fresh PostgreSQL database on 127.0.0.1:5432 for this session, dropped afterwards (started
    if installed and stopped, skipped with the reason if not installed)."""
    with postgres_database() as uri:
        yield uri


@pytest.fixture(scope="session")
def postgres_mlflow_server(postgres_database_uri, tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` on a fresh PostgreSQL database for the whole test session."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-postgres"), postgres_database_uri,
                      allow_loopback_webhooks=True) as srv:
        yield srv


# --- A vLLM OpenAI-compatible server (the openai_server backend) --------------------------------
from support.vllm_server import VllmOpenAIServer  # noqa: E402 - grouped with its fixture


@pytest.fixture(scope="session")
def vllm_endpoint(llama_base, tmp_path_factory) -> VllmOpenAIServer:
    """A real vLLM OpenAI-compatible server on `llama_base`, LoRA modules loadable at run time."""
    with VllmOpenAIServer(llama_base, tmp_path_factory.mktemp("vllm-server")) as server:
        yield server
