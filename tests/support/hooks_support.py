"""Helpers for the hook tests: register versions, run `tunelens hooks` as a real process, sign."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests
import yaml
from mlflow import MlflowClient

from support.mlflow_server import free_port
from tunelens.registry_hooks.service.state import FINAL, LEASE, STATUS
from tunelens.registry_hooks.service.webhook import DELIVERY_ID, SIGNATURE, TIMESTAMP, sign

from support import REPO


def register(client: MlflowClient, name: str, adapter_dir: Path, *,
             description: str | None = None) -> str:
    """Log a directory as run artifacts and register it (the normal client path); its version."""
    experiment = client.get_experiment_by_name("sources")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("sources")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception:  # noqa: BLE001 - already registered by an earlier call
        pass
    return str(client.create_model_version(name, f"runs:/{run.info.run_id}/adapter",
                                           run.info.run_id, description=description).version)


def wait_status(client: MlflowClient, name: str, version: str, timeout: float = 240,
                statuses=FINAL) -> dict[str, str]:
    """The version's tags once its status is in `statuses` (and, for a final one, its lease is
    gone: the worker drops it just after writing the status); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = client.get_model_version(name, version).tags
        if tags.get(STATUS) in statuses and not (tags[STATUS] in FINAL and LEASE in tags):
            return tags
        time.sleep(0.2)
    raise AssertionError(f"{name} v{version} not in {statuses} after {timeout} s: {tags}")


def analysis_runs(client: MlflowClient, name: str, version: str) -> list:
    experiment = client.get_experiment_by_name("tunelens-analysis")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id],
                                          f"tags.`tunelens.model_version` = '{version}'")
            if r.data.tags.get("tunelens.model_name") == name]


def write_config(path: Path, **hooks) -> Path:
    """Hook settings for a test: short leases and scans; every model in scope unless narrowed."""
    settings = {"lease_seconds": 6, "poll_interval": 2, "models": ["*"], **hooks}
    path.write_text(yaml.safe_dump({"hooks": settings}))
    return path


class HooksProcess:
    """`tunelens hooks` in its own process (so a test can kill it like a crash)."""

    def __init__(self, tracking_uri: str, config: Path, log_path: Path, *, secret: str,
                 webhook: bool = True):
        self.port = free_port()
        self.secret = secret
        cmd = [sys.executable, "-m", "tunelens.plugin.cli", "--config", str(config), "hooks",
               "--tracking-uri", tracking_uri, "--port", str(self.port)]
        if not webhook:
            cmd.append("--no-webhook")
        env = {**os.environ, "TUNELENS_WEBHOOK_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_tail()
            if "webhooks on" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise AssertionError(f"tunelens hooks did not start:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def deliveries_only_hooks(tracking_uri: str, root: Path, secret: str) -> HooksProcess:
    """A `tunelens hooks` process with no MLflow webhook and no scan after its first one (returned
    once that scan has run): from then on only the deliveries a test sends trigger work."""
    root.mkdir(parents=True, exist_ok=True)
    hooks = HooksProcess(tracking_uri, write_config(root / "deliveries-only.yaml", poll_interval=3600),
                         root / "deliveries-only.log", secret=secret, webhook=False)
    deadline = time.monotonic() + 120
    while "reconciling scan:" not in hooks.log_tail(100_000):
        assert time.monotonic() < deadline, hooks.log_tail()
        time.sleep(0.2)
    return hooks


def delivery(secret: str | None, name: str, version: str, *, delivery_id: str | None = None,
             timestamp: int | None = None) -> tuple[dict, bytes]:
    """Headers and body of a model_version.created delivery, signed like MLflow when secret."""
    body = json.dumps({"entity": "model_version", "action": "created",
                       "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": name, "version": version, "source": "x", "run_id": None,
                                "tags": {}, "description": None}}).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {"Content-Type": "application/json", DELIVERY_ID: delivery_id, TIMESTAMP: stamp}
    if secret is not None:
        headers[SIGNATURE] = sign(secret, delivery_id, stamp, body)
    return headers, body


def post(url: str, headers: dict, body: bytes) -> int:
    """The HTTP status of a POST; 0 when the receiver closed the connection unanswered (it drops
    an oversized body unread, and a client that stalls)."""
    try:
        return requests.post(url, data=body, headers=headers, timeout=30).status_code
    except requests.ConnectionError:
        return 0
