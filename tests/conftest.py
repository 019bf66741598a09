"""Shared fixtures: tiny models and real adapters, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.factories import make_lora_adapter, tiny_llama


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


# --- MLflow servers (HOOKS) -------------------------------------------------------------------
from support.mlflow_server import MlflowServer, postgres_database  # noqa: E402 - grouped with its fixtures


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real `mlflow server` (sqlite backend, local artifacts) for the whole test session."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-sqlite"), allow_loopback_webhooks=True) as srv:
        yield srv


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
