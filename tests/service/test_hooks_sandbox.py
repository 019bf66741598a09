"""The analysis child process: a job that runs too long or whose process dies costs one readable
`failed` and a fresh child, never the hook service."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from support.hooks_support import register
from tunelens.config import load_config, with_changes
from tunelens.registry_hooks.service.sandbox import (ANALYSIS_WORK, SandboxFailed, SandboxProcess,
                                                     SandboxStopped)
from tunelens.registry_hooks.service.state import ANALYSIS, ERROR, STATUS
from tunelens.registry_hooks.service.worker import Worker


def test_killed_child_is_reported_and_replaced(llama_adapter, llama_base, tmp_path):
    sandbox = SandboxProcess(ANALYSIS_WORK, timeout=300).start()
    try:
        result, files = sandbox.run(llama_adapter, llama_base, load_config(), tmp_path / "a")
        assert result.summary.trainable_params > 0 and files.html_path.is_file()
        first = sandbox._process.pid
        errors = []
        # The child is stopped before the job goes in, so the job cannot finish before the kill
        # however fast the analysis is.
        os.kill(first, signal.SIGSTOP)
        job = threading.Thread(target=lambda: errors.append(pytest.raises(
            SandboxStopped, sandbox.run, llama_adapter, llama_base, load_config(),
            tmp_path / "b")))
        job.start()
        time.sleep(0.3)  # the job is handed to the child now
        os.kill(first, signal.SIGKILL)  # as the kernel's OOM killer would
        job.join(60)
        message = str(errors[0].value)
        assert "killed by SIGKILL" in message and "OOM killer" in message
        # The next job gets a fresh child and succeeds.
        result, _ = sandbox.run(llama_adapter, llama_base, load_config(), tmp_path / "c")
        assert result.summary.trainable_params > 0 and sandbox._process.pid != first
        # An adapter error comes back as the analysis's own readable line.
        with pytest.raises(SandboxFailed, match="adapter_config.json"):
            sandbox.run(tmp_path, None, load_config(), tmp_path / "d")
    finally:
        sandbox.stop()


def test_analysis_over_the_time_limit_fails_the_version_and_the_next_one_runs(
        mlflow_server, llama_adapter):
    client = MlflowClient(mlflow_server.url)
    slow, fine = (register(client, "timed", llama_adapter) for _ in range(2))
    # less than the child's imports alone
    config = with_changes(load_config(), {"hooks": {"analysis_timeout_seconds": 0.2}})
    worker = Worker(mlflow_server.url, config)
    try:
        outcome = worker.process("timed", slow)
        tags = client.get_model_version("timed", slow).tags
        assert outcome.status == tags[STATUS] == "failed"
        assert "longer than hooks.analysis_timeout_seconds (0.2 s)" in tags[ERROR]
        worker._sandboxes[ANALYSIS].queue[0].timeout = 300
        assert worker.process("timed", fine).status == "done"
    finally:
        worker.stop()
